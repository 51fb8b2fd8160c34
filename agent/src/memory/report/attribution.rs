//! Which frame of a stack is its allocation site: the innermost that is
//! neither allocator nor runtime plumbing.

use crate::memory::profile::{Frame, Profile, Stack};

/// How a plumbing rule matches a name.
#[derive(Clone, Copy, Debug)]
enum Rule {
    /// The whole name.
    Is(&'static str),
    /// The start of the name.
    Starts(&'static str),
}

use Rule::{Is, Starts};

impl Rule {
    fn matches(self, name: &str) -> bool {
        match self {
            Is(s) => name == s,
            Starts(s) => name.starts_with(s),
        }
    }
}

/// Modules whose every frame is plumbing: the C runtime and dynamic
/// loader, the C++ runtime and unwinder, the allocator libraries. Matched
/// on the start of the module's file name (`libc.so.6`,
/// `ld-linux-x86-64.so.2`, `libjemalloc.so.2`).
const PLUMBING_MODULES: &[&str] = &[
    "libc.so",
    "ld-linux",
    "ld-musl", // musl's libc and loader are one file
    "libstdc++",
    "libgcc_s",
    "libjemalloc",
    "libtcmalloc",
    "libmimalloc",
];

/// Functions that are plumbing in whatever module they are linked into
/// (allocators and Rust's allocation layers are usually linked
/// statically). Rust paths also match behind the `<` of a qualified path
/// (`<alloc::alloc::Global as core::alloc::Allocator>::allocate`).
const PLUMBING_FUNCTIONS: &[(&str, &[Rule])] = &[
    (
        "C allocator API",
        &[
            Is("malloc"),
            Is("calloc"),
            Is("realloc"),
            Is("reallocarray"),
            Is("free"),
            Is("posix_memalign"),
            Is("aligned_alloc"),
            Is("memalign"),
            Is("valloc"),
            Is("pvalloc"),
        ],
    ),
    (
        "glibc malloc internals",
        &[Starts("_int_"), Starts("__libc_"), Is("sysmalloc")],
    ),
    ("jemalloc", &[Starts("_rjem_"), Starts("je_")]),
    ("mimalloc", &[Starts("mi_"), Starts("_mi_")]),
    ("tcmalloc", &[Starts("tc_"), Starts("tcmalloc::")]),
    ("C++ allocation", &[Starts("operator new")]),
    (
        "memory fill and copy",
        &[
            Is("memset"),
            Is("memcpy"),
            Is("memmove"),
            Starts("__memset_"),
            Starts("__memmove_"),
            Starts("__memcpy_"),
        ],
    ),
    (
        "Rust allocator shims",
        &[
            Starts("__rust_alloc"), // and __rust_alloc_zeroed
            Starts("__rust_realloc"),
            Starts("__rdl_"),
            Starts("__rg_"),
            // The same shims as recent rustc names them (v0 mangling).
            Starts("__rustc::"),
        ],
    ),
    (
        "Rust allocation layers",
        &[
            Starts("std::alloc::"),
            Starts("alloc::alloc::"),
            Starts("alloc::raw_vec::"),
            Starts("core::alloc::"),
            Starts("<tikv_jemallocator::Jemalloc as core::alloc::global::GlobalAlloc>::"),
            Starts("<std::alloc::System as core::alloc::global::GlobalAlloc>::"),
        ],
    ),
];

/// Whether `frame` is allocator or runtime plumbing rather than the code
/// that asked for memory (see [`PLUMBING_MODULES`], [`PLUMBING_FUNCTIONS`]).
pub fn is_plumbing(frame: &Frame) -> bool {
    if PLUMBING_MODULES.iter().any(|m| frame.module.starts_with(m)) {
        return true;
    }
    let Some(name) = frame.function.as_deref() else {
        return false;
    };
    let bare = name.strip_prefix('<').unwrap_or(name);
    PLUMBING_FUNCTIONS
        .iter()
        .flat_map(|(_, rules)| rules.iter())
        .any(|r| r.matches(name) || r.matches(bare))
}

/// The allocation site of `stack`, as an index into `profile.frames`: its
/// innermost frame that is not plumbing ([`is_plumbing`]) nor an inlined
/// function known only by its short name, or its outermost
/// frame when every frame is.
///
/// Panics on a stack without frames.
pub fn site(profile: &Profile, stack: &Stack) -> usize {
    let at = site_position(profile, stack).expect("the allocation site of a stack without frames");
    stack.frames[at]
}

/// Where in `stack.frames` its allocation site is (`None`: no frames).
pub(super) fn site_position(profile: &Profile, stack: &Stack) -> Option<usize> {
    stack
        .frames
        .iter()
        // DWARF names inlined functions without their path: an inlined
        // `std::alloc::alloc` reads as plain `alloc`, which no rule can
        // tell from user code. Such a frame is not the site; the function
        // it was inlined into is.
        .position(|&i| {
            let f = &profile.frames[i];
            let unqualified = f.inlined && f.function.as_deref().is_some_and(|n| !n.contains("::"));
            !unqualified && !is_plumbing(f)
        })
        .or(stack.frames.len().checked_sub(1))
}

#[cfg(test)]
mod tests {
    use super::super::fixture::{
        APP, CACHE_INSERT, MAIN, PLUGIN_STRIPPED, READ_HEADER, START, frame, synthetic,
    };
    use super::*;

    #[test]
    fn site_skips_allocator_and_runtime_plumbing() {
        let p = synthetic();
        let sites: Vec<usize> = p.stacks.iter().map(|s| site(&p, s)).collect();
        assert_eq!(
            sites,
            [
                READ_HEADER,     // inlined frame under malloc and __rust_alloc
                PLUGIN_STRIPPED, // stripped, but not plumbing
                CACHE_INSERT,    // under alloc::raw_vec
                READ_HEADER,
                START, // all plumbing: the outermost frame
                MAIN,
            ]
        );
    }

    #[test]
    fn plumbing_rules() {
        let named = |module: &str, name: &str| frame(APP, module, 0x10, Some(name), None, false);
        for name in [
            "malloc",
            "_int_malloc",
            "__libc_calloc",
            "_rjem_malloc",
            "je_malloc_default",
            "mi_malloc_aligned",
            "tc_new",
            "operator new(unsigned long)",
            "operator new[](unsigned long)",
            "__rust_alloc",
            "__rust_alloc_zeroed",
            "__rust_realloc",
            "__rdl_alloc",
            "__rg_alloc",
            "std::alloc::default_alloc_error_hook",
            "alloc::alloc::exchange_malloc",
            "alloc::raw_vec::finish_grow",
            "<alloc::alloc::Global as core::alloc::Allocator>::allocate",
            "<alloc::raw_vec::RawVecInner>::grow_one",
            "<tikv_jemallocator::Jemalloc as core::alloc::global::GlobalAlloc>::alloc",
            "<std::alloc::System as core::alloc::global::GlobalAlloc>::alloc_zeroed",
            "core::alloc::layout::Layout::array",
            "memset",
            "__memset_avx2_unaligned_erms",
            "__memmove_avx_unaligned_erms",
        ] {
            assert!(is_plumbing(&named("app", name)), "{name}");
        }
        for module in [
            "libc.so.6",
            "ld-linux-x86-64.so.2",
            "libstdc++.so.6",
            "libjemalloc.so.2",
            "libtcmalloc.so.4",
            "libmimalloc.so.2",
            "libgcc_s.so.1",
        ] {
            assert!(is_plumbing(&named(module, "anything")), "{module}");
        }
        for name in [
            "app::main",
            "mallocate_things",
            "alloc::vec::Vec<T,A>::push",
            "<app::Pool as core::ops::Drop>::drop",
            "libcache::get",
        ] {
            assert!(!is_plumbing(&named("app", name)), "{name}");
        }
        assert!(!is_plumbing(&named("libcrypto.so.3", "EVP_CIPHER_CTX_new")));
        assert!(!is_plumbing(&frame(APP, "app", 0x10, None, None, false)));
    }
}
