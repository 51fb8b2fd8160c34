//! Follows targets through fork, exec and exit, so that children of a target
//! are traced from their first instruction and exited ones stop costing a
//! map entry.
#![no_std]
#![no_main]

use aya_ebpf::{
    Global, helpers::bpf_get_current_comm, macros::tracepoint, programs::TracePointContext,
};
use pipelens_common::config::{
    AgentConfig, COMM_LEN, FIELD_ABSENT, MAX_COMMS, MODE_ALL, SchedTracepointOffsets, TARGET_CHILD,
    TARGET_COMM,
};
use pipelens_ebpf::{AGENT_CONFIG, TARGETS, config_field, current_ids};

#[unsafe(no_mangle)]
static SCHED_OFFSETS: Global<SchedTracepointOffsets> = Global::new(SchedTracepointOffsets {
    fork_child_pid: 0,
    exit_group_dead: FIELD_ABSENT,
});

/// `sched:sched_process_fork` — runs in the parent. A child of a target
/// becomes a target. Threads get an entry too (their id is their own): it is
/// removed when they exit.
#[tracepoint]
pub fn sched_process_fork(ctx: TracePointContext) -> u32 {
    match try_fork(&ctx) {
        Ok(()) | Err(_) => 0,
    }
}

fn try_fork(ctx: &TracePointContext) -> Result<(), i32> {
    if config_field!(mode) == MODE_ALL {
        return Ok(());
    }
    let (tgid, _) = current_ids();
    // SAFETY: presence test only.
    if unsafe { TARGETS.get(tgid) }.is_none() {
        return Ok(());
    }
    let off = SCHED_OFFSETS.load();
    // SAFETY: the offset comes from this tracepoint's format file.
    let child: i32 = unsafe { ctx.read_at(off.fork_child_pid as usize)? };
    TARGETS.insert(child as u32, TARGET_CHILD, 0)?;
    Ok(())
}

/// `sched:sched_process_exec` — a process that execs one of the `--comm`
/// names becomes a target.
#[tracepoint]
pub fn sched_process_exec(_ctx: TracePointContext) -> u32 {
    match try_exec() {
        Ok(()) | Err(_) => 0,
    }
}

fn try_exec() -> Result<(), i32> {
    let count = config_field!(comm_count);
    if config_field!(mode) == MODE_ALL || count == 0 {
        return Ok(());
    }
    let comm = bpf_get_current_comm()?;
    let (tgid, _) = current_ids();
    let cfg = (&raw const AGENT_CONFIG).cast::<AgentConfig>();
    let mut i = 0;
    while i < MAX_COMMS {
        // A volatile read: through a plain reference the compiler would fold
        // the static's compile-time value (all zeroes), not the loader's.
        // SAFETY: `Global<T>` is `repr(transparent)` over an initialised `T`.
        let wanted = unsafe { core::ptr::read_volatile(&raw const (*cfg).comms[i]) };
        if (i as u32) < count && comm_eq(&comm, &wanted) {
            TARGETS.insert(tgid, TARGET_COMM, 0)?;
            return Ok(());
        }
        i += 1;
    }
    Ok(())
}

#[inline(always)]
fn comm_eq(a: &[u8; COMM_LEN], b: &[u8; COMM_LEN]) -> bool {
    let mut i = 0;
    while i < COMM_LEN {
        if a[i] != b[i] {
            return false;
        }
        if a[i] == 0 {
            return true;
        }
        i += 1;
    }
    true
}

/// `sched:sched_process_exit` — runs for every exiting thread.
#[tracepoint]
pub fn sched_process_exit(ctx: TracePointContext) -> u32 {
    match try_exit(&ctx) {
        Ok(()) | Err(_) => 0,
    }
}

fn try_exit(ctx: &TracePointContext) -> Result<(), i32> {
    if config_field!(mode) == MODE_ALL {
        return Ok(());
    }
    let (tgid, tid) = current_ids();
    if tid != tgid {
        let _ = TARGETS.remove(tid);
    }
    let off = SCHED_OFFSETS.load();
    let group_dead = if off.exit_group_dead == FIELD_ABSENT {
        tid == tgid
    } else {
        // SAFETY: the offset comes from this tracepoint's format file.
        unsafe { ctx.read_at::<u8>(off.exit_group_dead as usize)? != 0 }
    };
    if group_dead {
        let _ = TARGETS.remove(tgid);
    }
    Ok(())
}

pipelens_ebpf::kernel_object!();
