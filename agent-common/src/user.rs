//! Userspace half: `aya::Pod` for every type that crosses a map or a ring.

use crate::{config, connections, memory, streams};

// SAFETY: all of these are `#[repr(C)]`, made only of integers and integer
// arrays, with no implicit padding, so every bit pattern is a valid value.
unsafe impl aya::Pod for config::AgentConfig {}
unsafe impl aya::Pod for config::KernelOffsets {}
unsafe impl aya::Pod for memory::CallSite {}
unsafe impl aya::Pod for connections::SockState {}
unsafe impl aya::Pod for connections::SockTuple {}
unsafe impl aya::Pod for connections::SeedValue {}
unsafe impl aya::Pod for connections::ConnEvent {}
unsafe impl aya::Pod for connections::ConnTracepointOffsets {}
unsafe impl aya::Pod for connections::PendingConnect {}
unsafe impl aya::Pod for config::SchedTracepointOffsets {}
unsafe impl aya::Pod for connections::PendingInbound {}
unsafe impl aya::Pod for streams::CaptureState {}
unsafe impl aya::Pod for streams::ActiveIo {}
unsafe impl aya::Pod for streams::StreamHeader {}
unsafe impl aya::Pod for streams::StreamTracepointOffsets {}
unsafe impl aya::Pod for memory::MemSample {}
unsafe impl aya::Pod for memory::MemSampleHeader {}
unsafe impl aya::Pod for memory::MemNote {}
unsafe impl aya::Pod for memory::MemConfig {}
unsafe impl aya::Pod for memory::Pending {}
