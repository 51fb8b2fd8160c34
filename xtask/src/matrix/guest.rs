//! One guest of the matrix: the kernel booted under `qemu-system-x86_64
//! -accel tcg` (KVM is not usable on these machines) with the initramfs,
//! its console on the first serial port and the checks' output on the
//! second, so that kernel messages never interleave with results.

use std::{
    io::{Read as _, Seek as _, SeekFrom},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::Context as _;

use super::kernels::Kernel;

/// The marker the init script puts before its own lines.
pub const MARK: &str = "@@@ ";

pub struct Guest {
    pub kernel: String,
    child: Child,
    pub console: PathBuf,
    pub results: PathBuf,
    started: Instant,
    read: u64,
    partial: String,
    pub lines: Vec<String>,
    timeout: Duration,
    pub timed_out: bool,
    finished: Option<Duration>,
}

impl Guest {
    pub fn boot(
        kernel: &Kernel,
        initramfs: &Path,
        dir: &Path,
        cpus: usize,
        timeout: Duration,
    ) -> anyhow::Result<Guest> {
        let console = dir.join(format!("console-{}.log", kernel.name));
        let results = dir.join(format!("results-{}.log", kernel.name));
        std::fs::write(&results, b"")?;
        let child = Command::new("qemu-system-x86_64")
            .args(["-accel", "tcg,thread=multi", "-cpu", "max", "-m", "4096"])
            .args(["-smp", &cpus.to_string()])
            .args(["-nodefaults", "-display", "none", "-monitor", "none"])
            .args(["-no-reboot", "-nic", "none"])
            .arg("-kernel")
            .arg(&kernel.vmlinuz)
            .arg("-initrd")
            .arg(initramfs)
            .args([
                "-append",
                "console=ttyS0 rdinit=/init panic=-1 mitigations=off loglevel=4",
            ])
            .arg("-serial")
            .arg(format!("file:{}", console.display()))
            .arg("-serial")
            .arg(format!("file:{}", results.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .context("qemu-system-x86_64 (installed by `cargo xtask setup`)")?;
        Ok(Guest {
            kernel: kernel.name.to_owned(),
            child,
            console,
            results,
            started: Instant::now(),
            read: 0,
            partial: String::new(),
            lines: Vec::new(),
            timeout,
            timed_out: false,
            finished: None,
        })
    }

    /// New complete lines of the results port since the last call; `None`
    /// once the guest has powered off (or was stopped at its time limit).
    pub fn poll(&mut self) -> Option<Vec<String>> {
        let mut new = Vec::new();
        let exited = self.child.try_wait().ok().flatten().is_some();
        if let Ok(mut f) = std::fs::File::open(&self.results)
            && f.seek(SeekFrom::Start(self.read)).is_ok()
        {
            let mut buf = Vec::new();
            if let Ok(n) = f.read_to_end(&mut buf) {
                self.read += n as u64;
                self.partial.push_str(&String::from_utf8_lossy(&buf));
            }
        }
        while let Some(i) = self.partial.find('\n') {
            let line = self.partial[..i].trim_end_matches('\r').to_owned();
            self.partial.drain(..=i);
            new.push(line);
        }
        self.lines.extend(new.iter().cloned());
        if exited {
            self.finished.get_or_insert(self.started.elapsed());
            if !self.partial.is_empty() {
                let rest = std::mem::take(&mut self.partial);
                self.lines.push(rest.clone());
                new.push(rest);
            }
            return if new.is_empty() { None } else { Some(new) };
        }
        if self.started.elapsed() > self.timeout {
            self.timed_out = true;
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        Some(new)
    }

    /// From boot to power-off (or to now, while it runs).
    pub fn elapsed(&self) -> Duration {
        self.finished.unwrap_or_else(|| self.started.elapsed())
    }

    /// The last `n` lines the kernel printed, for a failure report.
    pub fn console_tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(&self.console).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
