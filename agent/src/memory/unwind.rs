//! Unwinding sampled user stacks in userspace: the registers and the stack
//! window the kernel copied, walked with each module's `.eh_frame` CFI by
//! `framehop` (which falls back to frame pointers where a module has no
//! unwind information). Release builds of C, C++ and Rust usually omit
//! frame pointers, so this is what keeps their stacks whole.

use std::{
    collections::HashMap,
    ops::Range,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use framehop::{
    FrameAddress, Unwinder as _,
    x86_64::{CacheX86_64, UnwindRegsX86_64, UnwinderX86_64},
};

use super::{
    maps::{self, ProcessMaps},
    modules::{Modules, SectionBytes, SharedFile},
};

/// Frames kept per stack at most.
pub const MAX_FRAMES: usize = 128;

/// One mapped ELF file of the process.
#[derive(Clone, Debug)]
pub struct ModuleInfo {
    /// File name (`libc.so.6`).
    pub name: Arc<str>,
    /// The path as the process sees it.
    pub source: String,
    /// Where the file can be read from here (through `/proc/<pid>/root`).
    pub path: PathBuf,
    pub avma: Range<u64>,
    /// Load bias: actual address minus the address stated in the file.
    pub bias: u64,
    /// The file's unwind sections, shared with every process mapping it.
    pub file: Arc<SharedFile>,
}

impl ModuleInfo {
    /// Address as stated in the file (what symbol tables and `addr2line`
    /// use).
    pub fn svma(&self, avma: u64) -> u64 {
        avma.wrapping_sub(self.bias)
    }
}

/// A stack: lookup addresses (return addresses moved back into their call
/// instruction), innermost first.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Unwound {
    pub addresses: Vec<u64>,
    pub truncated: bool,
}

/// The modules of one process and framehop's state for them.
pub struct ProcessUnwinder {
    pid: u32,
    unwinder: UnwinderX86_64<SectionBytes>,
    cache: CacheX86_64,
    modules: Vec<ModuleInfo>,
    last_refresh: Option<Instant>,
}

impl ProcessUnwinder {
    pub fn new(pid: u32, shared: &mut Modules) -> Result<Self, maps::MapsError> {
        let mut unwinder = Self {
            pid,
            unwinder: UnwinderX86_64::new(),
            cache: CacheX86_64::new(),
            modules: Vec::new(),
            last_refresh: None,
        };
        let process_maps = ProcessMaps::read(pid)?;
        unwinder.add_modules(&process_maps, shared);
        Ok(unwinder)
    }

    pub fn module_of(&self, addr: u64) -> Option<&ModuleInfo> {
        self.modules.iter().find(|m| m.avma.contains(&addr))
    }

    /// Reads the maps again for modules loaded since (at most every
    /// 100 ms; a process that has exited keeps what was known).
    pub fn refresh(&mut self, shared: &mut Modules) {
        if self
            .last_refresh
            .is_some_and(|t| t.elapsed() < Duration::from_millis(100))
        {
            return;
        }
        self.last_refresh = Some(Instant::now());
        if let Ok(m) = ProcessMaps::read(self.pid) {
            self.add_modules(&m, shared);
        }
    }

    /// The host paths of the files this process's modules were read from
    /// (what the symboliser knows them by).
    pub fn paths(&self) -> impl Iterator<Item = PathBuf> + '_ {
        self.modules.iter().map(|m| m.path.clone())
    }

    fn add_modules(&mut self, process_maps: &ProcessMaps, shared: &mut Modules) {
        // Per file: the range of all its mappings, and where its executable
        // mapping starts with which file offset.
        type Extent = (Range<u64>, Option<(u64, u64)>);
        let mut ranges: HashMap<&str, Extent> = HashMap::new();
        for m in &process_maps.mappings {
            let Some(path) = m.path.as_deref() else {
                continue;
            };
            if !path.starts_with('/') {
                continue;
            }
            let entry = ranges.entry(path).or_insert((m.start..m.end, None));
            entry.0.start = entry.0.start.min(m.start);
            entry.0.end = entry.0.end.max(m.end);
            if m.executable && entry.1.is_none() {
                entry.1 = Some((m.start, m.offset));
            }
        }
        for (path, (avma, exec)) in ranges {
            let Some((exec_start, exec_offset)) = exec else {
                continue;
            };
            if self
                .modules
                .iter()
                .any(|m| m.avma.start == avma.start && m.source == path)
            {
                continue;
            }
            let host = maps::host_path(self.pid, path);
            let loaded = shared.file(&host).and_then(|file| {
                let bias = file.bias(exec_start, exec_offset)?;
                Ok((file, bias))
            });
            match loaded {
                Ok((file, bias)) => {
                    let name: Arc<str> = path.rsplit('/').next().unwrap_or(path).into();
                    self.unwinder
                        .add_module(file.module(&name, avma.clone(), bias));
                    self.modules.push(ModuleInfo {
                        name,
                        source: path.to_owned(),
                        path: host,
                        avma,
                        bias,
                        file,
                    });
                }
                Err(e) => log::debug!("memory: no unwind data for {path}: {e}"),
            }
        }
    }

    /// Walks the stack from the sampled registers. `stack` holds the bytes
    /// from `sp` up.
    pub fn unwind(
        &mut self,
        ip: u64,
        sp: u64,
        bp: u64,
        stack: &[u8],
        shared: &mut Modules,
    ) -> Unwound {
        if self.module_of(ip).is_none() {
            self.refresh(shared);
        }
        let mut read_stack = |addr: u64| -> Result<u64, ()> {
            let off = addr.checked_sub(sp).ok_or(())? as usize;
            let bytes = stack.get(off..off + 8).ok_or(())?;
            Ok(u64::from_le_bytes(bytes.try_into().map_err(|_| ())?))
        };
        let mut iter = self.unwinder.iter_frames(
            ip,
            UnwindRegsX86_64::new(ip, sp, bp),
            &mut self.cache,
            &mut read_stack,
        );
        let mut addresses = Vec::new();
        let truncated = loop {
            match iter.next() {
                Ok(Some(frame)) => {
                    if addresses.len() == MAX_FRAMES {
                        break true;
                    }
                    let addr = match frame {
                        FrameAddress::InstructionPointer(a) => a,
                        // The call instruction, not the one after it, so
                        // that the line (and an inlined call) is right.
                        FrameAddress::ReturnAddress(a) => u64::from(a) - 1,
                    };
                    addresses.push(addr);
                }
                Ok(None) => break false,
                Err(_) => break true,
            }
        };
        Unwound {
            addresses,
            truncated,
        }
    }
}
