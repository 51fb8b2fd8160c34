//! Plain `#[repr(C)]` types shared by the kernel programs and the agent.
//!
//! Every type here is read by userspace from raw ring-buffer bytes, so none
//! carries a `bool` or implicit padding: flags are `u32`, padding is explicit.
#![no_std]

pub mod config;
pub mod connections;
pub mod memory;
pub mod streams;

#[cfg(feature = "user")]
mod user;
