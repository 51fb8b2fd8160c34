//! Probe tests of the performance review: `pipelens record` against the
//! demo pipeline and its load generator (real WebSocket, HTTP and
//! PostgreSQL peers), each figure of the snapshot checked against what the
//! peers themselves counted.

use std::{process::Command, time::Duration};

use pipelens_review::snapshot::{Interval, Snapshot};
use pipelens_tests::{
    Agent, Peer, TempDir, demo::Pipeline, pg::TestPostgres, probes_available, workspace_root,
};

fn start_pipeline(pg: &TestPostgres, extra: &[&str]) -> Pipeline {
    let url = format!(
        "host=127.0.0.1 port={} user=postgres dbname=postgres",
        pg.port
    );
    Pipeline::start(
        &workspace_root().join("target/release/pipeline"),
        &url,
        extra,
    )
}

/// Whether `series` carries every wanted label; a wanted value ending in
/// `*` is a prefix.
fn matches(series: &pipelens_review::snapshot::Series, name: &str, want: &[(&str, &str)]) -> bool {
    series.name == name
        && want
            .iter()
            .all(|(k, v)| match (series.label(k), v.strip_suffix('*')) {
                (Some(have), Some(prefix)) => have.starts_with(prefix),
                (have, None) => have == Some(v),
                (None, Some(_)) => false,
            })
}

fn counter(i: &Interval, name: &str, want: &[(&str, &str)]) -> u64 {
    i.counters
        .iter()
        .filter(|c| matches(&c.series, name, want))
        .map(|c| c.value)
        .sum()
}

fn observations(i: &Interval, name: &str, want: &[(&str, &str)]) -> u64 {
    i.histograms
        .iter()
        .filter(|h| matches(&h.series, name, want))
        .map(|h| h.sketch.count() as u64)
        .sum()
}

fn vm_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse().ok())
        .expect("VmRSS");
    kib * 1024
}

/// A recorded run of the demo pipeline under a known load: every message,
/// statement and request in the snapshot's intervals, summed, equals the
/// load generator's and the pipeline's own counts; the intervals tile the
/// run; the pipeline's memory is in every interval; and no literal the
/// peers sent (event kinds, a query string) is anywhere in the file.
#[test]
fn record_books_every_interval_exactly() {
    if !probes_available("record_books_every_interval_exactly") {
        return;
    }
    let pg = TestPostgres::start();
    let agent = Agent::record(&["--comm", "pipeline", "--duration", "14", "--interval", "2"]);
    let app = start_pipeline(&pg, &[]);
    let summary = app.loadgen(
        &workspace_root().join("target/release/loadgen"),
        &[
            "--sessions",
            "6",
            "--subscriber-share",
            "0",
            "--rate",
            "40",
            "--messages",
            "120",
            "--kinds",
            "plantedkindq7x",
            "--http-requests",
            "25",
            "--http-path",
            "/recent?limit=3&token=plantedtokenz9",
        ],
    );
    let stats = app.settled_stats();
    let rss_now = vm_rss(app.pid());
    let (status, bytes) = agent.wait_exit(Duration::from_secs(60));
    assert!(status.success(), "record exited with {status}");
    let bytes = bytes.expect("snapshot written");
    let text = String::from_utf8_lossy(&bytes);
    assert!(
        !text.contains("planted"),
        "a literal the peers sent reached the snapshot"
    );
    let s = Snapshot::parse("snapshot", &bytes).expect("a valid snapshot");
    assert_eq!(s.partial, None);
    assert_eq!(s.targets.comms, ["pipeline"]);

    // The intervals tile the run: each starts where the last ended, all
    // but the last are one interval long.
    let n = s.intervals.len();
    assert!((7..=8).contains(&n), "{n} intervals of 2 s in 14 s");
    let mut at = 0.0;
    for (k, i) in s.intervals.iter().enumerate() {
        assert!(
            (i.start_seconds - at).abs() < 1e-6,
            "interval {k} starts at {}",
            i.start_seconds
        );
        if k + 1 < n {
            assert!(
                (i.duration_seconds - 2.0).abs() < 0.5,
                "interval {k}: {}",
                i.duration_seconds
            );
        }
        at = i.start_seconds + i.duration_seconds;
    }
    assert!(
        (at - s.duration_seconds).abs() < 0.5,
        "{at} of {}",
        s.duration_seconds
    );

    let total = |f: &dyn Fn(&Interval) -> u64| s.intervals.iter().map(f).sum::<u64>();
    let sent = summary["publishers"]["messages_sent"]
        .as_u64()
        .expect("messages_sent");
    assert_eq!(sent, 6 * 120);
    let received = total(&|i| {
        counter(
            i,
            "pipelens_websocket_messages_total",
            &[("process", "pipeline"), ("direction", "received")],
        )
    });
    assert_eq!(received, sent, "messages the pipeline received");
    let stored = stats["events_stored"].as_u64().expect("events_stored");
    let inserts = total(&|i| {
        observations(
            i,
            "pipelens_db_query_duration_seconds",
            &[
                ("process", "pipeline"),
                ("query", "INSERT INTO events*"),
                ("status", "ok"),
            ],
        )
    });
    assert_eq!(
        inserts, stored,
        "one INSERT per stored event (per-event mode)"
    );
    let requests = total(&|i| {
        observations(
            i,
            "pipelens_http_server_request_duration_seconds",
            &[("process", "pipeline"), ("route", "/recent")],
        )
    });
    assert_eq!(requests, 25, "GET /recent requests");
    let sessions = total(&|i| {
        counter(
            i,
            "pipelens_websocket_sessions_total",
            &[("process", "pipeline")],
        )
    });
    assert_eq!(sessions, 6);
    // The six sessions were open at once: some interval saw them all.
    let peak = s
        .intervals
        .iter()
        .map(|i| {
            i.gauges
                .iter()
                .filter(|g| g.series.name == "pipelens_websocket_sessions_active")
                .map(|g| g.max)
                .sum::<f64>()
        })
        .fold(0.0, f64::max);
    assert_eq!(peak, 6.0, "peak concurrent sessions");

    // The pipeline's memory, every interval, near what /proc says now.
    for (k, i) in s.intervals.iter().enumerate() {
        let p = i
            .processes
            .iter()
            .find(|p| p.process == "pipeline")
            .unwrap_or_else(|| panic!("interval {k} lists no pipeline: {:?}", i.processes));
        assert!(p.rss_bytes > 1 << 20, "{p:?}");
    }
    let last = s.intervals[n - 1]
        .processes
        .iter()
        .find(|p| p.process == "pipeline")
        .unwrap();
    let ratio = last.rss_bytes as f64 / rss_now as f64;
    assert!(
        (0.75..1.33).contains(&ratio),
        "last RSS {} vs /proc {rss_now}",
        last.rss_bytes
    );
    drop(app);
    drop(pg);

    // The snapshot analysed, as a page a reviewer opens.
    let dir = TempDir::new("review");
    let path = dir.path.join("snapshot.json");
    std::fs::write(&path, &bytes).expect("write snapshot");
    let html = dir.path.join("analysis.html");
    let out = Command::new(pipelens_tests::pipelens_bin())
        .arg("analyse")
        .arg(&path)
        .args(["--format", "html", "-o"])
        .arg(&html)
        .output()
        .expect("pipelens analyse");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_renders(&html);
}

/// A report renders in headless Chromium without a console message or a
/// failed load, and its screenshot shows its charts: more than text on
/// white below the title.
fn assert_renders(page: &std::path::Path) {
    let shot = pipelens_tests::browser::render(page);
    assert!(shot.console.is_empty(), "console: {:#?}", shot.console);
    let inked = shot.inked_fraction(0.1);
    assert!(inked > 0.02, "a blank page: {:.3} of it inked", inked);
    assert!(shot.colours() > 16, "no chart colours: {}", shot.colours());
}

/// `record --pid` on a process that exits mid-run: the recording ends
/// then, is written, marked partial, and holds what the process did.
#[test]
fn record_of_a_pid_that_exits_is_written_partial() {
    if !probes_available("record_of_a_pid_that_exits_is_written_partial") {
        return;
    }
    let peer = env!("CARGO_BIN_EXE_tcp-peer");
    let port = pipelens_tests::free_port();
    let addr = format!("127.0.0.1:{port}");
    // A server for three connections, which then exits.
    let mut server = Peer::spawn(peer, &["serve", &addr, "3", "100", "1000", "0"]);
    server.expect("ready");
    let pid = server.pid().to_string();
    let agent = Agent::record(&["--pid", &pid, "--duration", "60", "--interval", "1"]);
    let mut client = Peer::spawn(peer, &["connect", &addr, "3", "100", "1000", "0", "1"]);
    client.expect("ready");
    client.expect("done");
    server.expect("done");
    server.wait();
    client.wait();
    let started = std::time::Instant::now();
    let (status, bytes) = agent.wait_exit(Duration::from_secs(20));
    assert!(status.success(), "record exited with {status}");
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "the recording went on without its target"
    );
    let s = Snapshot::parse("snapshot", &bytes.expect("snapshot written")).expect("valid");
    let why = s.partial.as_deref().expect("marked partial");
    assert!(why.contains("exited") && why.contains(&pid), "{why}");
    assert!(s.duration_seconds < 30.0, "{}", s.duration_seconds);
    let opened: u64 = s
        .intervals
        .iter()
        .map(|i| {
            counter(
                i,
                "pipelens_tcp_connections_opened_total",
                &[("direction", "inbound")],
            )
        })
        .sum();
    assert_eq!(opened, 3, "the server's three connections");
}

/// A disk that fills while the snapshot is written: `record` fails, says
/// why, and leaves nothing under the output's name (nor a temporary file).
#[test]
fn a_full_disk_leaves_no_half_written_snapshot() {
    if !probes_available("a_full_disk_leaves_no_half_written_snapshot") {
        return;
    }
    let dir = TempDir::new("full-disk");
    let mnt = dir.path.join("mnt");
    std::fs::create_dir(&mnt).expect("mkdir");
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=4k", "tmpfs"])
        .arg(&mnt)
        .status()
        .expect("mount");
    assert!(mounted.success(), "mount a 4 KiB tmpfs");
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(mnt.clone());
    let out = mnt.join("snapshot.json");
    let out_arg = out.to_string_lossy().into_owned();
    let agent = Agent::record(&[
        "--comm",
        "pipeline",
        "--duration",
        "3",
        "--interval",
        "1",
        "-o",
        &out_arg,
    ]);
    let (status, _) = agent.wait_exit(Duration::from_secs(30));
    assert!(
        !status.success(),
        "a snapshot that did not fit was reported written"
    );
    let left: Vec<_> = std::fs::read_dir(&mnt)
        .expect("read mnt")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}
