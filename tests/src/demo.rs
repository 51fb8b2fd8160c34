//! The demo pipeline and its load generator as test peers: one harness
//! for the probe tests (traced) and the demo's own smoke test (untraced).

use std::{
    path::Path,
    process::{Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::{child::Owned, free_port, http_get};

/// A running demo `pipeline` on a free loopback port.
pub struct Pipeline {
    process: Owned,
    pub port: u16,
}

impl Pipeline {
    /// Starts `bin` against `database_url` (plus `extra` flags) and waits
    /// until `/health` answers.
    pub fn start(bin: &Path, database_url: &str, extra: &[&str]) -> Pipeline {
        let port = free_port();
        let mut process = Owned::spawn(
            "the demo pipeline",
            Command::new(bin)
                .args(["--listen", &format!("127.0.0.1:{port}")])
                .args(["--database-url", database_url])
                .args(extra)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
            libc::SIGTERM,
        );
        process.wait_until("serving /health", Duration::from_secs(30), || {
            matches!(http_get(port, "/health"), Ok((200, _)))
        });
        Pipeline { process, port }
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// `GET path` as JSON; panics unless it answers 200.
    pub fn get_json(&self, path: &str) -> Value {
        let (status, body) = http_get(self.port, path).expect("HTTP GET");
        assert_eq!(status, 200, "GET {path}: {body}");
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {path}: {e}: {body}"))
    }

    /// `/stats` once every session has ended on the server side.
    pub fn settled_stats(&self) -> Value {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let stats = self.get_json("/stats");
            if stats["sessions_active"] == 0 && stats["outbound_queued"] == 0 {
                return stats;
            }
            assert!(Instant::now() < deadline, "sessions still active: {stats}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Runs the load generator `bin` against this pipeline; its summary.
    pub fn loadgen(&self, bin: &Path, args: &[&str]) -> Value {
        let out = Command::new(bin)
            .args(["--target", &self.addr()])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run loadgen");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "loadgen failed: {}\n{stdout}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("loadgen summary: {e}\n{stdout}"))
    }

    /// SIGTERM, then its exit status (it must stop on its own in 15 s).
    pub fn terminate(self) -> ExitStatus {
        self.process.stop(libc::SIGTERM, Duration::from_secs(15))
    }
}
