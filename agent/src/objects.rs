//! Every kernel object pipelens can load, in one place, and the loader that
//! hands each of them the agent configuration and the shared target map.

use std::{
    fs,
    path::{Path, PathBuf},
};

use aya::{Ebpf, EbpfLoader};
use pipelens_common::config::{AgentConfig, KernelOffsets};
use thiserror::Error;

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

const BPFFS: &str = "/sys/fs/bpf";

#[derive(Debug, Error)]
pub enum LoadError {
    #[error("cannot prepare {path} for pinning the shared target map: {source}")]
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
        remove_stale_pins(&base);
        let pin_dir = base.join(std::process::id().to_string());
        fs::create_dir_all(&pin_dir).map_err(|source| LoadError::PinDir {
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
