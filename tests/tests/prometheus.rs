//! pipelens feeds a real Prometheus: the Debian package's server scrapes
//! the agent, and PromQL over what it stored gives back exact counts and a
//! quantile from the bucketed histograms.

use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use pipelens_tests::{Agent, Peer, TempDir, child::Owned, free_port, http_get, probes_available};

const PEER: &str = env!("CARGO_BIN_EXE_tcp-peer");

struct Prometheus {
    /// Read by nobody: stopped (SIGTERM) and reaped on drop.
    _process: Owned,
    port: u16,
    _dir: TempDir,
}

impl Prometheus {
    fn start(target_port: u16) -> Prometheus {
        let dir = TempDir::new("prometheus");
        let port = free_port();
        let config = dir.path.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: pipelens\n    static_configs:\n      - targets: ['127.0.0.1:{target_port}']\n"
            ),
        )
        .expect("config");
        let process = Owned::spawn(
            "prometheus (cargo xtask setup installs it)",
            Command::new("prometheus")
                .arg(format!("--config.file={}", config.display()))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    dir.path.join("data").display()
                ))
                .arg(format!("--web.listen-address=127.0.0.1:{port}"))
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
            libc::SIGTERM,
        );
        Prometheus {
            _process: process,
            port,
            _dir: dir,
        }
    }

    /// The scalar value of an instant PromQL query, if it has one sample.
    fn value(&self, promql: &str) -> Option<f64> {
        let encoded: String = promql
            .bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect();
        let (code, body) = http_get(self.port, &format!("/api/v1/query?query={encoded}")).ok()?;
        if code != 200 {
            return None;
        }
        let doc: serde_json::Value = serde_json::from_str(&body).ok()?;
        let result = doc["data"]["result"].as_array()?;
        if result.len() != 1 {
            return None;
        }
        result[0]["value"][1].as_str()?.parse().ok()
    }

    fn wait_for(&self, promql: &str, want: impl Fn(f64) -> bool) -> f64 {
        let start = Instant::now();
        loop {
            if let Some(v) = self.value(promql)
                && want(v)
            {
                return v;
            }
            assert!(
                start.elapsed() < Duration::from_secs(40),
                "Prometheus never answered `{promql}` as expected (last: {:?})",
                self.value(promql)
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

#[test]
fn prometheus_scrapes_exact_counts_and_histograms() {
    if !probes_available("prometheus_scrapes_exact_counts_and_histograms") {
        return;
    }
    let agent = Agent::start(&["--comm", "tcp-peer", "--collectors", "connections"]);
    let prom = Prometheus::start(agent.port);
    prom.wait_for("up{job=\"pipelens\"}", |v| v == 1.0);
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let mut server = Peer::spawn(PEER, &["serve", &addr, "5", "10", "10", "5"]);
    server.expect("ready");
    let mut client = Peer::spawn(PEER, &["connect", &addr, "5", "10", "10", "0", "1"]);
    client.expect("ready");
    client.expect("done");
    server.wait();
    client.wait();
    let p = port.to_string();
    let opened =
        format!("sum(pipelens_tcp_connections_opened_total{{process=\"tcp-peer\",port=\"{p}\"}})");
    assert_eq!(prom.wait_for(&opened, |v| v >= 10.0), 10.0);
    let closed =
        format!("sum(pipelens_tcp_connections_closed_total{{process=\"tcp-peer\",port=\"{p}\"}})");
    assert_eq!(prom.wait_for(&closed, |v| v >= 10.0), 10.0);
    // Real buckets: a quantile computed by Prometheus itself, at least the
    // server's 5 ms hold and under a second.
    let median = format!(
        "histogram_quantile(0.5, sum by (le) (pipelens_tcp_connection_duration_seconds_bucket{{port=\"{p}\",direction=\"inbound\"}}))"
    );
    let q = prom.wait_for(&median, |v| v.is_finite());
    assert!((0.005..1.0).contains(&q), "median lifetime {q}");
    assert_eq!(
        prom.wait_for("pipelens_collector_up{collector=\"connections\"}", |v| v
            == 1.0),
        1.0
    );
    agent.stop();
}
