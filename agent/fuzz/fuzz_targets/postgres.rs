//! The PostgreSQL frontend/backend parser (`queries::wire`, pairing in
//! `queries::conn`, templates by `queries::sql`), fed any conversation
//! through the streams decoder as the payload collector feeds it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pipelens::queries::QueriesAnalyser;

fuzz_target!(|input: &[u8]| {
    let (analyser, _summary) = QueriesAnalyser::new();
    pipelens_fuzz::run_conversation(input, vec![Box::new(analyser)]);
});
