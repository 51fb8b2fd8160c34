//! Reconciliation of the tracked sockets with the kernel's own: runs the
//! never-attached `reconcile_socks` program of the connections object over
//! every entry of `SOCKS`, so that a connection whose close the state hook
//! missed is closed (as `unobserved`) and counted instead of staying active
//! for good. The kernel side says when a socket is gone; see
//! `agent-ebpf/src/bin/connections.rs`.

use std::os::fd::{AsFd as _, AsRawFd as _, RawFd};

use aya::{Ebpf, programs::RawTracePoint};
use pipelens_common::connections::RECONCILE_PAIRS;

use crate::objects;

/// The program's name in the connections object.
const PROGRAM: &str = "reconcile_socks";
/// `BPF_PROG_TEST_RUN` (`enum bpf_cmd`).
const BPF_PROG_TEST_RUN: libc::c_long = 10;

/// The `test` member of `union bpf_attr` (include/uapi/linux/bpf.h), up to
/// `cpu`: the kernel takes a shorter attribute than its own and zeroes the
/// rest. A raw tracepoint test run takes only `prog_fd` and the context.
#[repr(C)]
#[derive(Default)]
struct TestRunAttr {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
    flags: u32,
    cpu: u32,
}

const _: () = assert!(size_of::<TestRunAttr>() == 72);

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("loading {PROGRAM}: {0}")]
    Load(String),
    #[error("running {PROGRAM} (BPF_PROG_TEST_RUN): {0}")]
    Run(std::io::Error),
}

/// The loaded `reconcile_socks` program.
pub struct Reconciler {
    fd: RawFd,
}

impl Reconciler {
    /// Loads the program (it is never attached). Needs raw tracepoints and
    /// their test runs: 5.10 and newer.
    pub fn load(ebpf: &mut Ebpf) -> Result<Self, ReconcileError> {
        let program: &mut RawTracePoint = ebpf
            .program_mut(PROGRAM)
            .expect("program defined in the object")
            .try_into()
            .expect("program is a raw tracepoint");
        program
            .load()
            .map_err(|e| ReconcileError::Load(objects::verifier_reason(&e)))?;
        let fd = program
            .fd()
            .map_err(|e| ReconcileError::Load(e.to_string()))?
            .as_fd()
            .as_raw_fd();
        let reconciler = Self { fd };
        // A kernel without raw tracepoint test runs says so now, not at the
        // first reconciliation.
        reconciler.run(&[]).map(|_| reconciler)
    }

    /// Checks the tracked sockets `socks` (`sk`, `start_ns`), as last seen in
    /// `SOCKS`; returns how many the kernel closed as unobserved (or, never
    /// established, dropped) in this pass.
    pub fn check(&self, socks: &[(u64, u64)]) -> Result<u64, ReconcileError> {
        let mut closed = 0;
        for batch in socks.chunks(RECONCILE_PAIRS) {
            closed += u64::from(self.run(batch)?);
        }
        Ok(closed)
    }

    fn run(&self, batch: &[(u64, u64)]) -> Result<u32, ReconcileError> {
        let mut args = [0u64; 2 * RECONCILE_PAIRS];
        for (i, (sk, start)) in batch.iter().enumerate() {
            args[2 * i] = *sk;
            args[2 * i + 1] = *start;
        }
        let mut attr = TestRunAttr {
            prog_fd: self.fd as u32,
            ctx_size_in: size_of_val(&args) as u32,
            ctx_in: args.as_ptr() as u64,
            ..TestRunAttr::default()
        };
        // SAFETY: `attr` is a valid `bpf_attr` prefix for this command, and
        // `ctx_in` points to `ctx_size_in` readable bytes for the call.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_PROG_TEST_RUN,
                &raw mut attr,
                size_of::<TestRunAttr>(),
            )
        };
        if rc < 0 {
            return Err(ReconcileError::Run(std::io::Error::last_os_error()));
        }
        Ok(attr.retval)
    }
}
