//! The kernels of the matrix: Debian's own cloud kernels, fetched as
//! packages with `apt-get download` through a private sources list (nothing
//! is installed, nothing touches /boot) and cached, so a machine fetches each
//! one once.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use crate::run_cmd;

/// One kernel of the matrix: the newest cloud kernel of a Debian release.
pub struct KernelSpec {
    /// What tests and reports call it.
    pub name: &'static str,
    /// The release whose `linux-image-cloud-amd64` names the kernel.
    pub suite: &'static str,
}

/// The kernels our users' nodes run: Debian 11's 5.10 (also the minimum
/// pipelens supports), Debian 12's 6.1 and Debian 13's 6.12. The host's own
/// kernel is the fourth column of the matrix, tested by the host suite.
pub const KERNELS: &[KernelSpec] = &[
    KernelSpec {
        name: "5.10",
        suite: "bullseye",
    },
    KernelSpec {
        name: "6.1",
        suite: "bookworm",
    },
    KernelSpec {
        name: "6.12",
        suite: "trixie",
    },
];

/// A kernel ready to boot.
pub struct Kernel {
    pub name: &'static str,
    /// The Debian package it came from (`linux-image-…-cloud-amd64`).
    pub package: String,
    pub vmlinuz: PathBuf,
}

fn cache_dir() -> PathBuf {
    std::env::var_os("PIPELENS_KERNEL_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
            Path::new(&home).join(".cache/pipelens/kernels")
        })
}

/// The Debian mirrors this machine's apt already uses (deb822 `.sources`
/// files and the one-line `sources.list`): the archive, and the security
/// archive when there is one.
fn debian_mirrors() -> anyhow::Result<(String, Option<String>)> {
    let mut files: Vec<PathBuf> = std::fs::read_dir("/etc/apt/sources.list.d")
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    files.sort();
    let deb822: Vec<String> = files
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "sources"))
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .collect();
    let list = std::fs::read_to_string("/etc/apt/sources.list").unwrap_or_default();
    match mirrors_in(&deb822, &list) {
        (Some(a), security) => Ok((a, security)),
        (None, _) => {
            bail!("no Debian mirror in /etc/apt: the kernel matrix fetches Debian's kernels")
        }
    }
}

/// The archive and security mirrors named in apt sources: `deb822` files'
/// texts and a one-line `sources.list`.
fn mirrors_in(deb822: &[String], list: &str) -> (Option<String>, Option<String>) {
    let mut archive = None;
    let mut security = None;
    let mut note = |uri: &str, suites: &str| {
        let uri = uri.trim_end_matches('/').to_owned();
        if suites.split_whitespace().any(|s| s.ends_with("-security")) {
            security.get_or_insert(uri);
        } else if uri.contains("debian") {
            archive.get_or_insert(uri);
        }
    };
    for text in deb822 {
        for stanza in text.split("\n\n") {
            let field = |name: &str| {
                stanza.lines().find_map(|l| {
                    l.strip_prefix(name)
                        .and_then(|r| r.strip_prefix(':'))
                        .map(str::trim)
                })
            };
            let enabled = field("Enabled").is_none_or(|v| v != "no");
            let debs = field("Types").is_none_or(|t| t.split_whitespace().any(|t| t == "deb"));
            if let (true, true, Some(uris), Some(suites)) =
                (enabled, debs, field("URIs"), field("Suites"))
            {
                for uri in uris.split_whitespace() {
                    note(uri, suites);
                }
            }
        }
    }
    for line in list.lines() {
        let words: Vec<&str> = line
            .split_whitespace()
            .filter(|w| !w.starts_with('['))
            .collect();
        if let ["deb", uri, suite, ..] = words.as_slice() {
            note(uri, suite);
        }
    }
    (archive, security)
}

/// apt options that keep every list, cache and source of the matrix in
/// `dir`, apart from the system's own apt state.
fn apt_options(dir: &Path) -> Vec<String> {
    vec![
        format!(
            "-oDir::Etc::SourceList={}",
            dir.join("sources.list").display()
        ),
        "-oDir::Etc::SourceParts=/nonexistent".to_owned(),
        format!("-oDir::State::Lists={}", dir.join("lists").display()),
        format!("-oDir::Cache={}", dir.join("cache").display()),
        "-oDebug::NoLocking=1".to_owned(),
        "-q".to_owned(),
    ]
}

/// Called by `cargo xtask setup`: fetches each kernel of the matrix that
/// is not cached yet. Not fatal: the demo does not need them, and the
/// matrix says what is missing when it runs.
pub fn ensure_cached() {
    for spec in KERNELS {
        let dir = cache_dir().join(spec.suite);
        let cached = std::fs::read_to_string(dir.join("current"))
            .is_ok_and(|p| dir.join(p.trim()).join("vmlinuz").exists());
        if cached {
            continue;
        }
        if let Err(e) = fetch(spec) {
            eprintln!(
                "xtask: setup: kernel {} for the matrix not cached: {e:#}",
                spec.name
            );
        }
    }
}

/// The cached kernel of `spec` when there is one, else fetched now.
pub fn fetch(spec: &KernelSpec) -> anyhow::Result<Kernel> {
    let dir = cache_dir().join(spec.suite);
    let current = dir.join("current");
    match resolve_and_download(spec, &dir) {
        Ok(k) => {
            std::fs::write(&current, &k.package)?;
            Ok(k)
        }
        Err(e) => {
            // Offline: the last kernel fetched for this release still tests it.
            if let Ok(package) = std::fs::read_to_string(&current) {
                let vmlinuz = dir.join(package.trim()).join("vmlinuz");
                if vmlinuz.exists() {
                    eprintln!("xtask: {e:#}; using the cached {}", package.trim());
                    return Ok(Kernel {
                        name: spec.name,
                        package: package.trim().to_owned(),
                        vmlinuz,
                    });
                }
            }
            Err(e)
        }
    }
}

fn resolve_and_download(spec: &KernelSpec, dir: &Path) -> anyhow::Result<Kernel> {
    let (archive, security) = debian_mirrors()?;
    for sub in ["lists/partial", "cache/archives/partial", "debs"] {
        std::fs::create_dir_all(dir.join(sub))?;
    }
    let key = "/usr/share/keyrings/debian-archive-keyring.gpg";
    let mut sources = format!(
        "deb [signed-by={key}] {archive} {s} main\ndeb [signed-by={key}] {archive} {s}-updates main\n",
        s = spec.suite
    );
    if let Some(sec) = security {
        sources.push_str(&format!(
            "deb [signed-by={key}] {sec} {}-security main\n",
            spec.suite
        ));
    }
    std::fs::write(dir.join("sources.list"), sources)?;
    let opts = apt_options(dir);
    // A day-old list is fresh enough; the update is the slow part.
    let lists_age = std::fs::metadata(dir.join("lists/lock"))
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.elapsed().ok());
    if lists_age.is_none_or(|a| a.as_secs() > 24 * 3600) {
        run_cmd(Command::new("apt-get").args(&opts).arg("update"))
            .with_context(|| format!("apt-get update for {}", spec.suite))?;
        std::fs::write(dir.join("lists/lock"), b"")?;
    }
    let out = Command::new("apt-cache")
        .args(&opts)
        .args(["depends", "linux-image-cloud-amd64"])
        .output()
        .context("apt-cache")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let Some(package) = text.lines().find_map(|l| {
        l.trim()
            .strip_prefix("Depends: ")
            .filter(|p| p.starts_with("linux-image-"))
            .map(str::to_owned)
    }) else {
        bail!(
            "{}: linux-image-cloud-amd64 names no kernel:\n{text}",
            spec.suite
        );
    };
    let unpacked = dir.join(&package);
    let vmlinuz = unpacked.join("vmlinuz");
    if vmlinuz.exists() {
        return Ok(Kernel {
            name: spec.name,
            package,
            vmlinuz,
        });
    }
    let debs = dir.join("debs");
    run_cmd(
        Command::new("apt-get")
            .args(&opts)
            .args(["download", &package])
            .current_dir(&debs),
    )
    .with_context(|| format!("downloading {package}"))?;
    let deb = entry_starting(&debs, &format!("{package}_"))
        .with_context(|| format!("{package}: no .deb after apt-get download"))?;
    let tmp = dir.join("extract");
    let _ = std::fs::remove_dir_all(&tmp);
    run_cmd(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&tmp))?;
    let boot = tmp.join("boot");
    let image = entry_starting(&boot, "vmlinuz-")
        .with_context(|| format!("{package}: no /boot/vmlinuz-*"))?;
    std::fs::create_dir_all(&unpacked)?;
    std::fs::copy(&image, &vmlinuz)?;
    if let Some(config) = entry_starting(&boot, "config-") {
        std::fs::copy(config, unpacked.join("config"))?;
    }
    let _ = std::fs::remove_dir_all(&tmp);
    let _ = std::fs::remove_file(&deb);
    Ok(Kernel {
        name: spec.name,
        package,
        vmlinuz,
    })
}

/// The first entry of `dir` whose name starts with `prefix`.
fn entry_starting(dir: &Path, prefix: &str) -> Option<PathBuf> {
    std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(prefix))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mirrors_come_from_both_source_formats() {
        let deb822 = vec![
            "Types: deb\nURIs: http://mirror.example/debian/\nSuites: bookworm bookworm-updates\nComponents: main\n\n\
             Types: deb\nURIs: http://mirror.example/debian-security\nSuites: bookworm-security\nComponents: main\n"
                .to_owned(),
            // A disabled stanza and a source-only one name no mirror.
            "Types: deb\nEnabled: no\nURIs: http://other.example/debian\nSuites: trixie\n\n\
             Types: deb-src\nURIs: http://src.example/debian\nSuites: trixie\n"
                .to_owned(),
        ];
        assert_eq!(
            mirrors_in(&deb822, ""),
            (
                Some("http://mirror.example/debian".to_owned()),
                Some("http://mirror.example/debian-security".to_owned())
            )
        );
        let list = "# comment\ndeb [arch=amd64] http://list.example/debian bullseye main\n";
        assert_eq!(
            mirrors_in(&[], list),
            (Some("http://list.example/debian".to_owned()), None)
        );
        assert_eq!(mirrors_in(&[], ""), (None, None));
    }
}
