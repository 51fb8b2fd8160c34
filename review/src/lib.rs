//! The performance review over pipelens snapshots: what `pipelens record`
//! writes ([`snapshot`]), and what `pipelens analyse` and `pipelens compare`
//! make of it. Nothing here touches the kernel: a snapshot is read on any
//! machine.

pub mod analyse;
pub mod snapshot;
