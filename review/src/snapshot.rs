//! The snapshot `pipelens record` writes: a versioned JSON document holding,
//! per interval (5 s by default), every series the agent exported in that
//! interval — counter increments, gauge readings (last and peak) and
//! histogram observations as DDSketches (1 % relative error, mergeable, so
//! any interval range and any label subset can be summed exactly) — plus the
//! resident memory of every target sampled from `/proc`.
//!
//! The series are the ones `/metrics` carries, with the same names and
//! labels (see the README's metric contract): the areas of a review (HTTP,
//! WebSocket, PostgreSQL, connections, memory, errors) are views over them.
//! Labels never hold literals: query templates, folded routes, close codes.

use std::{collections::BTreeMap, path::Path};

use serde::{Deserialize, Serialize};
use sketches_ddsketch::{Config, DDSketch};

/// The `format` of every snapshot.
pub const FORMAT: &str = "pipelens-snapshot";
/// The schema this build reads and writes. A snapshot of another version is
/// refused by name, not half-read.
pub const SCHEMA_VERSION: u32 = 1;

/// A recorded run.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Snapshot {
    pub format: String,
    pub schema_version: u32,
    pub agent_version: String,
    /// `uname -r` of the host recorded on.
    pub kernel: String,
    pub host: String,
    pub targets: Targets,
    /// Wall-clock start, seconds since the Unix epoch.
    pub started_at_unix_seconds: f64,
    pub duration_seconds: f64,
    /// The nominal interval length; the last interval may be shorter.
    pub interval_seconds: f64,
    /// Why the run is incomplete (a `--pid` target exited, the run was
    /// interrupted), or `None`.
    #[serde(default)]
    pub partial: Option<String>,
    pub intervals: Vec<Interval>,
}

/// What was traced, as the target flags said.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Targets {
    pub all: bool,
    pub pids: Vec<u32>,
    pub comms: Vec<String>,
}

/// One interval of the run.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Interval {
    /// Seconds from the start of the run.
    pub start_seconds: f64,
    pub duration_seconds: f64,
    /// What each counter grew by in this interval (series that did not
    /// move are left out).
    pub counters: Vec<CounterDelta>,
    /// Every gauge: its value at the end of the interval and the highest it
    /// reached within it (`pipelens_websocket_sessions_active`'s peak is the
    /// interval's peak concurrent sessions).
    pub gauges: Vec<GaugeReading>,
    /// The observations of each histogram in this interval (series without
    /// any are left out).
    pub histograms: Vec<HistogramDelta>,
    /// The resident memory of every target process at the end of the
    /// interval, from `/proc/<pid>/status`.
    pub processes: Vec<ProcessMemory>,
}

/// A series: its metric name and labels, as `/metrics` has them.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Series {
    pub name: String,
    pub labels: BTreeMap<String, String>,
}

impl Series {
    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels.get(key).map(String::as_str)
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct CounterDelta {
    #[serde(flatten)]
    pub series: Series,
    pub value: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct GaugeReading {
    #[serde(flatten)]
    pub series: Series,
    pub last: f64,
    pub max: f64,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct HistogramDelta {
    #[serde(flatten)]
    pub series: Series,
    pub sketch: Sketch,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ProcessMemory {
    pub pid: u32,
    pub process: String,
    /// The container id, empty for a host process.
    #[serde(default)]
    pub container: String,
    pub rss_bytes: u64,
}

/// A distribution of non-negative observations (seconds, bytes): a DDSketch
/// of 1 % relative error and at most 2,048 bins.
#[derive(Clone, Serialize, Deserialize)]
pub struct Sketch(DDSketch);

/// The relative error of every quantile a [`Sketch`] reports.
pub const RELATIVE_ERROR: f64 = 0.01;

impl Default for Sketch {
    fn default() -> Self {
        Self(DDSketch::new(Config::new(RELATIVE_ERROR, 2048, 1e-9)))
    }
}

impl Sketch {
    pub fn add(&mut self, v: f64) {
        if v.is_finite() && v >= 0.0 {
            self.0.add(v);
        }
    }

    /// Adds every observation of `other` (sketches of this configuration
    /// merge exactly).
    pub fn merge(&mut self, other: &Sketch) {
        // Same configuration by construction: the merge cannot fail.
        let _ = self.0.merge(&other.0);
    }

    pub fn count(&self) -> usize {
        self.0.count()
    }

    pub fn sum(&self) -> f64 {
        self.0.sum().unwrap_or(0.0)
    }

    /// The `q` quantile (0–1), `None` when empty.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        self.0.quantile(q).ok().flatten()
    }

    pub fn max(&self) -> Option<f64> {
        self.0.max()
    }
}

impl std::fmt::Debug for Sketch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sketch")
            .field("count", &self.count())
            .field("p50", &self.quantile(0.5))
            .field("p95", &self.quantile(0.95))
            .finish()
    }
}

impl PartialEq for Sketch {
    fn eq(&self, other: &Self) -> bool {
        self.count() == other.count()
            && self.sum() == other.sum()
            && [0.5, 0.95, 0.99]
                .iter()
                .all(|q| self.quantile(*q) == other.quantile(*q))
    }
}

/// Why a snapshot could not be read. Each says what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "{path} is truncated (it ends after {len} bytes, in the middle of the document): \
         record it again"
    )]
    Truncated { path: String, len: usize },
    #[error("{path} is not a pipelens snapshot: {why}")]
    NotASnapshot { path: String, why: String },
    #[error(
        "{path} is a snapshot of schema version {found}; this pipelens reads version \
         {SCHEMA_VERSION}: record it again with this version"
    )]
    OtherVersion { path: String, found: u64 },
    #[error("{path} holds an empty run ({why}): nothing to review")]
    Empty { path: String, why: String },
}

impl Snapshot {
    /// Reads and checks a snapshot: a truncated file, another schema
    /// version, something else entirely and an empty run are each refused
    /// with their own error.
    pub fn read(path: &Path) -> Result<Snapshot, SnapshotError> {
        let name = path.display().to_string();
        let bytes = std::fs::read(path).map_err(|source| SnapshotError::Io {
            path: name.clone(),
            source,
        })?;
        Self::parse(&name, &bytes)
    }

    /// [`Snapshot::read`] over bytes already read; `name` names them in errors.
    pub fn parse(name: &str, bytes: &[u8]) -> Result<Snapshot, SnapshotError> {
        let not = |why: String| SnapshotError::NotASnapshot {
            path: name.to_owned(),
            why,
        };
        let value: serde_json::Value = match serde_json::from_slice(bytes) {
            Ok(v) => v,
            Err(e) if e.is_eof() => {
                return Err(SnapshotError::Truncated {
                    path: name.to_owned(),
                    len: bytes.len(),
                });
            }
            Err(e) => return Err(not(format!("not JSON ({e})"))),
        };
        match value.get("format").and_then(|f| f.as_str()) {
            Some(FORMAT) => {}
            Some(other) => return Err(not(format!("its format is {other:?}"))),
            None => return Err(not("it has no \"format\" field".into())),
        }
        match value.get("schema_version").and_then(|v| v.as_u64()) {
            Some(v) if v == u64::from(SCHEMA_VERSION) => {}
            Some(found) => {
                return Err(SnapshotError::OtherVersion {
                    path: name.to_owned(),
                    found,
                });
            }
            None => return Err(not("it has no schema_version".into())),
        }
        let snapshot: Snapshot = serde_json::from_value(value).map_err(|e| not(format!("{e}")))?;
        if snapshot.intervals.is_empty() {
            return Err(SnapshotError::Empty {
                path: name.to_owned(),
                why: "no interval was recorded".into(),
            });
        }
        let observed = snapshot
            .intervals
            .iter()
            .any(|i| !i.counters.is_empty() || !i.histograms.is_empty());
        if !observed {
            return Err(SnapshotError::Empty {
                path: name.to_owned(),
                why: format!(
                    "the targets did nothing the agent could see in {:.0} s",
                    snapshot.duration_seconds
                ),
            });
        }
        Ok(snapshot)
    }

    /// The snapshot as it is written: pretty JSON.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).expect("a snapshot always serialises")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Snapshot {
        let mut sketch = Sketch::default();
        for v in [0.001, 0.002, 0.004] {
            sketch.add(v);
        }
        let series = |name: &str| Series {
            name: name.to_owned(),
            labels: [("process".to_owned(), "pipeline".to_owned())].into(),
        };
        Snapshot {
            format: FORMAT.into(),
            schema_version: SCHEMA_VERSION,
            agent_version: "0.1.0".into(),
            kernel: "6.1.0".into(),
            host: "h".into(),
            targets: Targets::default(),
            started_at_unix_seconds: 1.0,
            duration_seconds: 5.0,
            interval_seconds: 5.0,
            partial: None,
            intervals: vec![Interval {
                start_seconds: 0.0,
                duration_seconds: 5.0,
                counters: vec![CounterDelta {
                    series: series("pipelens_websocket_messages_total"),
                    value: 3,
                }],
                gauges: vec![],
                histograms: vec![HistogramDelta {
                    series: series("pipelens_db_query_duration_seconds"),
                    sketch,
                }],
                processes: vec![],
            }],
        }
    }

    #[test]
    fn a_snapshot_reads_back_as_written() {
        let s = sample();
        let back = Snapshot::parse("s.json", &s.to_json()).expect("parses");
        assert_eq!(back, s);
        let h = &back.intervals[0].histograms[0].sketch;
        assert_eq!(h.count(), 3);
        let p50 = h.quantile(0.5).unwrap();
        assert!((p50 - 0.002).abs() <= 0.002 * RELATIVE_ERROR, "{p50}");
    }

    #[test]
    fn bad_snapshots_are_refused_each_by_its_own_error() {
        let good = sample().to_json();
        let cut = &good[..good.len() / 2];
        assert!(matches!(
            Snapshot::parse("s", cut),
            Err(SnapshotError::Truncated { .. })
        ));
        let other = String::from_utf8(good.clone())
            .unwrap()
            .replace("\"schema_version\": 1", "\"schema_version\": 7");
        let e = Snapshot::parse("s", other.as_bytes()).unwrap_err();
        assert!(
            matches!(e, SnapshotError::OtherVersion { found: 7, .. }),
            "{e}"
        );
        assert!(e.to_string().contains("version 7"), "{e}");
        assert!(matches!(
            Snapshot::parse("s", b"{\"format\": \"prometheus\"}"),
            Err(SnapshotError::NotASnapshot { .. })
        ));
        let mut empty = sample();
        empty.intervals[0].counters.clear();
        empty.intervals[0].histograms.clear();
        assert!(matches!(
            Snapshot::parse("s", &empty.to_json()),
            Err(SnapshotError::Empty { .. })
        ));
        empty.intervals.clear();
        assert!(matches!(
            Snapshot::parse("s", &empty.to_json()),
            Err(SnapshotError::Empty { .. })
        ));
    }
}
