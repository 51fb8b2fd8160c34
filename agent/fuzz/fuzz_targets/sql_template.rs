//! The SQL normaliser: any text gets a bounded template, and a template
//! normalises to itself (a template is a statement whose literals are
//! already `?`), unless it was cut or could not be tokenised.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pipelens::queries::sql;

fuzz_target!(|input: &[u8]| {
    let text = String::from_utf8_lossy(input);
    let t = sql::template(&text);
    let _ = sql::operation(&t);
    assert!(
        t.len() <= sql::MAX_TEMPLATE + '…'.len_utf8(),
        "{} bytes",
        t.len()
    );
    if !t.ends_with('…') && t != sql::UNPARSEABLE {
        assert_eq!(sql::template(&t), t, "the template of {text:?}");
    }
});
