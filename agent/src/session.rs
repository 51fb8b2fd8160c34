//! What every command that attaches probes sets up first, in one order:
//! privileges, tracefs, kernel offsets from BTF, the loader (shared
//! configuration and pinned target map), and the tracker of target
//! processes. Used by `pipelens run` and `pipelens memory`.

use anyhow::Context as _;

use crate::{
    btf,
    objects::Loader,
    privileges, process,
    targets::{Selection, TargetTracker},
    tracefs,
};

/// An attach session. Dropping it detaches the target tracker, then removes
/// the loader's pins; collectors started in it must be dropped first.
pub struct Session {
    pub selection: Selection,
    // Field order is drop order: the tracker's object before the pins.
    targets: TargetTracker,
    pub loader: Loader,
}

impl Session {
    /// Checks and prepares everything a kernel object needs to load, then
    /// starts following the selected processes.
    pub fn open(selection: Selection) -> anyhow::Result<Self> {
        for (cap, cost) in privileges::check()?.limits {
            log::warn!("running without {cap}: {cost}");
        }
        tracefs::ensure_mounted()?;
        let offsets = btf::kernel_offsets().context("resolving kernel structure offsets")?;
        let loader = Loader::new(selection.agent_config(), offsets)?;
        let targets =
            TargetTracker::start(&loader, &selection).context("following target processes")?;
        Ok(Self {
            selection,
            targets,
            loader,
        })
    }

    /// The processes traced right now: every one on the host with `--all`.
    pub fn traced_now(&self) -> Vec<u32> {
        if self.selection.all {
            process::parent_map().into_keys().collect()
        } else {
            self.targets.current()
        }
    }
}
