//! What every profiled process shares: the unwind sections of each mapped
//! file, read once per file (by device, inode, size and modification time)
//! however many processes map it, and one symboliser, which parses each
//! file once the same way.
//!
//! A forking server is the case this exists for: every backend of
//! PostgreSQL maps the same executable and libraries at the same
//! addresses. Before, each profiled process copied `.text` and `.eh_frame`
//! of every module and parsed every symbol table again, about 14 MiB per
//! process. Sections are now referenced in place in a read-only mapping
//! of the file, held while some process's unwinder uses it; a process's
//! paths are evicted from the symboliser when it is released.

use std::{
    collections::HashMap,
    ops::{Deref, Range},
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::{Arc, Weak},
};

use blazesym::symbolize::{
    Symbolizer,
    evict::{self, Evict},
};
use framehop::{ExplicitModuleSectionInfo, Module};
use object::{Object as _, ObjectSection as _, ObjectSegment as _};

/// A file as the kernel knows it: the same executable reached through
/// different `/proc/<pid>/root` paths is one file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FileId {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: i64,
}

impl FileId {
    fn of(meta: &std::fs::Metadata) -> Self {
        Self {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime: meta.mtime(),
        }
    }
}

/// Bytes of one section: in place in the file's mapping, or decompressed.
#[derive(Clone)]
pub struct SectionBytes {
    backing: Backing,
    range: Range<usize>,
}

#[derive(Clone)]
enum Backing {
    Mapped(Arc<memmap2::Mmap>),
    Owned(Arc<[u8]>),
}

impl Default for SectionBytes {
    fn default() -> Self {
        Self {
            backing: Backing::Owned(Arc::from(Vec::new())),
            range: 0..0,
        }
    }
}

impl Deref for SectionBytes {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match &self.backing {
            Backing::Mapped(map) => &map[self.range.clone()],
            Backing::Owned(bytes) => &bytes[self.range.clone()],
        }
    }
}

/// The unwind view of one ELF file, shared by every process mapping it.
pub struct SharedFile {
    pub id: FileId,
    /// Executable segments: (file offset, file size, stated address).
    segments: Vec<(u64, u64, u64)>,
    sections: ExplicitModuleSectionInfo<SectionBytes>,
    /// Modules already built, by (address range start, bias): a forked
    /// process maps the file where its parent did, so reuses its parent's.
    layouts: std::sync::Mutex<Vec<Module<SectionBytes>>>,
}

impl std::fmt::Debug for SharedFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedFile").field("id", &self.id).finish()
    }
}

/// Layouts kept per file (more processes at other addresses build theirs).
const MAX_LAYOUTS: usize = 8;

impl SharedFile {
    fn load(host: &Path, id: FileId) -> anyhow::Result<Self> {
        let file = std::fs::File::open(host)?;
        // SAFETY: a read-only private mapping of a file that a process has
        // mapped to run it. Executables and libraries are replaced by
        // rename, not rewritten in place; the agent keeps the mapping only
        // while a profiled process maps the same file.
        let map = Arc::new(unsafe { memmap2::Mmap::map(&file) }?);
        let elf = object::File::parse(&**map)?;
        let segments = elf
            .segments()
            .filter(|s| matches!(s.flags(), object::SegmentFlags::Elf { p_flags, .. } if p_flags.contains(object::elf::PF_X)))
            .map(|s| {
                let (off, size) = s.file_range();
                (off, size, s.address())
            })
            .collect();
        let section = |name: &str| -> Option<(Range<u64>, SectionBytes)> {
            let s = elf.section_by_name(name)?;
            let svma = s.address()..s.address() + s.size();
            let compressed = s.compressed_file_range().ok()?;
            let bytes = if compressed.format == object::CompressionFormat::None {
                let start = usize::try_from(compressed.offset).ok()?;
                let end = start.checked_add(usize::try_from(compressed.uncompressed_size).ok()?)?;
                if end > map.len() {
                    return None;
                }
                SectionBytes {
                    backing: Backing::Mapped(map.clone()),
                    range: start..end,
                }
            } else {
                let owned: Arc<[u8]> = Arc::from(s.uncompressed_data().ok()?.into_owned());
                SectionBytes {
                    range: 0..owned.len(),
                    backing: Backing::Owned(owned),
                }
            };
            Some((svma, bytes))
        };
        let text = section(".text");
        let eh_frame = section(".eh_frame");
        let eh_frame_hdr = section(".eh_frame_hdr");
        let got = elf
            .section_by_name(".got")
            .map(|s| s.address()..s.address() + s.size());
        let debug_frame = section(".debug_frame").map(|(_, d)| d);
        let sections = ExplicitModuleSectionInfo {
            base_svma: 0,
            text_svma: text.as_ref().map(|(r, _)| r.clone()),
            text: text.map(|(_, d)| d),
            got_svma: got,
            eh_frame_svma: eh_frame.as_ref().map(|(r, _)| r.clone()),
            eh_frame: eh_frame.map(|(_, d)| d),
            eh_frame_hdr_svma: eh_frame_hdr.as_ref().map(|(r, _)| r.clone()),
            eh_frame_hdr: eh_frame_hdr.map(|(_, d)| d),
            debug_frame,
            ..Default::default()
        };
        Ok(Self {
            id,
            segments,
            sections,
            layouts: std::sync::Mutex::new(Vec::new()),
        })
    }

    /// The load bias of the file mapped executable at `exec_start` from
    /// file offset `exec_offset`: actual address minus stated address. A
    /// segment's file offset need not be page aligned (lld), while the
    /// mapping's is: compare with the segment's first page.
    pub fn bias(&self, exec_start: u64, exec_offset: u64) -> anyhow::Result<u64> {
        let (off, _, address) = self
            .segments
            .iter()
            .find(|(off, size, _)| off & !0xfff <= exec_offset && exec_offset < off + size)
            .ok_or_else(|| {
                anyhow::anyhow!("no executable segment holds file offset {exec_offset:#x}")
            })?;
        let stated = address.wrapping_sub(*off).wrapping_add(exec_offset);
        Ok(exec_start.wrapping_sub(stated))
    }

    /// framehop's module for this file mapped at `avma` with `bias`.
    pub fn module(&self, name: &str, avma: Range<u64>, bias: u64) -> Module<SectionBytes> {
        let mut layouts = self.layouts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(m) = layouts
            .iter()
            .find(|m| m.avma_range() == avma && m.base_avma() == bias)
        {
            return m.clone();
        }
        let module = Module::new(name.to_owned(), avma, bias, self.sections.clone());
        if layouts.len() < MAX_LAYOUTS {
            layouts.push(module.clone());
        }
        module
    }
}

/// Files loaded for unwinding, and the symboliser.
pub struct Modules {
    files: HashMap<FileId, Weak<SharedFile>>,
    /// Processes holding each path the symboliser may have read: the same
    /// path serves every process that shares our root.
    paths: HashMap<PathBuf, usize>,
    pub symbolizer: Symbolizer,
}

impl Default for Modules {
    fn default() -> Self {
        Self {
            files: HashMap::new(),
            paths: HashMap::new(),
            symbolizer: Symbolizer::new(),
        }
    }
}

impl Modules {
    /// The shared view of the file at `host`, loading it if no process
    /// holds it now.
    /// The caller holds `host` until it releases it.
    pub fn file(&mut self, host: &Path) -> anyhow::Result<Arc<SharedFile>> {
        let id = FileId::of(&std::fs::metadata(host)?);
        let file = match self.files.get(&id).and_then(Weak::upgrade) {
            Some(file) => file,
            None => {
                let file = Arc::new(SharedFile::load(host, id)?);
                self.files.insert(id, Arc::downgrade(&file));
                file
            }
        };
        *self.paths.entry(host.to_path_buf()).or_default() += 1;
        Ok(file)
    }

    /// Forgets what a released process alone held: the symboliser's data
    /// for its paths (kept while another path reaches the same file), and
    /// files no process maps any more.
    pub fn release(&mut self, paths: impl IntoIterator<Item = PathBuf>) {
        for path in paths {
            match self.paths.get_mut(&path) {
                Some(n) if *n > 1 => {
                    *n -= 1;
                    continue;
                }
                _ => {
                    self.paths.remove(&path);
                }
            }
            if let Err(e) = self.symbolizer.evict(&Evict::Elf(evict::Elf::new(path))) {
                log::debug!("memory: symboliser eviction: {e}");
            }
        }
        self.files.retain(|_, f| f.strong_count() > 0);
    }

    /// Files held now (for the tests and the budget).
    pub fn files_held(&self) -> usize {
        self.files.values().filter(|f| f.strong_count() > 0).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_file_reached_by_two_paths_is_loaded_once_and_let_go_with_its_last_user() {
        let exe = std::env::current_exe().unwrap();
        let mut modules = Modules::default();
        let a = modules.file(&exe).unwrap();
        let b = modules.file(Path::new("/proc/self/exe")).unwrap();
        assert!(Arc::ptr_eq(&a, &b), "the same file is shared");
        assert_eq!(modules.files_held(), 1);
        // Sections are views into one mapping, not copies.
        let text = a.sections.text.as_ref().expect(".text");
        assert!(matches!(text.backing, Backing::Mapped(_)));
        assert!(text.len() > 4096);
        drop(a);
        modules.release([exe.clone()]);
        assert_eq!(modules.files_held(), 1, "the other path still holds it");
        drop(b);
        modules.release([PathBuf::from("/proc/self/exe")]);
        assert_eq!(modules.files_held(), 0);
        assert!(modules.paths.is_empty());
    }

    #[test]
    fn a_module_at_its_parents_addresses_reuses_the_parents() {
        let exe = std::env::current_exe().unwrap();
        let mut modules = Modules::default();
        let file = modules.file(&exe).unwrap();
        let first = file.module("exe", 0x1000..0x9000, 0x1000);
        let again = file.module("exe", 0x1000..0x9000, 0x1000);
        let elsewhere = file.module("exe", 0x5000..0xd000, 0x5000);
        assert_eq!(again.avma_range(), first.avma_range());
        assert_eq!(elsewhere.base_avma(), 0x5000);
        assert_eq!(file.layouts.lock().unwrap().len(), 2);
    }
}
