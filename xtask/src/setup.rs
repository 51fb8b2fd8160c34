//! `cargo xtask setup`: the toolchain recipe of the brief, made idempotent.

use std::{path::Path, process::Command};

use anyhow::{Context as _, bail};

use crate::{is_root, run_cmd};

/// Debian packages: LLVM 22 for bpf-linker (same major as rustc's LLVM),
/// PostgreSQL (server, psql, pgbench), Prometheus (promtool), curl and
/// Python for the tests; gcc, make and binutils for the allocation fixtures
/// (jemalloc is built from source, the no-allocator program with gcc, the
/// stripped copy with strip); qemu, busybox and cpio for the kernel
/// matrix's guests; Go for `go tool pprof`, which reads our pprof
/// output in a test; bpftrace, the baseline of the memory benchmark;
/// valgrind, whose count of allocator calls checks the fixture's own;
/// bpftool, which lists the programs a killed agent must not leave loaded.
/// Node.js and npm (see [`PROGRAMS`]) for the node-postgres test peer.
/// g++ for libFuzzer, which the fuzz targets link (libfuzzer-sys builds
/// it from source). Chromium, headless, renders the review's HTML reports.
const PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
    "postgresql",
    "prometheus",
    "curl",
    "python3",
    "python3-websockets",
    "gcc",
    "make",
    "binutils",
    "golang-go",
    "bpftrace",
    "bpftool",
    "valgrind",
    "g++",
    "chromium",
    // The kernel matrix: guests under emulation, their initramfs.
    "qemu-system-x86",
    "busybox-static",
    "cpio",
];

const BPF_LINKER_VERSION: &str = "0.13.0";
const CARGO_FUZZ_VERSION: &str = "0.13.2";

pub fn run() -> anyhow::Result<()> {
    rust_src()?;
    debian_packages()?;
    node_peers()?;
    bpf_linker()?;
    cargo_fuzz()?;
    tracefs();
    crate::matrix::kernels::ensure_cached();
    Ok(())
}

fn rust_src() -> anyhow::Result<()> {
    let sysroot = Command::new("rustc")
        .args(["--print", "sysroot"])
        .output()
        .context("rustc not found: install Rust with rustup")?;
    let sysroot = String::from_utf8_lossy(&sysroot.stdout).trim().to_owned();
    if Path::new(&sysroot)
        .join("lib/rustlib/src/rust/library/core")
        .is_dir()
    {
        return Ok(());
    }
    run_cmd(Command::new("rustup").args(["component", "add", "rust-src"]))
        .context("the kernel programs need rust-src (`rustup component add rust-src`)")
}

fn installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

fn privileged(program: &str) -> Command {
    if is_root() {
        Command::new(program)
    } else {
        let mut c = Command::new("sudo");
        c.arg(program);
        c
    }
}

/// Packages wanted only when their program is missing: a machine may have
/// Node.js from elsewhere (NodeSource's `nodejs` bundles npm, and Debian's
/// `npm` would not install beside it).
const PROGRAMS: &[(&str, &str)] = &[("node", "nodejs"), ("npm", "npm")];

fn on_path(program: &str) -> bool {
    Command::new(program)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// node-postgres for the probe tests' Node.js peer, at the versions of
/// `tests/peers/node/package-lock.json`.
fn node_peers() -> anyhow::Result<()> {
    let dir = crate::root().join("tests/peers/node");
    if dir.join("node_modules/pg/package.json").is_file() {
        return Ok(());
    }
    run_cmd(
        Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund", "--prefix"])
            .arg(&dir),
    )
    .context("installing the Node.js test peers' packages (npm ci)")
}

fn debian_packages() -> anyhow::Result<()> {
    let mut missing: Vec<&str> = PACKAGES.iter().copied().filter(|p| !installed(p)).collect();
    missing.extend(
        PROGRAMS
            .iter()
            .filter(|(program, _)| !on_path(program))
            .map(|(_, package)| *package),
    );
    if missing.is_empty() {
        return Ok(());
    }
    if Command::new("apt-get").arg("--version").output().is_err() {
        bail!(
            "missing packages {missing:?} and no apt-get: install them with your package manager"
        );
    }
    run_cmd(privileged("apt-get").args(["update", "-q"]))?;
    run_cmd(
        privileged("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing),
    )
    .with_context(|| format!("installing {missing:?}"))
}

fn bpf_linker() -> anyhow::Result<()> {
    let ok = Command::new("bpf-linker")
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if ok {
        return Ok(());
    }
    run_cmd(
        Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .env("LLVM_PREFIX", "/usr/lib/llvm-22")
            .args([
                "install",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
                "--locked",
                "--no-default-features",
                "--features",
                "llvm-22",
            ]),
    )
    .context("building bpf-linker against LLVM 22")
}

/// cargo-fuzz for `cargo xtask fuzz` (and the fuzz step of `test`). It
/// works on the stable toolchain: the `-Z` flags it passes are allowed by
/// the RUSTC_BOOTSTRAP=1 that xtask sets for it.
fn cargo_fuzz() -> anyhow::Result<()> {
    let ok = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["fuzz", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if ok {
        return Ok(());
    }
    run_cmd(
        Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())).args([
            "install",
            "cargo-fuzz",
            "--version",
            CARGO_FUZZ_VERSION,
            "--locked",
        ]),
    )
    .context("installing cargo-fuzz")
}

/// The agent mounts tracefs itself when it runs as root; mounting it here
/// too lets `pipelens check` and the tests see the events directory.
fn tracefs() {
    if Path::new("/sys/kernel/tracing/events").is_dir() {
        return;
    }
    let status = privileged("mount")
        .args(["-t", "tracefs", "tracefs", "/sys/kernel/tracing"])
        .status();
    if !status.is_ok_and(|s| s.success()) {
        eprintln!(
            "xtask: tracefs is not mounted and could not be mounted; \
             run `mount -t tracefs tracefs /sys/kernel/tracing` as root"
        );
    }
}
