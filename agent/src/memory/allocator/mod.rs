//! Which allocator a process really calls, and where to put uprobes on it.
//!
//! The executable and every mapped library are read for the functions of
//! the allocators pipelens knows (glibc, jemalloc, mimalloc, tcmalloc),
//! in both symbol tables: `.dynsym` (what a library exports) and
//! `.symtab` (the only place a statically linked allocator shows, e.g.
//! Rust's tikv-jemallocator as `_rjem_malloc`). Each function found
//! becomes a uprobe at its file offset, with the attach cookie
//! ([`call`](pipelens_common::memory::call)) that says where its size and
//! pointer arguments are.
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
//! PLT) is not probed itself: see [`forwards_to`].
//!
//! One nesting is left that only the kernel side can tell apart: glibc's
//! `realloc` jumps to `malloc` when given a null pointer (and calls it to
//! move a block it had mmapped), and calls `free` when given size 0.

use std::{
    collections::{HashMap, HashSet},
    fmt, fs, io,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use log::{debug, warn};
use object::{
    Endianness, FileKind, Object as _,
    elf::{self, FileHeader64},
    read::{
        RelocationTarget,
        elf::{ElfFile64, FileHeader as _, ProgramHeader as _, Sym as _},
    },
};
use pipelens_common::memory::call::{
    CALLOC, FREE, POSIX_MEMALIGN, REALLOC, REALLOCARRAY, SIZE_ARG0 as SIZE0, SIZE_ARG1 as SIZE1,
};
use thiserror::Error;

use super::maps::{MapsError, Module, ProcessMaps};

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

/// One allocator function of a process, and where to attach to it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AllocProbe {
    pub family: Family,
    /// The function's name in the module (of its aliases, the plainest).
    pub symbol: String,
    /// The attach cookie: one of [`call`](pipelens_common::memory::call).
    pub call: u64,
    /// The file to attach the uprobe to, as this agent reaches it (through
    /// `/proc/<pid>/root` for a process in a container).
    pub module: PathBuf,
    /// Offset of the function's first instruction in that file.
    pub file_offset: u64,
}

/// Why one module could not be read.
#[derive(Debug, Error)]
pub enum ModuleError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("not an ELF file")]
    NotElf,
    #[error("a 32-bit ELF file (the samplers read 64-bit argument registers)")]
    Elf32,
    #[error("malformed ELF file: {0}")]
    Elf(#[from] object::Error),
    #[error(
        "the file there is not the one the process mapped (inode {found}, mapped {mapped}); \
         its root is out of reach"
    )]
    OtherFile { found: u64, mapped: u64 },
}

#[derive(Debug, Error)]
pub enum AllocatorError {
    #[error("process {pid} does not exist")]
    NoProcess { pid: u32 },
    #[error(transparent)]
    Maps(MapsError),
    #[error("cannot read {path}, the executable of process {pid}: {source}")]
    Executable {
        pid: u32,
        path: PathBuf,
        source: ModuleError,
    },
    #[error(
        "no allocator pipelens knows (glibc, jemalloc, mimalloc, tcmalloc) in process {pid}; \
         it looked in {}. The executable may be statically linked and stripped of its symbols, \
         or use an allocator pipelens does not know",
        looked_in(.modules)
    )]
    NoAllocator { pid: u32, modules: Vec<String> },
}

fn looked_in(modules: &[String]) -> String {
    if modules.is_empty() {
        "no module (the process maps no code)".to_owned()
    } else {
        modules.join(", ")
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

/// Finds the allocator functions process `pid` has mapped, in its
/// executable and in every library.
pub fn find(pid: u32) -> Result<Vec<AllocProbe>, AllocatorError> {
    let maps = ProcessMaps::read(pid).map_err(|e| match e {
        MapsError::NoProcess { pid } => AllocatorError::NoProcess { pid },
        e => AllocatorError::Maps(e),
    })?;
    // The executable as the maps print it (` (deleted)` included).
    let exe = match fs::read_link(format!("/proc/{pid}/exe")) {
        Ok(target) => Some(target.to_string_lossy().into_owned()),
        Err(e) => {
            if !Path::new(&format!("/proc/{pid}")).exists() {
                return Err(AllocatorError::NoProcess { pid });
            }
            // A kernel thread has none; without privileges it is hidden.
            debug!("process {pid}: no executable link: {e}");
            None
        }
    };
    let mut modules = maps.modules();
    let printed = |m: &Module| {
        if m.deleted {
            format!("{} (deleted)", m.path)
        } else {
            m.path.clone()
        }
    };
    if let Some(exe) = &exe
        && !modules.iter().any(|m| printed(m) == *exe)
    {
        // Not seen mapped (an unusual loader): read it all the same.
        let (path, deleted) = match exe.strip_suffix(" (deleted)") {
            Some(p) => (p, true),
            None => (exe.as_str(), false),
        };
        modules.insert(
            0,
            Module {
                path: path.to_owned(),
                inode: 0,
                deleted,
                start: 0,
                segments: Vec::new(),
            },
        );
    }

    let mut probes = Vec::new();
    let mut looked_in = Vec::new();
    for module in &modules {
        let is_exe = exe.as_deref() == Some(printed(module).as_str());
        let open = if is_exe && (module.deleted || module.segments.is_empty()) {
            PathBuf::from(format!("/proc/{pid}/exe"))
        } else {
            module.open_path(maps.pid)
        };
        looked_in.push(module.path.clone());
        match scan(&open, module) {
            Ok(found) => probes.extend(found.into_iter().map(|f| AllocProbe {
                family: f.family,
                symbol: f.name,
                call: f.call,
                module: open.clone(),
                file_offset: f.file_offset,
            })),
            Err(source) if is_exe => {
                return Err(AllocatorError::Executable {
                    pid,
                    path: open,
                    source,
                });
            }
            Err(ModuleError::NotElf) => debug!("process {pid}: {} is not an ELF file", module.path),
            Err(e) => warn!(
                "process {pid}: skipping {} ({}): {e}",
                module.path,
                open.display()
            ),
        }
    }
    // A library mapped twice (two `dlmopen` namespaces) is one file.
    probes.sort_by(|a, b| (&a.module, a.file_offset).cmp(&(&b.module, b.file_offset)));
    probes.dedup_by(|a, b| a.module == b.module && a.file_offset == b.file_offset);
    if probes.is_empty() {
        return Err(AllocatorError::NoAllocator {
            pid,
            modules: looked_in,
        });
    }
    Ok(probes)
}

/// Length of a leading `test %rdi,%rdi; je …` (x86-64), the NULL check
/// `free` starts with in glibc. A uprobe on `test` is single-stepped out of
/// line, which costs about 9 µs per call on these machines, while the
/// instruction after the check (a `push`) is emulated at a tenth of that;
/// past the check `%rdi` still holds the pointer, and `free(NULL)` frees
/// nothing we follow.
fn null_check_len(code: &[u8]) -> Option<u64> {
    match code {
        [0x48, 0x85, 0xff, 0x74, _, ..] => Some(5),
        [0x48, 0x85, 0xff, 0x0f, 0x84, _, _, _, _, ..] => Some(9),
        _ => None,
    }
}

/// An allocator function found in one module.
#[derive(Debug)]
struct Found {
    family: Family,
    name: String,
    call: u64,
    file_offset: u64,
}

/// Reads one module for allocator functions.
fn scan(path: &Path, module: &Module) -> Result<Vec<Found>, ModuleError> {
    let file = fs::File::open(path)?;
    // The file at the plain path is another one when the process is in a
    // container whose root this agent cannot reach.
    let found = file.metadata()?.ino();
    if module.inode != 0 && found != module.inode && !path.starts_with("/proc") {
        return Err(ModuleError::OtherFile {
            found,
            mapped: module.inode,
        });
    }
    // Mapped rather than read: an executable with debug information can
    // be hundreds of megabytes, of which only the headers and the symbol
    // and string tables are touched.
    // SAFETY: the mapping is read-only and private. The file is mapped by
    // the process being profiled, so it is not expected to shrink while we
    // read it (replacing a library, as package managers do, writes a new
    // file and renames it); if it did, reading past its end would raise
    // SIGBUS.
    let data = unsafe { memmap2::Mmap::map(&file) }?;
    functions(&data, module.file_name())
}

/// The allocator functions defined in an ELF file whose name is
/// `file_name`.
fn functions(data: &[u8], file_name: &str) -> Result<Vec<Found>, ModuleError> {
    match FileKind::parse(data) {
        Ok(FileKind::Elf64) => {}
        Ok(FileKind::Elf32) => return Err(ModuleError::Elf32),
        _ => return Err(ModuleError::NotElf),
    }
    let elf = ElfFile64::<Endianness>::parse(data)?;
    let endian = elf.endian();

    // Defined functions of both tables (most appear in both). Undefined
    // ones are imports; STT_GNU_IFUNC ones are resolvers, not the
    // function that runs.
    let mut defined: Vec<(&str, u64)> = Vec::new();
    for table in [elf.elf_dynamic_symbol_table(), elf.elf_symbol_table()] {
        for sym in table.iter() {
            if sym.st_type() != elf::STT_FUNC
                || sym.is_undefined(endian)
                || sym.is_absolute(endian)
                || sym.st_value(endian) == 0
            {
                continue;
            }
            let Ok(name) = table.symbol_name(endian, sym) else {
                continue;
            };
            if let Ok(name) = std::str::from_utf8(name) {
                defined.push((name, sym.st_value(endian)));
            }
        }
    }
    let plain = plain_family(file_name, |n| defined.iter().any(|(d, _)| *d == n));

    // By address: aliases (`malloc` and `tc_malloc`, `free` and `_ZdlPv`)
    // are one function, probed once, under its plainest name.
    let mut by_addr: HashMap<u64, (&str, Family, u64)> = HashMap::new();
    for &(name, addr) in &defined {
        let Some((family, call)) = classify(name, plain) else {
            continue;
        };
        match by_addr.get_mut(&addr) {
            None => {
                by_addr.insert(addr, (name, family, call));
            }
            Some(kept) => {
                let first = rank(name) < rank(kept.0);
                if (kept.1, kept.2) != (family, call) {
                    warn!(
                        "{file_name}: {name} and {} are one function at {addr:#x} but not the \
                         same call; probing it as {}",
                        kept.0,
                        if first { name } else { kept.0 }
                    );
                }
                if first {
                    *kept = (name, family, call);
                }
            }
        }
    }

    if by_addr.is_empty() {
        return Ok(Vec::new());
    }
    let code = Code::new(&elf, data);
    let probed: HashSet<u64> = by_addr.keys().copied().collect();
    let mut found = Vec::new();
    for (&addr, &(name, family, call)) in &by_addr {
        if let Some(target) = forwards_to(&code, addr, &probed) {
            debug!("{file_name}: {name} only jumps to the function at {target:#x}, probed there");
            continue;
        }
        let Some(mut file_offset) = code.file_offset(addr) else {
            debug!("{file_name}: {name} at {addr:#x} is in no loaded segment");
            continue;
        };
        if call == FREE
            && let Some(skip) = code.bytes(addr, 9).and_then(null_check_len)
        {
            debug!("{file_name}: {name} probed after its NULL check (+{skip})");
            file_offset += skip;
        }
        found.push(Found {
            family,
            name: name.to_owned(),
            call,
            file_offset,
        });
    }
    found.sort_by_key(|f| f.file_offset);
    Ok(found)
}

/// Of aliases, the name to show: a C name over a mangled or reserved one,
/// then the shortest (`free` over `tc_free` and `_ZdlPv`).
fn rank(name: &str) -> (bool, usize, &str) {
    (name.starts_with('_'), name.len(), name)
}

/// What is needed to follow jumps in the code of one ELF file.
struct Code<'a> {
    data: &'a [u8],
    machine: elf::Machine,
    /// `(p_vaddr, p_filesz, p_offset)` of the loaded segments.
    loads: Vec<(u64, u64, u64)>,
    /// GOT slot → address of the function defined here that the dynamic
    /// linker writes there.
    got: HashMap<u64, u64>,
}

impl<'a> Code<'a> {
    fn new(elf: &ElfFile64<'a, Endianness>, data: &'a [u8]) -> Self {
        let endian = elf.endian();
        let loads = elf
            .elf_program_headers()
            .iter()
            .filter(|ph| ph.p_type(endian) == elf::PT_LOAD)
            .map(|ph| (ph.p_vaddr(endian), ph.p_filesz(endian), ph.p_offset(endian)))
            .collect();
        let dynsyms = elf.elf_dynamic_symbol_table();
        let mut got = HashMap::new();
        for (slot, reloc) in elf.dynamic_relocations().into_iter().flatten() {
            let RelocationTarget::Symbol(index) = reloc.target() else {
                continue;
            };
            let Ok(sym) = dynsyms.symbol(index) else {
                continue;
            };
            if !sym.is_undefined(endian) && sym.st_value(endian) != 0 {
                got.insert(slot, sym.st_value(endian));
            }
        }
        let header: &FileHeader64<Endianness> = elf.elf_header();
        Code {
            data,
            machine: header.e_machine(endian),
            loads,
            got,
        }
    }

    /// Where the byte at virtual address `vaddr` is in the file: in the
    /// PT_LOAD segment that holds it, `vaddr - p_vaddr + p_offset`.
    fn file_offset(&self, vaddr: u64) -> Option<u64> {
        self.loads
            .iter()
            .find(|&&(start, size, _)| start <= vaddr && vaddr - start < size)
            .map(|&(start, _, offset)| vaddr - start + offset)
    }

    fn bytes(&self, vaddr: u64, len: usize) -> Option<&'a [u8]> {
        // Up to `len`: a short function may end the file.
        let offset = usize::try_from(self.file_offset(vaddr)?).ok()?;
        let end = offset.saturating_add(len).min(self.data.len());
        self.data.get(offset..end)
    }

    /// If the code at `vaddr` starts with an unconditional jump, where it
    /// goes: a direct jump, or one through a GOT slot (a PLT entry, or a
    /// call compiled with `-fno-plt`) to a function defined in this file.
    fn jump(&self, vaddr: u64) -> Option<u64> {
        match self.machine {
            elf::EM_X86_64 => x86_64_jump(self.bytes(vaddr, 16)?, vaddr, |slot| {
                self.got.get(&slot).copied()
            }),
            elf::EM_AARCH64 => aarch64_jump(self.bytes(vaddr, 12)?, vaddr, |slot| {
                self.got.get(&slot).copied()
            }),
            _ => None,
        }
    }
}

/// If the function at `addr` does nothing but jump (possibly through other
/// jumps and PLT entries) to another function of `probed`, that function.
/// Compilers make such forwarders of identical functions (jemalloc's
/// `operator new[]` jumps to `operator new`), and libraries of their thin
/// wrappers (mimalloc's `mi_free_size` jumps to `mi_free` through its
/// PLT): probing both would count each call twice.
fn forwards_to(code: &Code<'_>, addr: u64, probed: &HashSet<u64>) -> Option<u64> {
    let mut at = addr;
    for _ in 0..4 {
        at = code.jump(at)?;
        if at != addr && probed.contains(&at) {
            return Some(at);
        }
    }
    None
}

/// An unconditional jump at the start of x86-64 code: `jmp rel32`,
/// `jmp rel8`, or `jmp *disp32(%rip)` (with a `bnd` prefix in PLTs built
/// for MPX), possibly after an `endbr64`.
fn x86_64_jump(code: &[u8], vaddr: u64, got: impl Fn(u64) -> Option<u64>) -> Option<u64> {
    const ENDBR64: [u8; 4] = [0xf3, 0x0f, 0x1e, 0xfa];
    let (code, pc) = match code.strip_prefix(&ENDBR64) {
        Some(rest) => (rest, vaddr + 4),
        None => (code, vaddr),
    };
    let rel32 = |b: &[u8]| i64::from(i32::from_le_bytes([b[0], b[1], b[2], b[3]]));
    match code {
        [0xe9, rest @ ..] if rest.len() >= 4 => Some(pc.wrapping_add_signed(5 + rel32(rest))),
        [0xeb, rel, ..] => Some(pc.wrapping_add_signed(2 + i64::from(*rel as i8))),
        [0xff, 0x25, rest @ ..] if rest.len() >= 4 => got(pc.wrapping_add_signed(6 + rel32(rest))),
        [0xf2, 0xff, 0x25, rest @ ..] if rest.len() >= 4 => {
            got(pc.wrapping_add_signed(7 + rel32(rest)))
        }
        _ => None,
    }
}

/// An unconditional jump at the start of AArch64 code: `b label`, or a PLT
/// entry (`adrp x16, page; ldr x17, [x16, #off]; ...; br x17`), possibly
/// after a `bti c`.
fn aarch64_jump(code: &[u8], vaddr: u64, got: impl Fn(u64) -> Option<u64>) -> Option<u64> {
    const BTI_C: u32 = 0xd503_245f;
    let word = |i: usize| -> Option<u32> {
        let b = code.get(i * 4..i * 4 + 4)?;
        Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    let (first, pc) = if word(0)? == BTI_C {
        (1, vaddr + 4)
    } else {
        (0, vaddr)
    };
    let insn = word(first)?;
    if insn & 0xfc00_0000 == 0x1400_0000 {
        // b: imm26, in words, signed.
        let imm = i64::from(((insn << 6) as i32) >> 6) * 4;
        return Some(pc.wrapping_add_signed(imm));
    }
    // adrp x16: immhi:immlo, in pages, signed.
    if insn & 0x9f00_001f != 0x9000_0010 {
        return None;
    }
    let pages = ((insn >> 5) & 0x7_ffff) << 2 | (insn >> 29) & 3;
    let pages = i64::from(((pages << 11) as i32) >> 11);
    let page = (pc & !0xfff).wrapping_add_signed(pages << 12);
    // ldr x17, [x16, #imm12 * 8]
    let ldr = word(first + 1)?;
    if ldr & 0xffc0_03ff != 0xf940_0211 {
        return None;
    }
    got(page + u64::from((ldr >> 10) & 0xfff) * 8)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Command, Stdio};

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

    #[test]
    fn skips_a_leading_null_check() {
        // glibc 2.36 free: test %rdi,%rdi; je rel32; push %rbp
        let free = [0x48, 0x85, 0xff, 0x0f, 0x84, 0xbf, 0, 0, 0, 0x55];
        assert_eq!(null_check_len(&free), Some(9));
        assert_eq!(
            null_check_len(&[0x48, 0x85, 0xff, 0x74, 0x10, 0x55, 0, 0, 0]),
            Some(5)
        );
        // malloc: push %r12
        assert_eq!(
            null_check_len(&[0x41, 0x54, 0x55, 0x53, 0, 0, 0, 0, 0]),
            None
        );
    }

    #[test]
    fn decodes_jumps() {
        let none = |_| None;
        // jmp rel32, forward and back.
        assert_eq!(
            x86_64_jump(&[0xe9, 0x10, 0, 0, 0], 0x1000, none),
            Some(0x1015)
        );
        assert_eq!(
            x86_64_jump(&[0xe9, 0xfb, 0xff, 0xff, 0xff], 0x1000, none),
            Some(0x1000)
        );
        // endbr64; jmp rel8
        assert_eq!(
            x86_64_jump(&[0xf3, 0x0f, 0x1e, 0xfa, 0xeb, 0xfe], 0x1000, none),
            Some(0x1004)
        );
        // jmp *0x10(%rip), bnd jmp *0x10(%rip)
        let got = |slot| (slot == 0x1016).then_some(0x5000);
        assert_eq!(
            x86_64_jump(&[0xff, 0x25, 0x10, 0, 0, 0], 0x1000, got),
            Some(0x5000)
        );
        let got = |slot| (slot == 0x1017).then_some(0x5000);
        assert_eq!(
            x86_64_jump(&[0xf2, 0xff, 0x25, 0x10, 0, 0, 0], 0x1000, got),
            Some(0x5000)
        );
        // push %rbp
        assert_eq!(x86_64_jump(&[0x55, 0x48, 0x89, 0xe5], 0x1000, none), None);
        assert_eq!(x86_64_jump(&[0xe9, 0x10], 0x1000, none), None, "cut short");

        let words = |w: &[u32]| w.iter().flat_map(|w| w.to_le_bytes()).collect::<Vec<_>>();
        // b .+8, b .-4
        assert_eq!(
            aarch64_jump(&words(&[0x1400_0002]), 0x1000, none),
            Some(0x1008)
        );
        assert_eq!(
            aarch64_jump(&words(&[0x17ff_ffff]), 0x1000, none),
            Some(0xffc)
        );
        // bti c; adrp x16, .+0x10000; ldr x17, [x16, #0x18]; add; br x17
        let plt = words(&[
            0xd503_245f,
            0x9000_0090,
            0xf940_0e11,
            0x9100_6210,
            0xd61f_0220,
        ]);
        let got = |slot| (slot == 0x1_1018).then_some(0x7000);
        assert_eq!(aarch64_jump(&plt, 0x1000, got), Some(0x7000));
        // stp x29, x30, [sp, #-16]!
        assert_eq!(aarch64_jump(&words(&[0xa9bf_7bfd]), 0x1000, none), None);
    }

    /// `nm -D --defined-only` of a library: name → address.
    fn nm_dynamic(path: &Path) -> HashMap<String, u64> {
        let out = Command::new("nm")
            .args(["-D", "--defined-only"])
            .arg(path)
            .output()
            .expect("nm (binutils) is needed to check file offsets");
        assert!(out.status.success(), "nm {}", path.display());
        String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .filter_map(|l| {
                let mut f = l.split_whitespace();
                let addr = u64::from_str_radix(f.next()?, 16).ok()?;
                let name = f.nth(1)?.split('@').next()?;
                Some((name.to_owned(), addr))
            })
            .collect()
    }

    /// `readelf -lW`'s LOAD lines: (offset, vaddr, filesz).
    fn readelf_loads(path: &Path) -> Vec<(u64, u64, u64)> {
        let out = Command::new("readelf")
            .arg("-lW")
            .arg(path)
            .output()
            .unwrap();
        assert!(out.status.success());
        let hex = |s: &str| u64::from_str_radix(s.trim_start_matches("0x"), 16).unwrap();
        String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .filter(|l| l.trim_start().starts_with("LOAD "))
            .map(|l| {
                let f: Vec<_> = l.split_whitespace().collect();
                (hex(f[1]), hex(f[2]), hex(f[4]))
            })
            .collect()
    }

    #[test]
    fn finds_glibc_in_this_process() {
        let pid = std::process::id();
        let probes = find(pid).unwrap();
        let maps = ProcessMaps::read(pid).unwrap();
        let libc = maps
            .modules()
            .into_iter()
            .find(|m| m.file_name() == "libc.so.6")
            .unwrap();
        let libc_path = libc.open_path(pid);

        let symbols = nm_dynamic(&libc_path);
        let loads = readelf_loads(&libc_path);
        for name in ["malloc", "free", "calloc", "realloc", "posix_memalign"] {
            let vaddr = symbols[name];
            let (offset, start, _) = *loads
                .iter()
                .find(|&&(_, start, size)| start <= vaddr && vaddr < start + size)
                .unwrap();
            let expected = vaddr - start + offset;
            let probe = probes
                .iter()
                .find(|p| p.module == libc_path && p.symbol == name)
                .unwrap_or_else(|| panic!("no probe on {name} in {probes:#?}"));
            assert_eq!(probe.family, Family::Glibc);
            // free is probed past its NULL check (`test %rdi,%rdi; je`).
            let skipped = probe.file_offset - expected;
            assert!(
                skipped == 0 || (name == "free" && (skipped == 5 || skipped == 9)),
                "{name}: {} vs {expected}",
                probe.file_offset
            );
        }
        let call_of = |name: &str| {
            probes
                .iter()
                .find(|p| p.module == libc_path && p.symbol == name)
                .map(|p| p.call)
        };
        assert_eq!(call_of("malloc"), Some(SIZE0));
        assert_eq!(call_of("calloc"), Some(CALLOC));
        assert_eq!(call_of("realloc"), Some(REALLOC));
        assert_eq!(call_of("free"), Some(FREE));
        assert_eq!(call_of("posix_memalign"), Some(POSIX_MEMALIGN));
        assert_eq!(call_of("reallocarray"), None);
        assert!(probes.iter().all(|p| p.family == Family::Glibc));

        // The running malloc, as the dynamic linker resolved it, is where
        // its probe is.
        for name in [c"malloc", c"free"] {
            // SAFETY: dlsym with a valid NUL-terminated name.
            let addr = unsafe { libc::dlsym(libc::RTLD_DEFAULT, name.as_ptr()) } as u64;
            let m = maps.find(addr).unwrap();
            let offset = addr - m.start + m.offset;
            let name = name.to_str().unwrap();
            assert!(
                probes.iter().any(|p| p.symbol == name
                    && (p.file_offset == offset
                        || (name == "free" && p.file_offset == offset + 9))),
                "{name} runs at file offset {offset:#x}"
            );
        }
    }

    #[test]
    fn a_missing_process_says_so() {
        let err = find(u32::MAX).unwrap_err();
        assert!(matches!(err, AllocatorError::NoProcess { .. }), "{err}");
        assert_eq!(
            err.to_string(),
            format!("process {} does not exist", u32::MAX)
        );
    }

    /// Kills and reaps the child when dropped, whatever the test did.
    struct Child(std::process::Child);

    impl Drop for Child {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    #[test]
    fn a_static_program_without_libc_has_no_allocator() {
        let dir = std::env::temp_dir().join(format!("pipelens-nolibc-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let source = dir.join("nolibc.c");
        let exe = dir.join("nolibc");
        fs::write(
            &source,
            r#"
struct timespec { long sec, nsec; };
void _start(void) {
    struct timespec t = { 60, 0 };
    for (;;) {
#if defined(__x86_64__)
        long ret;
        __asm__ volatile ("syscall" : "=a"(ret) : "a"(35), "D"(&t), "S"(0) : "rcx", "r11", "memory");
#elif defined(__aarch64__)
        register long x0 __asm__("x0") = (long)&t;
        register long x1 __asm__("x1") = 0;
        register long x8 __asm__("x8") = 101;
        __asm__ volatile ("svc #0" : "+r"(x0) : "r"(x1), "r"(x8) : "memory");
#else
#error "no raw nanosleep for this architecture"
#endif
    }
}
"#,
        )
        .unwrap();
        let status = Command::new("cc")
            .args([
                "-static",
                "-nostdlib",
                "-no-pie",
                "-fno-stack-protector",
                "-O1",
                "-o",
            ])
            .arg(&exe)
            .arg(&source)
            .status()
            .expect("cc is needed to build the static test program");
        assert!(status.success());
        let child = Child(Command::new(&exe).stdin(Stdio::null()).spawn().unwrap());
        let result = find(child.0.id());
        drop(child);
        let _ = fs::remove_dir_all(&dir);

        let err = result.unwrap_err();
        assert!(matches!(err, AllocatorError::NoAllocator { .. }), "{err}");
        let message = err.to_string();
        assert!(message.contains(exe.to_str().unwrap()), "{message}");
        assert!(message.contains("stripped"), "{message}");
    }

    /// The allocator libraries of Debian 12 (libjemalloc2,
    /// libtcmalloc-minimal4, libmimalloc2.0), preloaded into `sleep`;
    /// skipped for those not installed.
    #[test]
    fn finds_preloaded_allocators() {
        let dir = Path::new("/usr/lib/x86_64-linux-gnu");
        let libs = [
            ("libjemalloc.so.2", Family::Jemalloc),
            ("libtcmalloc_minimal.so.4", Family::Tcmalloc),
            ("libmimalloc.so.2", Family::Mimalloc),
        ];
        for (lib, family) in libs {
            let path = dir.join(lib);
            if !path.exists() {
                eprintln!("{} is not installed: not checked", path.display());
                continue;
            }
            let child = Child(
                Command::new("sleep")
                    .arg("60")
                    .env("LD_PRELOAD", &path)
                    .stdin(Stdio::null())
                    .spawn()
                    .unwrap(),
            );
            // The preload is mapped once the dynamic linker ran.
            let pid = child.0.id();
            let mut probes = Vec::new();
            for _ in 0..200 {
                // The dynamic linker maps the preload, then libc.
                if let Ok(found) = find(pid)
                    && found.iter().any(|p| p.family == family)
                    && found.iter().any(|p| p.family == Family::Glibc)
                {
                    probes = found;
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            drop(child);
            let ours: Vec<_> = probes.iter().filter(|p| p.family == family).collect();
            let names: HashSet<&str> = ours.iter().map(|p| p.symbol.as_str()).collect();
            for name in ["malloc", "free", "calloc", "realloc"] {
                assert!(names.contains(name), "{lib}: no {name} in {names:?}");
            }
            // The maps name the file the link points to (`.so.4.5.10`).
            let in_lib = |p: &&AllocProbe| {
                let name = p.module.file_name().unwrap().to_str().unwrap();
                name.starts_with(lib)
            };
            assert!(ours.iter().all(in_lib), "{lib}: {ours:#?}");
            // glibc is mapped all the same, and probed: its functions run
            // for no call, as the preload's come first.
            assert!(
                probes
                    .iter()
                    .any(|p| p.family == Family::Glibc && p.symbol == "malloc")
            );

            // Forwarders to probed functions are not probed again.
            let symbols = nm_dynamic(&path);
            let addrs: HashSet<u64> = ours
                .iter()
                .map(|p| {
                    let name = &p.symbol;
                    symbols[name.as_str()]
                })
                .collect();
            match family {
                Family::Jemalloc => {
                    // `operator new[]` is `jmp operator new`; unsized deletes
                    // jump to free through the PLT.
                    assert!(
                        names.contains("_Znwm") && names.contains("mallocx"),
                        "{names:?}"
                    );
                    assert!(
                        !names.contains("_Znam") && !names.contains("_ZdlPv"),
                        "{names:?}"
                    );
                    assert!(
                        names.contains("_ZdlPvm") && names.contains("sdallocx"),
                        "{names:?}"
                    );
                }
                Family::Mimalloc => {
                    assert!(names.contains("mi_malloc_aligned"), "{names:?}");
                    for forwarder in ["mi_free_size", "mi_free_aligned", "_ZdlPvm"] {
                        assert!(
                            !addrs.contains(&symbols[forwarder]),
                            "{forwarder}: {names:?}"
                        );
                    }
                }
                Family::Tcmalloc => {
                    assert!(
                        names.contains("tc_new") && names.contains("memalign"),
                        "{names:?}"
                    );
                    assert!(!addrs.contains(&symbols["posix_memalign"]), "{names:?}");
                }
                Family::Glibc => unreachable!(),
            }
        }
    }
}
