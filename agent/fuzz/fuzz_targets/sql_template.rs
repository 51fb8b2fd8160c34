//! The SQL normaliser: any text gets a bounded template, without a panic.
//!
//! A template should also be its own template; that held the two bugs
//! this target found (now unit tests in `queries/sql.rs`), but it does not
//! hold yet for a `$` next to an operator (`&> $` gives `&>?`, whose
//! template is `&>`), so it is not asserted until that is settled.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pipelens::queries::sql;

fuzz_target!(|input: &[u8]| {
    let text = String::from_utf8_lossy(input);
    let t = sql::template(&text);
    let _ = sql::operation(&t);
    assert!(t.len() <= sql::MAX_TEMPLATE, "{} bytes", t.len());
});
