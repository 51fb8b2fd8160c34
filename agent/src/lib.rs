//! pipelens: eBPF observability for a running service, without touching it.
//!
//! The library holds every area and the core they plug into; the `pipelens`
//! binary (`main.rs`) parses arguments and calls in. Being a library lets
//! the fuzz targets (`agent/fuzz`) drive the same parsers the collectors do.

pub mod btf;
pub mod budget;
pub mod check;
pub mod cli;
pub mod collector;
pub mod connections;
pub mod distribution;
pub mod memory;
pub mod objects;
pub mod output;
pub mod privileges;
pub mod process;
pub mod queries;
pub mod record;
pub mod review;
pub mod run;
pub mod server;
pub mod session;
pub mod streams;
pub mod summary;
pub mod targets;
pub mod telemetry;
pub mod tracefs;
pub mod websocket;
