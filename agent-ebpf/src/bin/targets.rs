//! Follows targets through fork, exec and exit, so that children of a target
//! are traced from their first instruction and exited ones stop costing a
//! map entry.
#![no_std]
#![no_main]

use aya_ebpf::{
    Global,
    helpers::bpf_get_current_comm,
    macros::{map, tracepoint},
    maps::PerCpuArray,
    programs::TracePointContext,
};
use pipelens_common::config::{
    AgentConfig, COMM_LEN, FIELD_ABSENT, MAX_COMMS, MODE_ALL, SchedTracepointOffsets, TARGET_CHILD,
    TARGET_COMM, TSTAT_COUNT, TSTAT_TARGETS_FULL,
};
use pipelens_ebpf::{AGENT_CONFIG, TARGETS, bump_stat, config_field, current_ids};

#[unsafe(no_mangle)]
static SCHED_OFFSETS: Global<SchedTracepointOffsets> = Global::new(SchedTracepointOffsets {
    fork_child_pid: 0,
    exit_group_dead: FIELD_ABSENT,
});

#[map]
static TARGET_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(TSTAT_COUNT, 0);

/// Reads one field of `SCHED_OFFSETS` (not the whole struct onto the stack).
macro_rules! sched_off {
    ($field:ident) => {
        pipelens_ebpf::global_field!(SCHED_OFFSETS, SchedTracepointOffsets, $field)
    };
}

/// Adds `tgid` to the targets, counting a failure (the map is full).
#[inline(always)]
fn add_target(tgid: u32, why: u32) {
    if TARGETS.insert(tgid, why, 0).is_err() {
        bump_stat(&TARGET_STATS, TSTAT_TARGETS_FULL);
    }
}

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
    let child: i32 = pipelens_ebpf::tp_field(ctx, sched_off!(fork_child_pid))?;
    add_target(child as u32, TARGET_CHILD);
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
            add_target(tgid, TARGET_COMM);
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
    let group_dead_at = sched_off!(exit_group_dead);
    let group_dead = if group_dead_at == FIELD_ABSENT {
        tid == tgid
    } else {
        pipelens_ebpf::tp_field::<u8>(ctx, group_dead_at)? != 0
    };
    if group_dead {
        let _ = TARGETS.remove(tgid);
    }
    Ok(())
}

pipelens_ebpf::kernel_object!();
