//! A finished memory profile: symbolised call stacks, each with one value
//! per sample type. What every output format (text, folded, pprof, SVG)
//! and the `pipelens run` site metrics are made from.

use std::{sync::Arc, time::Duration};

/// One function of a call stack. An address inside inlined code yields
/// several frames for the same address: the innermost first, `inlined`
/// set on all but the outermost.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Frame {
    /// Absolute address in the process (return addresses already moved
    /// back into the call instruction).
    pub address: u64,
    /// File name of the module (`libc.so.6`, `alloc-fixture`).
    pub module: Arc<str>,
    /// Address relative to the module's load base (what `addr2line -e`
    /// takes): the fallback name of a frame in a stripped binary.
    pub module_offset: u64,
    /// Demangled function name, when the module has symbols.
    pub function: Option<Arc<str>>,
    pub file: Option<Arc<str>>,
    pub line: Option<u32>,
    pub inlined: bool,
}

impl Frame {
    /// The function name, or `module+0xoffset` when there is none.
    pub fn name(&self) -> String {
        match &self.function {
            Some(f) => f.to_string(),
            None => format!("{}+{:#x}", self.module, self.module_offset),
        }
    }
}

/// What a value column counts, named as Go's heap profiles name them so
/// that pprof front ends (go tool pprof, Pyroscope, Grafana) recognise them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ValueType {
    pub name: &'static str,
    pub unit: &'static str,
}

pub const ALLOC_SPACE: ValueType = ValueType {
    name: "alloc_space",
    unit: "bytes",
};
pub const ALLOC_OBJECTS: ValueType = ValueType {
    name: "alloc_objects",
    unit: "count",
};
pub const INUSE_SPACE: ValueType = ValueType {
    name: "inuse_space",
    unit: "bytes",
};
pub const INUSE_OBJECTS: ValueType = ValueType {
    name: "inuse_objects",
    unit: "count",
};
/// Resident growth: anonymous pages first touched (page faults).
pub const GROWTH_SPACE: ValueType = ValueType {
    name: "growth_space",
    unit: "bytes",
};
/// Address space mapped (`mmap` of anonymous memory, `brk`).
pub const MAPPED_SPACE: ValueType = ValueType {
    name: "mapped_space",
    unit: "bytes",
};

/// One distinct call stack and its values, in `Profile::value_types` order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stack {
    /// Indices into `Profile::frames`, innermost (the allocator) first.
    pub frames: Vec<usize>,
    pub values: Vec<i64>,
    /// The unwinder stopped before the outermost frame (window exhausted,
    /// no unwind information); the stack is shown as far as it got.
    pub truncated: bool,
}

#[derive(Clone, Debug, Default)]
pub struct Profile {
    pub pid: u32,
    /// The process's name (comm).
    pub process: String,
    /// "allocs" or "growth".
    pub mode: &'static str,
    /// Unix time of the start, nanoseconds.
    pub start_unix_nanos: i64,
    pub duration: Duration,
    pub value_types: Vec<ValueType>,
    /// Mean bytes between samples (the pprof `period`; 0 = every event).
    pub sample_mean_bytes: u64,
    pub frames: Vec<Frame>,
    pub stacks: Vec<Stack>,
    /// What the reader should know: the process exited, events were lost,
    /// pointers could not be followed. Printed with every text report and
    /// carried as pprof comments.
    pub notes: Vec<String>,
}

impl Profile {
    /// Sum of column `col` over every stack.
    pub fn total(&self, col: usize) -> i64 {
        self.stacks.iter().map(|s| s.values[col]).sum()
    }
}

impl Profile {
    /// The whole profile as JSON: for scripts, and for comparing a
    /// baseline with a later run.
    pub fn to_json(&self) -> serde_json::Value {
        let frame = |f: &Frame| {
            serde_json::json!({
                "function": f.function.as_deref(),
                "name": f.name(),
                "module": &*f.module,
                "module_offset": f.module_offset,
                "address": f.address,
                "file": f.file.as_deref(),
                "line": f.line,
                "inlined": f.inlined,
            })
        };
        serde_json::json!({
            "pid": self.pid,
            "process": self.process,
            "mode": self.mode,
            "start_unix_nanos": self.start_unix_nanos,
            "duration_seconds": self.duration.as_secs_f64(),
            "sample_mean_bytes": self.sample_mean_bytes,
            "value_types": self.value_types.iter()
                .map(|v| serde_json::json!({"name": v.name, "unit": v.unit}))
                .collect::<Vec<_>>(),
            "notes": self.notes,
            "stacks": self.stacks.iter().map(|s| serde_json::json!({
                "frames": s.frames.iter().map(|i| frame(&self.frames[*i])).collect::<Vec<_>>(),
                "values": s.values,
                "truncated": s.truncated,
            })).collect::<Vec<_>>(),
        })
    }
}
