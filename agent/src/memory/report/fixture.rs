//! The profile every format is tested on: known frames and stacks.

use std::time::Duration;

use crate::memory::profile::{
    ALLOC_OBJECTS, ALLOC_SPACE, Frame, INUSE_OBJECTS, INUSE_SPACE, Profile, Stack,
};

pub(super) const MIB: i64 = 1 << 20;
pub(super) const KIB: i64 = 1 << 10;
pub(super) const LIBC: u64 = 0x7f00_0000_0000;
pub(super) const APP: u64 = 0x5555_0000_0000;
pub(super) const PLUGIN: u64 = 0x7f10_0000_0000;

pub(super) fn frame(
    base: u64,
    module: &str,
    offset: u64,
    function: Option<&str>,
    place: Option<(&str, u32)>,
    inlined: bool,
) -> Frame {
    Frame {
        address: base + offset,
        module: module.into(),
        module_offset: offset,
        function: function.map(Into::into),
        file: place.map(|(f, _)| f.into()),
        line: place.map(|(_, l)| l),
        inlined,
    }
}

// Indices into `synthetic().frames`.
pub(super) const MALLOC: usize = 0;
pub(super) const RUST_ALLOC: usize = 1;
pub(super) const READ_HEADER: usize = 2; // inlined into LOAD
pub(super) const LOAD: usize = 3;
pub(super) const MAIN: usize = 4;
pub(super) const START: usize = 5;
pub(super) const PLUGIN_STRIPPED: usize = 6;
pub(super) const CACHE_INSERT: usize = 7;
pub(super) const WORKER: usize = 8;
pub(super) const MAIN_OTHER_LINE: usize = 9;
pub(super) const CALLOC: usize = 10;
pub(super) const RUST_ALLOC_ZEROED: usize = 11;
pub(super) const GROW_ONE: usize = 12;

/// Known stacks: an inlined frame, a stripped frame, a truncated
/// stack, allocator plumbing from libc and Rust, two stacks that fold
/// the same, a stack that is all plumbing and one without values.
pub(super) fn synthetic() -> Profile {
    let frames = vec![
        frame(LIBC, "libc.so.6", 0xa_5100, Some("malloc"), None, false),
        frame(APP, "app", 0x1200, Some("__rust_alloc"), None, false),
        frame(
            APP,
            "app",
            0x2400,
            Some("app::parse::read_header"),
            Some(("src/parse.rs", 12)),
            true,
        ),
        frame(
            APP,
            "app",
            0x2400,
            Some("app::parse::load"),
            Some(("src/parse.rs", 40)),
            false,
        ),
        frame(
            APP,
            "app",
            0x3000,
            Some("app::main"),
            Some(("src/main.rs", 7)),
            false,
        ),
        frame(
            LIBC,
            "libc.so.6",
            0x2_9d90,
            Some("__libc_start_call_main"),
            None,
            false,
        ),
        frame(PLUGIN, "libplugin.so", 0x4567, None, None, false),
        frame(
            APP,
            "app",
            0x5000,
            Some("app::cache::insert"),
            Some(("src/cache.rs", 88)),
            false,
        ),
        frame(
            APP,
            "app",
            0x6000,
            Some("app::worker<[u8; 4]>"),
            Some(("src/worker.rs", 3)),
            false,
        ),
        frame(
            APP,
            "app",
            0x3050,
            Some("app::main"),
            Some(("src/main.rs", 9)),
            false,
        ),
        frame(LIBC, "libc.so.6", 0xa_6000, Some("calloc"), None, false),
        frame(APP, "app", 0x1280, Some("__rust_alloc_zeroed"), None, false),
        frame(
            APP,
            "app",
            0x1400,
            Some("alloc::raw_vec::RawVecInner<A>::grow_one"),
            None,
            false,
        ),
    ];
    let stack = |frames: &[usize], values: [i64; 4], truncated: bool| Stack {
        frames: frames.to_vec(),
        values: values.to_vec(),
        truncated,
    };
    Profile {
        pid: 4242,
        process: "app".into(),
        mode: "allocs",
        start_unix_nanos: 1_700_000_000_000_000_000,
        duration: Duration::from_secs(10),
        value_types: vec![ALLOC_SPACE, ALLOC_OBJECTS, INUSE_SPACE, INUSE_OBJECTS],
        sample_mean_bytes: 512 * 1024,
        frames,
        stacks: vec![
            stack(
                &[MALLOC, RUST_ALLOC, READ_HEADER, LOAD, MAIN, START],
                [6 * MIB, 3, MIB, 1],
                false,
            ),
            stack(
                &[MALLOC, PLUGIN_STRIPPED, MAIN, START],
                [3 * MIB, 2, 0, 0],
                false,
            ),
            stack(
                &[MALLOC, RUST_ALLOC, GROW_ONE, CACHE_INSERT, WORKER],
                [MIB, 10, 512 * KIB, 5],
                true,
            ),
            // Prints like the first stack in folded output: only the
            // line in main differs.
            stack(
                &[
                    MALLOC,
                    RUST_ALLOC,
                    READ_HEADER,
                    LOAD,
                    MAIN_OTHER_LINE,
                    START,
                ],
                [2 * MIB, 1, 0, 0],
                false,
            ),
            stack(
                &[CALLOC, RUST_ALLOC_ZEROED, START],
                [512 * KIB, 1, 0, 0],
                false,
            ),
            stack(&[MALLOC, MAIN, START], [0, 0, 0, 0], false),
        ],
        notes: vec!["the process exited before the end".into()],
    }
}
