//! The SQL normaliser: any text gets a bounded template, without a
//! panic, and a template is its own template (masked or not).
#![no_main]

use libfuzzer_sys::fuzz_target;
use pipelens::queries::sql;

fuzz_target!(|input: &[u8]| {
    let text = String::from_utf8_lossy(input);
    for mask in [false, true] {
        let t = sql::template_with(&text, mask);
        let _ = sql::operation(&t);
        assert!(t.len() <= sql::MAX_TEMPLATE, "{} bytes", t.len());
        assert_eq!(sql::template_with(&t, mask), t, "mask {mask}, of {text:?}");
    }
});
