//! Pieces shared by every kernel object: the agent configuration, the shared
//! map of targeted processes, and the walk from a file descriptor to its
//! `struct sock`.
#![no_std]

#[cfg(target_arch = "bpf")]
mod kernel;
#[cfg(target_arch = "bpf")]
pub use kernel::*;
