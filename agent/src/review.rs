//! `pipelens analyse` and `pipelens compare`: the review's analysis and
//! validation phases over snapshots `pipelens record` wrote
//! (`pipelens_review`). They read files only: no kernel, no privileges.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use pipelens_review::{analyse, snapshot::Snapshot};

/// What `pipelens analyse` was asked for.
#[derive(Clone, Debug)]
pub struct AnalyseOptions {
    pub snapshot: PathBuf,
    pub format: analyse::Format,
    pub output: Option<PathBuf>,
}

/// Reads the snapshot, finds what to fix, writes the report.
pub fn analyse(opts: &AnalyseOptions) -> anyhow::Result<()> {
    if let Some(path) = &opts.output {
        crate::output::check_writable(path).context("--output")?;
    }
    let snapshot = Snapshot::read(&opts.snapshot)?;
    let report = analyse::analyse(&snapshot).render(opts.format);
    emit(&report, opts.output.as_deref())
}

/// The report to standard output, or atomically to `output`.
fn emit(report: &str, output: Option<&Path>) -> anyhow::Result<()> {
    match output {
        Some(path) => {
            crate::output::write_atomically(path, report.as_bytes())?;
            eprintln!("report written to {}", path.display());
            Ok(())
        }
        None => {
            use std::io::Write as _;
            let mut out = std::io::stdout().lock();
            out.write_all(report.as_bytes())?;
            if !report.ends_with('\n') {
                out.write_all(b"\n")?;
            }
            Ok(())
        }
    }
}
