//! The functions of the allocators pipelens knows, and the attach cookie
//! ([`call`](pipelens_common::memory::call)) of each.
//!
//! Every allocator present is probed: a process linked with glibc that
//! preloads jemalloc has both mapped, but a given call runs only one of
//! them. What must not happen is one call passing two probes, which would
//! count it twice. So the lists below hold the functions that calls funnel
//! into and leave out the wrappers that call one of them (each says what
//! it leaves out, checked against the disassembly of Debian 12's glibc
//! 2.36, jemalloc 5.3, mimalloc 2.0.9 and gperftools 2.10), and a function
//! that does nothing but jump to another probed one (compilers fold
//! identical functions into such jumps, libraries forward through their
//! PLT) is not probed itself: see [`forwards_to`](super::elf::forwards_to).
//!
//! One nesting is left that only the kernel side can tell apart: glibc's
//! `realloc` jumps to `malloc` when given a null pointer (and calls it to
//! move a block it had mmapped), and calls `free` when given size 0.

use std::fmt;

use pipelens_common::memory::call::{
    CALLOC, FREE, POSIX_MEMALIGN, REALLOC, REALLOCARRAY, SIZE_ARG0 as SIZE0, SIZE_ARG1 as SIZE1,
};

/// An allocator implementation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Family {
    Glibc,
    Jemalloc,
    Mimalloc,
    Tcmalloc,
}

impl Family {
    pub fn name(self) -> &'static str {
        match self {
            Family::Glibc => "glibc",
            Family::Jemalloc => "jemalloc",
            Family::Mimalloc => "mimalloc",
            Family::Tcmalloc => "tcmalloc",
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

type Table = &'static [(&'static str, u64)];

/// glibc, in `libc.so.6` or a statically linked executable.
///
/// Left out: `reallocarray`, which checks the product and jumps to
/// `realloc` through the PLT (glibc 2.36), so `realloc`'s probe already
/// sees it, with the product as its size.
const GLIBC: Table = &[
    ("malloc", SIZE0),
    ("calloc", CALLOC),
    ("realloc", REALLOC),
    ("free", FREE),
    ("posix_memalign", POSIX_MEMALIGN),
    ("aligned_alloc", SIZE1),
    ("memalign", SIZE1),
    ("valloc", SIZE0),
    ("pvalloc", SIZE0),
];

/// jemalloc's API, unprefixed in `libjemalloc.so`, behind `je_` when built
/// with that prefix (Redis) and `_rjem_` in Rust's tikv-jemallocator.
///
/// Left out: `xallocx`, which resizes in place and never moves or returns
/// a pointer (its growth is not an allocation the samplers could follow);
/// `nallocx` and `sallocx`, which allocate nothing.
const JEMALLOC: Table = &[
    ("malloc", SIZE0),
    ("calloc", CALLOC),
    ("realloc", REALLOC),
    ("free", FREE),
    ("posix_memalign", POSIX_MEMALIGN),
    ("aligned_alloc", SIZE1),
    ("memalign", SIZE1),
    ("valloc", SIZE0),
    ("pvalloc", SIZE0),
    ("mallocx", SIZE0),
    ("rallocx", REALLOC),
    ("sdallocx", FREE),
    ("dallocx", FREE),
];

/// C++ `operator new` without alignment: the size is the first argument.
/// An allocator library that replaces these does not go through `malloc`
/// (libstdc++'s, which does, is not probed).
const CXX_NEW: Table = &[
    ("_Znwm", SIZE0),
    ("_Znam", SIZE0),
    ("_ZnwmRKSt9nothrow_t", SIZE0),
    ("_ZnamRKSt9nothrow_t", SIZE0),
];

/// C++ `operator new` with alignment: `(size, align)`.
const CXX_NEW_ALIGNED: Table = &[
    ("_ZnwmSt11align_val_t", SIZE0),
    ("_ZnamSt11align_val_t", SIZE0),
    ("_ZnwmSt11align_val_tRKSt9nothrow_t", SIZE0),
    ("_ZnamSt11align_val_tRKSt9nothrow_t", SIZE0),
];

/// C++ `operator delete`, all with the pointer first.
const CXX_DELETE: Table = &[
    ("_ZdlPv", FREE),
    ("_ZdaPv", FREE),
    ("_ZdlPvm", FREE),
    ("_ZdaPvm", FREE),
    ("_ZdlPvRKSt9nothrow_t", FREE),
    ("_ZdaPvRKSt9nothrow_t", FREE),
    ("_ZdlPvSt11align_val_t", FREE),
    ("_ZdaPvSt11align_val_t", FREE),
    ("_ZdlPvSt11align_val_tRKSt9nothrow_t", FREE),
    ("_ZdaPvSt11align_val_tRKSt9nothrow_t", FREE),
];

/// C++ sized `operator delete` with alignment: `(ptr, size, align)`.
const CXX_DELETE_SIZED_ALIGNED: Table = &[
    ("_ZdlPvmSt11align_val_t", FREE),
    ("_ZdaPvmSt11align_val_t", FREE),
];

/// mimalloc's own API, in any module.
///
/// Left out, as they call a function listed here (in another source file
/// of mimalloc, so even a static build keeps the call): `mi_posix_memalign`,
/// `mi_memalign`, `mi_valloc`, `mi_pvalloc`, `mi_aligned_alloc`,
/// `mi_new_aligned` and `mi_new_aligned_nothrow` (all `mi_malloc_aligned`),
/// `mi_reallocarray` and `mi_reallocarr` (`mi_reallocn`), `mi_new_realloc`
/// and `mi_new_reallocn` (`mi_realloc`), `mi_cfree` (`mi_free`). Also left
/// out: the `mi_heap_*` functions, whose first argument is a heap (no
/// cookie describes them; the plain functions call them, so they would
/// nest), `mi_expand` (in place), and `mi_strdup` and its kind.
const MIMALLOC: Table = &[
    ("mi_malloc", SIZE0),
    ("mi_zalloc", SIZE0),
    ("mi_calloc", CALLOC),
    ("mi_mallocn", CALLOC),
    ("mi_malloc_small", SIZE0),
    ("mi_zalloc_small", SIZE0),
    ("mi_realloc", REALLOC),
    ("mi_reallocf", REALLOC),
    ("mi_rezalloc", REALLOC),
    ("mi_reallocn", REALLOCARRAY),
    ("mi_recalloc", REALLOCARRAY),
    ("mi_malloc_aligned", SIZE0),
    ("mi_malloc_aligned_at", SIZE0),
    ("mi_zalloc_aligned", SIZE0),
    ("mi_zalloc_aligned_at", SIZE0),
    ("mi_calloc_aligned", CALLOC),
    ("mi_calloc_aligned_at", CALLOC),
    ("mi_realloc_aligned", REALLOC),
    ("mi_realloc_aligned_at", REALLOC),
    ("mi_rezalloc_aligned", REALLOC),
    ("mi_rezalloc_aligned_at", REALLOC),
    ("mi_recalloc_aligned", REALLOCARRAY),
    ("mi_recalloc_aligned_at", REALLOCARRAY),
    ("mi_new", SIZE0),
    ("mi_new_nothrow", SIZE0),
    ("mi_new_n", CALLOC),
    ("mi_free", FREE),
    ("mi_free_size", FREE),
    ("mi_free_aligned", FREE),
    ("mi_free_size_aligned", FREE),
];

/// The standard names `libmimalloc.so` exports (aliases of `mi_malloc`
/// and the others, or forwarders to them). Left out: `posix_memalign`,
/// `memalign`, `aligned_alloc`, `valloc`, `pvalloc`, `reallocarray` and
/// `cfree`, which jump to the `mi_` wrappers left out above, and the
/// aligned `operator new`s (`mi_new_aligned`).
const MIMALLOC_PLAIN: Table = &[
    ("malloc", SIZE0),
    ("calloc", CALLOC),
    ("realloc", REALLOC),
    ("reallocf", REALLOC),
    ("free", FREE),
];

/// gperftools' tcmalloc API, in any module.
///
/// Left out: `tc_posix_memalign`, `tc_valloc` and `tc_pvalloc`, which call
/// `tc_memalign`.
const TCMALLOC: Table = &[
    ("tc_malloc", SIZE0),
    ("tc_malloc_skip_new_handler", SIZE0),
    ("tc_calloc", CALLOC),
    ("tc_realloc", REALLOC),
    ("tc_memalign", SIZE1),
    ("tc_free", FREE),
    ("tc_free_sized", FREE),
    ("tc_cfree", FREE),
    ("tc_new", SIZE0),
    ("tc_newarray", SIZE0),
    ("tc_new_nothrow", SIZE0),
    ("tc_newarray_nothrow", SIZE0),
    ("tc_new_aligned", SIZE0),
    ("tc_newarray_aligned", SIZE0),
    ("tc_new_aligned_nothrow", SIZE0),
    ("tc_newarray_aligned_nothrow", SIZE0),
    ("tc_delete", FREE),
    ("tc_deletearray", FREE),
    ("tc_delete_sized", FREE),
    ("tc_deletearray_sized", FREE),
    ("tc_delete_nothrow", FREE),
    ("tc_deletearray_nothrow", FREE),
    ("tc_delete_aligned", FREE),
    ("tc_deletearray_aligned", FREE),
    ("tc_delete_sized_aligned", FREE),
    ("tc_deletearray_sized_aligned", FREE),
    ("tc_delete_aligned_nothrow", FREE),
    ("tc_deletearray_aligned_nothrow", FREE),
];

/// The standard names a tcmalloc library or executable exports (aliases
/// of the `tc_` functions in gperftools, the only names in Google's
/// tcmalloc). Left out as above: `posix_memalign`, `valloc`, `pvalloc`.
const TCMALLOC_PLAIN: Table = &[
    ("malloc", SIZE0),
    ("calloc", CALLOC),
    ("realloc", REALLOC),
    ("memalign", SIZE1),
    ("aligned_alloc", SIZE1),
    ("free", FREE),
    ("cfree", FREE),
];

fn lookup(table: Table, name: &str) -> Option<u64> {
    table.iter().find(|(n, _)| *n == name).map(|&(_, c)| c)
}

/// The call of an unprefixed name in a module whose unprefixed allocator
/// functions belong to `family`.
fn plain_call(family: Family, name: &str) -> Option<u64> {
    let tables: &[Table] = match family {
        Family::Glibc => &[GLIBC],
        // jemalloc's aligned `new` calls `aligned_alloc` and its sized
        // aligned `delete` calls `sdallocx`.
        Family::Jemalloc => &[JEMALLOC, CXX_NEW, CXX_DELETE],
        Family::Mimalloc => &[
            MIMALLOC_PLAIN,
            CXX_NEW,
            CXX_DELETE,
            CXX_DELETE_SIZED_ALIGNED,
        ],
        Family::Tcmalloc => &[
            TCMALLOC_PLAIN,
            CXX_NEW,
            CXX_NEW_ALIGNED,
            CXX_DELETE,
            CXX_DELETE_SIZED_ALIGNED,
        ],
    };
    tables.iter().find_map(|t| lookup(t, name))
}

/// Which allocator the unprefixed functions (`malloc`, `free`, `operator
/// new`) of a module belong to, if any: by the library's file name, else
/// (the executable, a library preloaded under another name) by the
/// allocator API it also defines. `defines` tells whether the module
/// defines a function of that name.
pub fn plain_family(file_name: &str, defines: impl Fn(&str) -> bool) -> Option<Family> {
    if file_name.starts_with("libc.so")
        || (file_name.starts_with("libc-") && file_name.ends_with(".so"))
    {
        return Some(Family::Glibc);
    }
    for (prefix, family) in [
        ("libjemalloc", Family::Jemalloc),
        ("libtcmalloc", Family::Tcmalloc),
        ("libmimalloc", Family::Mimalloc),
    ] {
        if file_name.starts_with(prefix) {
            return Some(family);
        }
    }
    if !defines("malloc") {
        return None;
    }
    // tcmalloc and mimalloc also define glibc's `__libc_malloc`: the
    // allocators' own names first.
    if defines("tc_malloc") || defines("TCMallocInternalMalloc") {
        Some(Family::Tcmalloc)
    } else if defines("mallocx") {
        Some(Family::Jemalloc)
    } else if defines("mi_malloc") {
        Some(Family::Mimalloc)
    } else if defines("__libc_malloc") {
        Some(Family::Glibc)
    } else {
        // musl, a program's own malloc, or an allocator pipelens does not
        // know.
        None
    }
}

/// The allocator and attach cookie of a function named `symbol`, in a
/// module whose unprefixed functions belong to `plain` ([`plain_family`]).
/// Prefixed names (`je_`, `_rjem_`, `mi_`, `tc_`) say their allocator
/// themselves, wherever they are.
pub fn classify(symbol: &str, plain: Option<Family>) -> Option<(Family, u64)> {
    let prefixed = if let Some(rest) = symbol
        .strip_prefix("_rjem_")
        .or_else(|| symbol.strip_prefix("je_"))
    {
        lookup(JEMALLOC, rest).map(|c| (Family::Jemalloc, c))
    } else if symbol.starts_with("mi_") {
        lookup(MIMALLOC, symbol).map(|c| (Family::Mimalloc, c))
    } else if symbol.starts_with("tc_") {
        lookup(TCMALLOC, symbol).map(|c| (Family::Tcmalloc, c))
    } else {
        None
    };
    prefixed.or_else(|| {
        let family = plain?;
        plain_call(family, symbol).map(|c| (family, c))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_names() {
        let none = |_: &str| false;
        let libc = plain_family("libc.so.6", none);
        let jemalloc = plain_family("libjemalloc.so.2", none);
        assert_eq!(libc, Some(Family::Glibc));
        assert_eq!(jemalloc, Some(Family::Jemalloc));
        assert_eq!(
            plain_family("libtcmalloc_minimal.so.4", none),
            Some(Family::Tcmalloc)
        );
        assert_eq!(
            plain_family("libmimalloc.so.2", none),
            Some(Family::Mimalloc)
        );
        assert_eq!(plain_family("libc-2.31.so", none), Some(Family::Glibc));
        assert_eq!(plain_family("libcrypto.so.3", none), None);
        assert_eq!(plain_family("my-server", none), None);

        let cases = [
            ("_rjem_mallocx", None, Some((Family::Jemalloc, SIZE0))),
            ("_rjem_sdallocx", None, Some((Family::Jemalloc, FREE))),
            ("_rjem_rallocx", None, Some((Family::Jemalloc, REALLOC))),
            ("_rjem_calloc", None, Some((Family::Jemalloc, CALLOC))),
            ("_rjem_xallocx", None, None),
            ("_rjem_je_malloc_default", None, None),
            ("je_malloc", None, Some((Family::Jemalloc, SIZE0))),
            (
                "je_posix_memalign",
                libc,
                Some((Family::Jemalloc, POSIX_MEMALIGN)),
            ),
            ("mi_malloc_aligned", None, Some((Family::Mimalloc, SIZE0))),
            (
                "mi_realloc_aligned",
                None,
                Some((Family::Mimalloc, REALLOC)),
            ),
            ("mi_reallocn", None, Some((Family::Mimalloc, REALLOCARRAY))),
            ("mi_posix_memalign", None, None),
            ("mi_heap_malloc", None, None),
            ("tc_malloc", None, Some((Family::Tcmalloc, SIZE0))),
            ("tc_memalign", None, Some((Family::Tcmalloc, SIZE1))),
            ("tc_posix_memalign", None, None),
            ("malloc", jemalloc, Some((Family::Jemalloc, SIZE0))),
            ("mallocx", jemalloc, Some((Family::Jemalloc, SIZE0))),
            ("_Znwm", jemalloc, Some((Family::Jemalloc, SIZE0))),
            ("_ZnwmSt11align_val_t", jemalloc, None),
            ("malloc", libc, Some((Family::Glibc, SIZE0))),
            (
                "posix_memalign",
                libc,
                Some((Family::Glibc, POSIX_MEMALIGN)),
            ),
            ("memalign", libc, Some((Family::Glibc, SIZE1))),
            ("reallocarray", libc, None),
            ("mallocx", libc, None),
            ("_Znwm", libc, None),
            ("malloc", None, None),
            (
                "free",
                Some(Family::Tcmalloc),
                Some((Family::Tcmalloc, FREE)),
            ),
            (
                "_ZdlPvmSt11align_val_t",
                Some(Family::Tcmalloc),
                Some((Family::Tcmalloc, FREE)),
            ),
            ("posix_memalign", Some(Family::Mimalloc), None),
        ];
        for (name, plain, expected) in cases {
            assert_eq!(classify(name, plain), expected, "{name} in {plain:?}");
        }
    }

    #[test]
    fn unknown_modules_are_told_by_what_they_define() {
        let defines = |names: &'static [&'static str]| move |n: &str| names.contains(&n);
        let static_glibc = defines(&["malloc", "__libc_malloc", "main"]);
        assert_eq!(plain_family("server", static_glibc), Some(Family::Glibc));
        let tcmalloc = defines(&["malloc", "__libc_malloc", "tc_malloc"]);
        assert_eq!(plain_family("server", tcmalloc), Some(Family::Tcmalloc));
        let jemalloc = defines(&["malloc", "mallocx"]);
        assert_eq!(plain_family("libfoo.so", jemalloc), Some(Family::Jemalloc));
        let mimalloc = defines(&["malloc", "mi_malloc", "__libc_malloc"]);
        assert_eq!(plain_family("server", mimalloc), Some(Family::Mimalloc));
        // Rust with tikv-jemallocator: no unprefixed malloc of its own.
        let rjem = defines(&["_rjem_malloc", "_rjem_mallocx"]);
        assert_eq!(plain_family("server", rjem), None);
        let musl = defines(&["malloc", "free"]);
        assert_eq!(plain_family("server", musl), None);
    }
}
