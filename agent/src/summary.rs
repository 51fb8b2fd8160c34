//! The JSON summary written on exit (`--summary-json`).

use std::{path::Path, time::Duration};

use crate::collector::{Health, Section};

/// The run's header (version, duration, every collector's health) and the
/// sections the collectors contributed.
pub fn build(elapsed: Duration, health: &Health, sections: Vec<Section>) -> serde_json::Value {
    let mut doc = serde_json::json!({
        "version": env!("CARGO_PKG_VERSION"),
        "duration_seconds": elapsed.as_secs_f64(),
        "collectors": health.snapshot(),
        "agent": {
            "peak_resident_bytes": crate::budget::peak_resident_bytes(),
        },
    });
    for (key, section) in sections {
        doc[key] = section;
    }
    doc
}

/// Written atomically, so that a reader never sees a half-written summary.
pub fn write(path: &Path, doc: &serde_json::Value) -> anyhow::Result<()> {
    crate::output::write_atomically(path, &serde_json::to_vec_pretty(doc)?)
}
