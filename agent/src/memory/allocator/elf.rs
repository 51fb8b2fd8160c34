//! One ELF file read for allocator functions: its symbol tables, where its
//! loaded segments are in the file, and the jumps that make a function a
//! mere forwarder to another.

use std::{
    collections::{HashMap, HashSet},
    fs, io,
    os::unix::fs::MetadataExt as _,
    path::Path,
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
use pipelens_common::memory::call::FREE;
use thiserror::Error;

use super::{
    catalogue::{Family, classify, plain_family},
    decode::{aarch64_jump, null_check_len, x86_64_jump},
};
use crate::memory::maps::Module;

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

/// An allocator function found in one module.
#[derive(Debug)]
pub(super) struct Found {
    pub(super) family: Family,
    pub(super) name: String,
    pub(super) call: u64,
    pub(super) file_offset: u64,
}

/// Reads one module for allocator functions.
pub(super) fn scan(path: &Path, module: &Module) -> Result<Vec<Found>, ModuleError> {
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
