//! The JSON summary written on exit (`--summary-json`).

use std::{path::Path, time::Duration};

use anyhow::Context as _;

use crate::collector::{Health, Section};

/// The run's header (version, duration, every collector's health) and the
/// sections the collectors contributed.
pub fn build(elapsed: Duration, health: &Health, sections: Vec<Section>) -> serde_json::Value {
    let mut doc = serde_json::json!({
        "version": env!("CARGO_PKG_VERSION"),
        "duration_seconds": elapsed.as_secs_f64(),
        "collectors": health.snapshot(),
    });
    for (key, section) in sections {
        doc[key] = section;
    }
    doc
}

/// Written to a temporary file and renamed, so that a reader never sees a
/// half-written summary.
pub fn write(path: &Path, doc: &serde_json::Value) -> anyhow::Result<()> {
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(doc)?)
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(())
}
