//! The HTTP/1.1 and WebSocket parser (`websocket::http`, `frame`,
//! `stream`), fed any conversation through the streams decoder as the
//! payload collector feeds it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pipelens::websocket::analyser::WebAnalyser;

fuzz_target!(|input: &[u8]| {
    let (analyser, _summary) = WebAnalyser::new();
    pipelens_fuzz::run_conversation(input, vec![Box::new(analyser)]);
});
