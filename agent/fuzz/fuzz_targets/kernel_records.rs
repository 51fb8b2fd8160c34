//! The decoders of the connections and memory rings' records, and the
//! connection tracker they feed: any bytes, as the ring hands them over.
//! Input: records of `len u16 LE, bytes`, each the ring's item.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pipelens::{
    connections::{self, tracker::ConnectionTracker},
    memory::probes::{self, Record},
};

fuzz_target!(|input: &[u8]| {
    let mut tracker = ConnectionTracker::new();
    let mut rest = input;
    while rest.len() >= 2 {
        let n = usize::from(u16::from_le_bytes([rest[0], rest[1]]));
        let item = &rest[2..(2 + n).min(rest.len())];
        rest = &rest[2 + item.len()..];
        if let Some(ev) = connections::decode(item) {
            tracker.handle(&ev);
        }
        match probes::parse(item) {
            Some(Record::Sample(head, stack)) => {
                assert!(stack.len() + size_of_val(&head) == item.len());
            }
            Some(Record::Note(_)) | None => {}
        }
    }
    let _ = tracker.summary();
});
