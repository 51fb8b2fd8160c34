//! Allocation hotspots: where a process allocates, what it keeps, and what
//! makes its resident set grow, by call stack.
//!
//! - `probes`: the kernel object, its attachment (allocator uprobes in one
//!   process; write faults and mapping syscalls of targets) and its records.
//! - `allocator`, `maps`: which allocator a process really uses, and where
//!   (`allocator::catalogue` the allocators' functions, `allocator::elf`
//!   reading a module for them, `allocator::decode` the instructions that
//!   reading follows).
//! - `unwind`, `symbols`: sampled stack windows into named call stacks;
//!   `modules` what every profiled process shares of them (each mapped
//!   file's unwind sections, the symboliser).
//! - `sampling`, `record`: byte sampling and the weighed profile.
//! - `profile`, `report`: the profile and its formats (`report::attribution`
//!   picks each stack's allocation site; `report::text`, `report::flame`
//!   for folded stacks and SVG, and `report::pprof` write it).
//! - `command`: `pipelens memory`; `collector`: the memory collector of
//!   `pipelens run`.

pub mod allocator;
pub mod collector;
pub mod command;
pub mod maps;
pub mod modules;
pub mod probes;
pub mod profile;
pub mod record;
pub mod report;
pub mod sampling;
pub mod symbols;
pub mod unwind;
