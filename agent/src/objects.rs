//! Every kernel object pipelens can load, in one place, and the loader that
//! hands each of them the agent configuration and the shared target map.

use std::{
    fs,
    os::unix::fs::{MetadataExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{MapData, PerCpuArray, RingBuf},
    programs::TracePoint,
};
use pipelens_common::config::{AgentConfig, KernelOffsets};
use thiserror::Error;
use tokio::io::unix::AsyncFd;

use crate::tracefs::TracefsError;

macro_rules! bpf_file {
    ($name:literal) => {
        aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/", $name))
    };
}

/// Follows targets through fork, exec and exit; owns the `TARGETS` map.
pub const TARGETS: &[u8] = bpf_file!("targets");
/// TCP connection lifecycles.
pub const CONNECTIONS: &[u8] = bpf_file!("connections");
/// Socket payload capture for the protocol parsers.
pub const STREAMS: &[u8] = bpf_file!("streams");
/// Allocation and growth samplers with user stack windows.
pub const MEMORY: &[u8] = bpf_file!("memory");

const BPFFS: &str = "/sys/fs/bpf";

#[derive(Debug, Error)]
pub enum LoadError {
    #[error(
        "cannot prepare {path} for pinning the shared target map: {source} \
         (a non-root agent needs /sys/fs/bpf/pipelens writable: run once as root, \
         or `install -d -m 1777 /sys/fs/bpf/pipelens`)"
    )]
    PinDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "bpffs is not mounted at {BPFFS} and mounting it failed ({source}); \
         run `mount -t bpf bpf {BPFFS}` as root"
    )]
    Bpffs { source: std::io::Error },
    #[error("loading kernel object `{object}`: {source}")]
    Load {
        object: &'static str,
        source: aya::EbpfError,
    },
}

/// Why a collector could not be set up or read.
#[derive(Debug, Error)]
pub enum ProbeError {
    #[error(transparent)]
    Tracefs(#[from] TracefsError),
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error("attaching {category}:{name}: {}", verifier_reason(source))]
    Attach {
        category: &'static str,
        name: &'static str,
        source: aya::programs::ProgramError,
    },
    #[error("kernel object has no map {0}")]
    MissingMap(&'static str),
    #[error("map: {0}")]
    Map(#[from] aya::maps::MapError),
    #[error("ring buffer: {0}")]
    Io(#[from] std::io::Error),
    #[error("unexpected layout of {0}: its arguments are not where the other syscalls have them")]
    Layout(String),
    #[error("{0}")]
    NoHook(String),
}

/// A program load failure in a few words: the error and, when the verifier
/// refused the program, the last lines of its log (where it says why).
pub fn verifier_reason(e: &aya::programs::ProgramError) -> String {
    match e {
        aya::programs::ProgramError::LoadError {
            io_error,
            verifier_log,
        } => {
            let log = verifier_log.to_string();
            let lines: Vec<&str> = log
                .lines()
                .map(str::trim)
                .filter(|l| {
                    !l.is_empty()
                        && !l.starts_with("processed ")
                        && !l.starts_with("verification time")
                })
                .collect();
            let tail = lines[lines.len().saturating_sub(3)..].join(" | ");
            if tail.is_empty() {
                format!("load refused: {io_error}")
            } else {
                format!("verifier: {io_error}: {tail}")
            }
        }
        other => other.to_string(),
    }
}

/// Loads each program once and attaches it to every tracepoint listed for
/// it: `(program, category, tracepoint)`.
pub fn attach_tracepoints<'a>(
    ebpf: &mut Ebpf,
    hooks: impl IntoIterator<Item = &'a (&'static str, &'static str, &'static str)>,
) -> Result<(), ProbeError> {
    let mut loaded = std::collections::HashSet::new();
    for (prog, category, name) in hooks {
        let tp: &mut TracePoint = ebpf
            .program_mut(prog)
            .expect("program defined in the object")
            .try_into()
            .expect("program is a tracepoint");
        let result = if loaded.insert(*prog) {
            // A collector may have loaded it already, to choose between
            // variants by what this kernel's verifier accepts.
            match tp.load() {
                Ok(()) | Err(aya::programs::ProgramError::AlreadyLoaded) => {
                    tp.attach(category, name).map(|_| ())
                }
                Err(e) => Err(e),
            }
        } else {
            tp.attach(category, name).map(|_| ())
        };
        result.map_err(|source| ProbeError::Attach {
            category,
            name,
            source,
        })?;
    }
    Ok(())
}

/// Takes the ring buffer `name` out of `ebpf`, registered with tokio.
pub fn take_ring(
    ebpf: &mut Ebpf,
    name: &'static str,
) -> Result<AsyncFd<RingBuf<MapData>>, ProbeError> {
    let ring = RingBuf::try_from(ebpf.take_map(name).ok_or(ProbeError::MissingMap(name))?)?;
    // SAFETY: the ring buffer owns its fd for as long as the AsyncFd holds
    // it, and nothing else closes it.
    unsafe { AsyncFd::register(ring) }
        .map_err(|e| ProbeError::Io(std::io::Error::other(e.to_string())))
}

/// Sum over CPUs of slot `index` of the per-CPU counter array `name`.
pub fn per_cpu_total(ebpf: &Ebpf, name: &'static str, index: u32) -> Result<u64, ProbeError> {
    let stats: PerCpuArray<&MapData, u64> =
        PerCpuArray::try_from(ebpf.map(name).ok_or(ProbeError::MissingMap(name))?)?;
    Ok(stats.get(&index, 0)?.iter().sum())
}

/// Exports the failed map inserts a kernel object counted in its per-CPU
/// stats array `stats`, one slot per map (`slots`: slot, map name), as
/// `pipelens_kernel_map_errors_total{collector, map}`. The kernel's counts
/// run from the object's load, so they are set, not added; the first call,
/// right after loading, exports every series at 0.
pub fn export_map_errors(
    ebpf: &Ebpf,
    collector: &'static str,
    stats: &'static str,
    slots: &[(u32, &'static str)],
) -> Result<(), ProbeError> {
    let map: PerCpuArray<&MapData, u64> =
        PerCpuArray::try_from(ebpf.map(stats).ok_or(ProbeError::MissingMap(stats))?)?;
    export_map_errors_from(&map, collector, slots)
}

/// [`export_map_errors`] from a stats array already taken out of its object.
pub fn export_map_errors_from<T: std::borrow::Borrow<MapData>>(
    stats: &PerCpuArray<T, u64>,
    collector: &'static str,
    slots: &[(u32, &'static str)],
) -> Result<(), ProbeError> {
    for (slot, map) in slots {
        let failed: u64 = stats.get(slot, 0)?.iter().sum();
        metrics::counter!(
            "pipelens_kernel_map_errors_total",
            "collector" => collector,
            "map" => *map
        )
        .absolute(failed);
    }
    Ok(())
}

/// Loads kernel objects with the same configuration and the same `TARGETS`
/// map, pinned under a directory private to this agent instance and removed
/// when the loader is dropped.
pub struct Loader {
    pin_dir: PathBuf,
    config: AgentConfig,
    offsets: KernelOffsets,
}

impl Loader {
    pub fn new(config: AgentConfig, offsets: KernelOffsets) -> Result<Self, LoadError> {
        ensure_bpffs()?;
        let base = Path::new(BPFFS).join("pipelens");
        prepare_pin_base(&base);
        remove_stale_pins(&base);
        let pin_dir = base.join(std::process::id().to_string());
        fs::create_dir_all(&pin_dir)
            .and_then(|()| fs::set_permissions(&pin_dir, fs::Permissions::from_mode(0o700)))
            .map_err(|source| LoadError::PinDir {
                path: pin_dir.clone(),
                source,
            })?;
        Ok(Self {
            pin_dir,
            config,
            offsets,
        })
    }

    /// Loads `bytes` as `object`; `customise` may override further globals.
    pub fn load<'a>(
        &'a self,
        object: &'static str,
        bytes: &[u8],
        customise: impl FnOnce(&mut EbpfLoader<'a>),
    ) -> Result<Ebpf, LoadError> {
        let targets_pin = self.pin_dir.join("TARGETS");
        let mut loader = EbpfLoader::new();
        loader
            .override_global("AGENT_CONFIG", &self.config, true)
            .override_global("KERNEL_OFFSETS", &self.offsets, true)
            .map_pin_path("TARGETS", targets_pin);
        customise(&mut loader);
        loader
            .load(bytes)
            .map_err(|source| LoadError::Load { object, source })
    }
}

impl Drop for Loader {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.pin_dir);
    }
}

fn ensure_bpffs() -> Result<(), LoadError> {
    // SAFETY: statfs on a valid C string into a zeroed struct.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    let path = std::ffi::CString::new(BPFFS).expect("static path");
    // BPF_FS_MAGIC from include/uapi/linux/magic.h.
    const BPF_FS_MAGIC: i64 = 0xcafe4a11;
    if unsafe { libc::statfs(path.as_ptr(), &mut st) } == 0 && st.f_type as i64 == BPF_FS_MAGIC {
        return Ok(());
    }
    let fstype = std::ffi::CString::new("bpf").expect("static string");
    // SAFETY: valid NUL-terminated strings.
    let rc = unsafe {
        libc::mount(
            fstype.as_ptr(),
            path.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(LoadError::Bpffs {
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// `/sys/fs/bpf/pipelens` is shared like `/tmp` (sticky, writable by all)
/// so that an agent running as root with only its four capabilities (no
/// `CAP_DAC_OVERRIDE`) and one running as another user can each make their
/// own private (0700) directory in it, whoever made it first. Whoever owns
/// it sets the mode; a base made by someone else is left as it is (the
/// error at the pin directory then names it).
fn prepare_pin_base(base: &Path) {
    if fs::create_dir(base).is_ok() || base.metadata().is_ok_and(|m| m.uid() == euid()) {
        let _ = fs::set_permissions(base, fs::Permissions::from_mode(0o1777));
    }
}

fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Pins left behind by an agent that was killed before it could clean up.
fn remove_stale_pins(base: &Path) {
    let Ok(entries) = fs::read_dir(base) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if !Path::new("/proc").join(pid.to_string()).exists() {
            log::info!("removing stale pins of exited agent {pid}");
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}
