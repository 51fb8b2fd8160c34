//! Files the agent writes for its users (summaries, snapshots, reports):
//! checked before a run starts, written so that no reader ever finds half a
//! file under the final name.

use std::{io::Write as _, path::Path};

use anyhow::Context as _;

/// Writes `bytes` to `path` through a temporary sibling, synced and renamed;
/// on any failure (disk full) the temporary file is removed and nothing is
/// left under `path`.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .with_context(|| format!("{} names no file", path.display()))?;
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("cannot write {}", path.display()));
    }
    Ok(())
}

/// Checks that `path` can be written (its directory exists and takes a
/// file), so that a bad path fails before a run, not after it. An existing
/// file is left as it is.
pub fn check_writable(path: &Path) -> anyhow::Result<()> {
    if path.is_dir() {
        anyhow::bail!("{} is a directory", path.display());
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let probe = dir.join(format!(".pipelens-probe.{}.tmp", std::process::id()));
    std::fs::File::create(&probe).with_context(|| format!("cannot write {}", path.display()))?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_write_leaves_nothing_under_the_final_name() {
        // /proc takes no new files: the write fails and leaves nothing.
        let path = Path::new("/proc/pipelens-output.json");
        assert!(write_atomically(path, b"{}").is_err());
        assert!(!path.exists());
        assert!(check_writable(Path::new("/nonexistent-dir/s.json")).is_err());
        assert!(check_writable(Path::new("/tmp")).is_err());
        assert!(check_writable(Path::new("/tmp/pipelens-check.json")).is_ok());
    }
}
