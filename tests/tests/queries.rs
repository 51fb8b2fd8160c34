//! Probe tests of the queries collector against a real PostgreSQL started
//! here, with real clients (pgbench, psql, a Python client), compared with
//! what those clients report themselves.

use std::{io::Write, process::Stdio, time::Duration};

use pipelens_tests::{Agent, Metrics, pg::TestPostgres, probes_available};

const WAIT: Duration = Duration::from_secs(20);
const SELECT_TEMPLATE: &str = "SELECT abalance FROM pgbench_accounts WHERE aid = ?";

/// Statements of `process` on this test's database (a `--comm` target may
/// match other processes of the same name elsewhere on the host).
fn count(m: &Metrics, process: &str, query: &str) -> f64 {
    m.sum(
        "pipelens_db_query_duration_seconds_count",
        &[
            ("process", process),
            ("query", query),
            ("db_name", "postgres"),
        ],
    )
}

/// Statements of `process` on any database: a connection opened before the
/// agent started never showed its StartupMessage, so its database is
/// reported as `unknown`.
fn count_any_db(m: &Metrics, process: &str, query: &str) -> f64 {
    m.sum(
        "pipelens_db_query_duration_seconds_count",
        &[("process", process), ("query", query)],
    )
}

fn pgbench(pg: &TestPostgres, mode: &str, unix: bool, extra: &[&str]) -> u64 {
    let mut args = vec!["-S", "-M", mode, "-c", "4", "-j", "2"];
    args.extend_from_slice(extra);
    let out = pg.pgbench(unix, &args);
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.strip_prefix("number of transactions actually processed: "))
        .and_then(|v| v.split('/').next()?.trim().parse().ok())
        .unwrap_or_else(|| panic!("pgbench output without a transaction count:\n{text}"))
}

fn init_pgbench(pg: &TestPostgres) {
    pg.pgbench(false, &["-i", "-s", "1", "-q"]);
}

/// pgbench -S in the simple, extended and prepared protocols, over TCP and
/// over the Unix socket: the agent counts exactly the transactions pgbench
/// reports, under one template, in the histogram and in the summary.
#[test]
fn pgbench_counts_are_exact() {
    if !probes_available("pgbench_counts_are_exact") {
        return;
    }
    let pg = TestPostgres::start();
    init_pgbench(&pg);
    // Both ends: pgbench as the client, the PostgreSQL backends (forked by
    // the postmaster, which runs already) as the server.
    let agent = Agent::start(&[
        "--comm",
        "pgbench",
        "--comm",
        "postgres",
        "--collectors",
        "queries",
    ]);
    let mut expected = 0u64;
    for unix in [false, true] {
        for mode in ["simple", "extended", "prepared"] {
            let n = pgbench(&pg, mode, unix, &["-T", "2"]);
            // An emulated CPU (kernel matrix) runs a few hundred a second.
            let least = if pipelens_tests::emulated() { 10 } else { 100 };
            assert!(n > least, "pgbench ran only {n} transactions");
            expected += n;
            let m = agent.wait_for(
                &format!("{expected} statements after {mode} unix={unix}"),
                WAIT,
                |m| count(m, "pgbench", SELECT_TEMPLATE) >= expected as f64,
            );
            std::thread::sleep(Duration::from_millis(300));
            let m2 = agent.metrics();
            assert_eq!(
                count(&m2, "pgbench", SELECT_TEMPLATE),
                expected as f64,
                "mode {mode}, unix socket {unix}:\n{}",
                m.dump()
            );
            assert_eq!(
                count(&m2, "postgres", SELECT_TEMPLATE),
                expected as f64,
                "server side, mode {mode}, unix socket {unix}:\n{}",
                m2.dump()
            );
        }
    }
    let m = agent.metrics();
    assert_eq!(
        m.sum(
            "pipelens_db_query_errors_total",
            &[("process", "pgbench"), ("query", SELECT_TEMPLATE)]
        ),
        0.0
    );
    assert_eq!(
        m.sum("pipelens_db_parse_errors_total", &[]),
        0.0,
        "{}",
        m.dump()
    );
    let labels = m
        .samples
        .iter()
        .find(|(n, l, _)| {
            n == "pipelens_db_query_duration_seconds_count"
                && l.get("query").map(String::as_str) == Some(SELECT_TEMPLATE)
        })
        .map(|(_, l, _)| l.clone())
        .expect("series");
    assert_eq!(
        labels["role"],
        if labels["process"] == "pgbench" {
            "client"
        } else {
            "server"
        }
    );
    assert_eq!(labels["db_name"], "postgres");
    assert_eq!(labels["db_system"], "postgresql");
    assert_eq!(labels["operation"], "SELECT");
    assert_eq!(labels["status"], "ok");
    // pgbench's own setup statements, each once per run: they are its
    // known extra statements, reported apart from the benchmark's.
    for setup in [
        "select count(*) from pgbench_branches",
        "vacuum pgbench_branches",
        "truncate pgbench_history",
    ] {
        assert_eq!(count(&m, "pgbench", setup), 6.0, "{setup}\n{}", m.dump());
    }
    let summary = agent.stop();
    let row = summary["queries"]["templates"]
        .as_array()
        .expect("templates")
        .iter()
        .find(|t| t["labels"]["query"] == SELECT_TEMPLATE)
        .expect("template in summary");
    assert_eq!(row["count"], expected);
    assert!(row["duration_seconds"]["p99"].as_f64().expect("p99") > 0.0);
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * q).round() as usize]
}

/// The agent's p50 and p99 agree with the ones pgbench logs per
/// transaction (`--log`) within 10 % or 100 µs.
#[test]
fn latency_matches_pgbench_log() {
    if !probes_available("latency_matches_pgbench_log") {
        return;
    }
    let pg = TestPostgres::start();
    init_pgbench(&pg);
    let agent = Agent::start(&["--comm", "pgbench", "--collectors", "queries"]);
    let n = pgbench(
        &pg,
        "prepared",
        false,
        &["-T", "3", "--log", "--log-prefix", "txlog"],
    );
    let m = agent.wait_for("all statements", WAIT, |m| {
        count(m, "pgbench", SELECT_TEMPLATE) >= n as f64
    });
    assert_eq!(count(&m, "pgbench", SELECT_TEMPLATE), n as f64);
    let summary = agent.stop();
    let truth = logged_latencies(&pg, "txlog");
    assert_eq!(truth.len() as u64, n, "pgbench logged every transaction");
    assert_quantiles_match(
        &summary,
        SELECT_TEMPLATE,
        &truth,
        &[(0.5, "p50"), (0.99, "p99")],
    );
}

/// Per-transaction latencies pgbench logged (`--log --log-prefix PREFIX`),
/// in seconds, sorted.
fn logged_latencies(pg: &TestPostgres, prefix: &str) -> Vec<f64> {
    let mut truth = Vec::new();
    for entry in std::fs::read_dir(pg.path()).expect("dir").flatten() {
        if entry.file_name().to_string_lossy().starts_with(prefix) {
            let text = std::fs::read_to_string(entry.path()).expect("log");
            // client_id transaction_no time script_no time_epoch time_us
            truth.extend(text.lines().filter_map(|l| {
                l.split_whitespace()
                    .nth(2)?
                    .parse::<f64>()
                    .ok()
                    .map(|us| us / 1e6)
            }));
        }
    }
    truth.sort_by(f64::total_cmp);
    truth
}

/// The summary's quantiles of `template` against the client's own (sorted)
/// latencies: within 10 % or 100 µs (the agent times the syscalls, pgbench
/// its own calls around them).
fn assert_quantiles_match(
    summary: &serde_json::Value,
    template: &str,
    truth: &[f64],
    quantiles: &[(f64, &str)],
) {
    let row = summary["queries"]["templates"]
        .as_array()
        .expect("templates")
        .iter()
        .find(|t| t["labels"]["query"] == template)
        .expect("template");
    assert_eq!(row["count"], truth.len(), "{row}");
    for &(q, name) in quantiles {
        let want = percentile(truth, q);
        let got = row["duration_seconds"][name].as_f64().expect("quantile");
        let diff = (got - want).abs();
        assert!(
            diff <= want * 0.10 || diff <= 100e-6,
            "{name}: agent {got:.6}s vs pgbench {want:.6}s"
        );
    }
}

/// 150,000 statements whose latency changes after the first 100,000 (a
/// `pg_sleep(0)`, then a `pg_sleep(0.0005)`, one template): the summary's
/// p50, p95 and p99 are the whole run's as pgbench logged it — p95 and
/// p99 fall in the slow part. (A summary that kept only its first samples
/// reported the fast part's.)
#[test]
fn summary_quantiles_cover_the_whole_run() {
    if !probes_available("summary_quantiles_cover_the_whole_run") {
        return;
    }
    let pg = TestPostgres::start();
    let script = pg.path().join("sleep.sql");
    std::fs::write(&script, "SELECT pg_sleep(:d);\n").expect("script");
    let script = script.display().to_string();
    let agent = Agent::start(&["--comm", "pgbench", "--collectors", "queries"]);
    for (prefix, per_client, delay) in [("fast", "25000", "d=0"), ("slow", "12500", "d=0.0005")] {
        pg.pgbench(
            false,
            &[
                "-n",
                "-M",
                "prepared",
                "-c",
                "4",
                "-j",
                "2",
                "-t",
                per_client,
                "-f",
                &script,
                "-D",
                delay,
                "--log",
                "--log-prefix",
                prefix,
            ],
        );
    }
    let template = "SELECT pg_sleep(?)";
    let m = agent.wait_for("150,000 statements", WAIT, |m| {
        count(m, "pgbench", template) >= 150_000.0
    });
    assert_eq!(count(&m, "pgbench", template), 150_000.0);
    let summary = agent.stop();
    let mut truth = logged_latencies(&pg, "fast");
    truth.extend(logged_latencies(&pg, "slow"));
    truth.sort_by(f64::total_cmp);
    assert_eq!(truth.len(), 150_000, "pgbench logged every transaction");
    assert_quantiles_match(
        &summary,
        template,
        &truth,
        &[(0.5, "p50"), (0.95, "p95"), (0.99, "p99")],
    );
}

/// A syntax error, a unique violation and a division by zero give exactly
/// one 42601, one 23505 and one 22012.
#[test]
fn errors_by_sqlstate() {
    if !probes_available("errors_by_sqlstate") {
        return;
    }
    let pg = TestPostgres::start();
    assert!(
        pg.psql("CREATE TABLE u (id int PRIMARY KEY); INSERT INTO u VALUES (1);")
            .status
            .success()
    );
    let agent = Agent::start(&["--comm", "psql", "--collectors", "queries"]);
    for sql in [
        "SELEC 1",
        "INSERT INTO u VALUES (1)",
        "SELECT 1/0",
        "SELECT 2",
    ] {
        pg.psql(sql);
    }
    let errors = |m: &Metrics, state: &str| {
        m.sum(
            "pipelens_db_query_errors_total",
            &[("process", "psql"), ("sqlstate", state)],
        )
    };
    let m = agent.wait_for("three errors", WAIT, |m| {
        errors(m, "42601") + errors(m, "23505") + errors(m, "22012") >= 3.0
            && count(m, "psql", "SELECT ?") >= 1.0
    });
    assert_eq!(errors(&m, "42601"), 1.0, "{}", m.dump());
    assert_eq!(errors(&m, "23505"), 1.0);
    assert_eq!(errors(&m, "22012"), 1.0);
    assert_eq!(
        m.sum("pipelens_db_query_errors_total", &[("process", "psql")]),
        3.0
    );
    assert_eq!(
        m.sum(
            "pipelens_db_query_errors_total",
            &[("sqlstate", "23505"), ("operation", "INSERT")]
        ),
        1.0
    );
}

/// 100 statements of 3 templates in one pipeline (pgbench's
/// \startpipeline, one Sync for all): each template's count is exact, and
/// the statements' service times leave out their wait in the queue.
#[test]
fn pipelined_batch_is_paired_in_order() {
    if !probes_available("pipelined_batch_is_paired_in_order") {
        return;
    }
    let pg = TestPostgres::start();
    init_pgbench(&pg);
    let mut script = String::from("\\startpipeline\n");
    for i in 0..100 {
        script.push_str(match i % 3 {
            0 => "SELECT abalance FROM pgbench_accounts WHERE aid = 7;\n",
            1 => "SELECT count(*) FROM pgbench_tellers WHERE tid < 5;\n",
            _ => "SELECT bbalance, bid FROM pgbench_branches WHERE bid = 1;\n",
        });
    }
    script.push_str("\\endpipeline\n");
    let path = pg.path().join("pipeline.sql");
    std::fs::write(&path, script).expect("script");
    let agent = Agent::start(&["--comm", "pgbench", "--collectors", "queries"]);
    let script = path.display().to_string();
    pg.pgbench(
        false,
        &["-n", "-M", "extended", "-t", "2", "-c", "1", "-f", &script],
    );
    let m = agent.wait_for("200 pipelined statements", WAIT, |m| {
        m.sum(
            "pipelens_db_query_duration_seconds_count",
            &[("process", "pgbench")],
        ) >= 200.0
    });
    assert_eq!(count(&m, "pgbench", SELECT_TEMPLATE), 68.0, "{}", m.dump());
    assert_eq!(
        count(
            &m,
            "pgbench",
            "SELECT count(*) FROM pgbench_tellers WHERE tid < ?"
        ),
        66.0
    );
    assert_eq!(
        count(
            &m,
            "pgbench",
            "SELECT bbalance, bid FROM pgbench_branches WHERE bid = ?"
        ),
        66.0
    );
    assert_eq!(m.sum("pipelens_db_query_errors_total", &[]), 0.0);
    // Every statement also has its service time: the batch's statements
    // follow one another on the server, so their services tile the batch
    // (a sum near one batch's span each time), while their latencies each
    // include the wait behind the earlier ones.
    let pgbench = [("process", "pgbench")];
    let total = |name: &str| m.sum(name, &pgbench);
    assert_eq!(
        total("pipelens_db_query_service_seconds_count"),
        total("pipelens_db_query_duration_seconds_count")
    );
    let (service, latency) = (
        total("pipelens_db_query_service_seconds_sum"),
        total("pipelens_db_query_duration_seconds_sum"),
    );
    assert!(
        service > 0.0 && service < latency / 2.0,
        "service {service} s, latency {latency} s"
    );
}

/// A connection opened before the agent starts (a pooled connection):
/// statements issued after the start are counted. And literals never
/// reach /metrics or the summary.
#[test]
fn pooled_connection_and_no_literals() {
    if !probes_available("pooled_connection_and_no_literals") {
        return;
    }
    let pg = TestPostgres::start();
    let mut args: Vec<String> = pg.conn_args(true);
    args.extend(["-X".into(), "-q".into(), "-d".into(), "postgres".into()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut psql = pg
        .command(&pg.bin("psql"), &args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("psql");
    let stdin = psql.stdin.as_mut().expect("stdin");
    writeln!(stdin, "SELECT 'before the agent';").expect("write");
    stdin.flush().expect("flush");
    std::thread::sleep(Duration::from_millis(500));
    let agent = Agent::start(&["--comm", "psql", "--collectors", "queries"]);
    for i in 0..5 {
        writeln!(stdin, "SELECT {i} AS after_start;").expect("write");
    }
    writeln!(
        stdin,
        "SELECT 'alice@example.com' AS email, 987654321 AS n;"
    )
    .expect("write");
    stdin.flush().expect("flush");
    let m = agent.wait_for("statements on the pooled connection", WAIT, |m| {
        count_any_db(m, "psql", "SELECT ? AS after_start") >= 5.0
            && count_any_db(m, "psql", "SELECT ? AS email, ? AS n") >= 1.0
    });
    assert_eq!(
        count_any_db(&m, "psql", "SELECT ? AS after_start"),
        5.0,
        "{}",
        m.dump()
    );
    let text = agent.metrics_text();
    drop(psql.stdin.take());
    let _ = psql.wait();
    let summary = agent.stop();
    let all = format!("{text}\n{summary}");
    for secret in ["alice@example.com", "987654321", "before the agent"] {
        assert!(!all.contains(secret), "`{secret}` leaked into the output");
    }
}

/// Garbage after a valid startup, a statement far larger than the capture,
/// and a backend killed mid-reply: counted as parse errors or cut
/// statements, never a crash; the agent keeps serving.
#[test]
fn bad_input_is_survived_and_counted() {
    if !probes_available("bad_input_is_survived_and_counted") {
        return;
    }
    let pg = TestPostgres::start();
    let agent = Agent::start(&[
        "--comm",
        "python3",
        "--comm",
        "psql",
        "--collectors",
        "queries",
    ]);
    // A client that sends a valid StartupMessage, then random bytes.
    let script = format!(
        r#"
import socket, struct, random
s = socket.create_connection(("127.0.0.1", {port}))
body = struct.pack("!I", 196608) + b"user\0postgres\0database\0postgres\0\0"
s.sendall(struct.pack("!I", len(body) + 4) + body)
s.recv(65536)
rng = random.Random(7)
s.sendall(bytes(rng.randrange(256) for _ in range(4096)))
try:
    s.recv(65536)
except Exception:
    pass
s.close()
"#,
        port = pg.port
    );
    let status = std::process::Command::new("python3")
        .args(["-c", &script])
        .status()
        .expect("python3");
    assert!(status.success());
    // A 1 MiB statement, far past the capture: counted once, its literal
    // never shown.
    let big = format!("SELECT length('{}') AS big;\n", "x".repeat(1 << 20));
    let mut args: Vec<String> = pg.conn_args(false);
    args.extend(["-X".into(), "-q".into(), "-d".into(), "postgres".into()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut psql = pg
        .command(&pg.bin("psql"), &args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("psql");
    psql.stdin
        .take()
        .expect("stdin")
        .write_all(big.as_bytes())
        .expect("write");
    assert!(psql.wait().expect("psql").success());
    let m = agent.wait_for("the parse error and the big statement", WAIT, |m| {
        m.sum("pipelens_db_parse_errors_total", &[("process", "python3")]) >= 1.0
            && m.sum(
                "pipelens_db_query_duration_seconds_count",
                &[("process", "psql")],
            ) >= 1.0
    });
    assert!(!agent.metrics_text().contains("xxxxxxxx"));
    assert_eq!(
        m.sum(
            "pipelens_db_query_duration_seconds_count",
            &[("process", "psql")]
        ),
        1.0
    );
    // The agent is still healthy (its size is the bench's to measure).
    let (code, _) = pipelens_tests::http_get(agent.port, "/healthz").expect("healthz");
    assert_eq!(code, 200);
    agent.stop();
}

/// Backends killed in the middle of pipelined batches: the agent survives,
/// the statements in flight are counted as unanswered, and the next
/// client's statements are counted exactly, none of them unanswered.
#[test]
fn backend_killed_mid_pipeline() {
    if !probes_available("backend_killed_mid_pipeline") {
        return;
    }
    let pg = TestPostgres::start();
    init_pgbench(&pg);
    let mut script = String::from("\\startpipeline\n");
    for _ in 0..500 {
        script.push_str("SELECT abalance FROM pgbench_accounts WHERE aid = 7;\n");
    }
    script.push_str("\\endpipeline\n");
    let path = pg.path().join("long.sql");
    std::fs::write(&path, script).expect("script");
    let agent = Agent::start(&["--comm", "pgbench", "--collectors", "queries"]);
    let script = path.display().to_string();
    let mut bench = pg
        .pgbench_command(
            false,
            &["-n", "-M", "extended", "-T", "5", "-c", "2", "-f", &script],
        )
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("pgbench");
    std::thread::sleep(Duration::from_millis(1500));
    let out = pg.psql(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = 'pgbench'",
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = bench.wait();
    // The statements in flight when the backends died have no outcome:
    // the server discards the rest of the pipeline after its 57P01, or
    // the connection closes under them. Counted, not lost.
    let unanswered = |m: &Metrics| {
        m.sum(
            "pipelens_db_unanswered_statements_total",
            &[("process", "pgbench"), ("role", "client")],
        )
    };
    agent.wait_for("statements unanswered at the kill", WAIT, |m| {
        unanswered(m) > 0.0
    });
    // Let the records of the killed run drain before taking the baseline.
    std::thread::sleep(Duration::from_millis(1500));
    let unanswered_at_kill = unanswered(&agent.metrics());
    let before = count(&agent.metrics(), "pgbench", SELECT_TEMPLATE);
    let n = pgbench(&pg, "prepared", false, &["-t", "300"]);
    assert_eq!(n, 4 * 300);
    let m = agent.wait_for("the next run's statements", WAIT, |m| {
        count(m, "pgbench", SELECT_TEMPLATE) >= before + n as f64
    });
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        count(&agent.metrics(), "pgbench", SELECT_TEMPLATE),
        before + n as f64,
        "{}",
        m.dump()
    );
    // A run that ends cleanly leaves nothing unanswered.
    assert_eq!(unanswered(&agent.metrics()), unanswered_at_kill);
    let (code, _) = pipelens_tests::http_get(agent.port, "/healthz").expect("healthz");
    assert_eq!(code, 200);
    agent.stop();
}

const VECTORED: &str = env!("CARGO_BIN_EXE_pg-vectored");
const VEC_INSERT: &str = "INSERT INTO vec_t (id, note) VALUES (?)";
const VEC_SELECT: &str = "SELECT note FROM vec_t WHERE id = ?";

/// Statements sent as many iovecs of one `writev`/`sendmsg`, the way
/// corking drivers send them: one statement's messages per call (4 and 5
/// iovecs), and 2, 5, 64 and 1,000 iovecs per call across statements, with
/// empty iovecs, with every message header cut across two iovecs, over
/// TCP and over a Unix socket, and with the replies read by `readv`/
/// `recvmsg` into many 7-byte buffers. Counts per template exact on the
/// client and on the server, no parse error: the peer's own count of what
/// it sent and what was answered is the truth.
#[test]
fn vectored_statements_are_exact() {
    if !probes_available("vectored_statements_are_exact") {
        return;
    }
    let pg = TestPostgres::start();
    let agent = Agent::start(&[
        "--comm",
        "pg-vectored",
        "--comm",
        "postgres",
        "--collectors",
        "queries",
        "--capture-bytes",
        "65536",
    ]);
    let tcp = format!("127.0.0.1:{}", pg.port);
    let unix = pg
        .socket_dir()
        .join(format!(".s.PGSQL.{}", pg.port))
        .display()
        .to_string();
    let runs: &[(&str, usize, &[&str])] = &[
        (&tcp, 20, &[]),
        (&tcp, 20, &["iovecs=2"]),
        (&tcp, 20, &["iovecs=5", "empty"]),
        (&tcp, 20, &["iovecs=64", "split-headers"]),
        (&tcp, 120, &["iovecs=1000", "empty"]),
        (&tcp, 20, &["iovecs=64", "read-iovecs=64"]),
        (&unix, 20, &["sendmsg", "iovecs=64", "empty"]),
        (&unix, 20, &["sendmsg", "split-headers", "read-iovecs=16"]),
    ];
    let mut expected = 0.0;
    for (addr, rounds, opts) in runs {
        let out = std::process::Command::new(VECTORED)
            .arg(addr)
            .arg(rounds.to_string())
            .args(*opts)
            .output()
            .expect("pg-vectored");
        assert!(
            out.status.success(),
            "{opts:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let sent: serde_json::Value = serde_json::from_slice(&out.stdout).expect("peer JSON");
        if opts.contains(&"iovecs=1000") {
            assert_eq!(sent["max_iovecs"], 1000, "{sent}");
        }
        expected += *rounds as f64;
        let m = agent.wait_for(&format!("{expected} of each after {opts:?}"), WAIT, |m| {
            [VEC_INSERT, VEC_SELECT].iter().all(|q| {
                count(m, "pg-vectored", q) >= expected && count(m, "postgres", q) >= expected
            })
        });
        for process in ["pg-vectored", "postgres"] {
            for q in [VEC_INSERT, VEC_SELECT] {
                assert_eq!(
                    count(&m, process, q),
                    expected,
                    "{process} {q} after {opts:?}:\n{}",
                    m.dump()
                );
            }
        }
        assert_eq!(
            m.sum("pipelens_db_parse_errors_total", &[]),
            0.0,
            "after {opts:?}:\n{}",
            m.dump()
        );
    }
    agent.stop();
}

/// node-postgres, the driver the bug of #10 was found with, as the traced
/// client: it corks its socket, so each parameterised INSERT and each
/// execution of its named prepared statement leaves as one `writev` of one
/// iovec per message. Counted exactly on the client and on the server.
#[test]
fn node_postgres_corked_statements_are_exact() {
    if !probes_available("node_postgres_corked_statements_are_exact") {
        return;
    }
    let peer = pipelens_tests::workspace_root().join("tests/peers/node");
    assert!(
        peer.join("node_modules/pg").is_dir(),
        "node-postgres is not installed in {}: run `cargo xtask setup`",
        peer.display()
    );
    let pg = TestPostgres::start();
    let agent = Agent::start(&[
        "--comm",
        "node",
        "--comm",
        "postgres",
        "--collectors",
        "queries",
    ]);
    let (inserts, executions) = (159, 15);
    let out = std::process::Command::new("node")
        .arg(peer.join("corked.js"))
        .args(["127.0.0.1", &pg.port.to_string()])
        .args([inserts.to_string(), executions.to_string()])
        .output()
        .expect("node (cargo xtask setup installs it)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ran: serde_json::Value = serde_json::from_slice(&out.stdout).expect("peer JSON");
    assert_eq!(ran["rows"], executions, "{ran}");
    let insert = "INSERT INTO corked (id, note) VALUES (?)";
    let select = "SELECT note FROM corked WHERE id = ?";
    let m = agent.wait_for("every corked statement", WAIT, |m| {
        ["node", "postgres"].iter().all(|p| {
            count(m, p, insert) >= f64::from(inserts)
                && count(m, p, select) >= f64::from(executions)
        })
    });
    for process in ["node", "postgres"] {
        assert_eq!(
            count(&m, process, insert),
            f64::from(inserts),
            "{}",
            m.dump()
        );
        assert_eq!(
            count(&m, process, select),
            f64::from(executions),
            "{}",
            m.dump()
        );
    }
    assert_eq!(
        m.sum("pipelens_db_parse_errors_total", &[]),
        0.0,
        "{}",
        m.dump()
    );
    agent.stop();
}

/// 2,000 distinct templates from one process with the default cap (500 per
/// process): 500 are reported by name and the other 1,500 statements as
/// `query="other"`, each fold counted in `pipelens_label_overflow_total`,
/// and the agent's peak RSS stays under the README's bound (128 MiB).
#[test]
fn templates_past_the_cap_are_folded_and_counted() {
    if !probes_available("templates_past_the_cap_are_folded_and_counted") {
        return;
    }
    let pg = TestPostgres::start();
    let agent = Agent::start(&["--comm", "psql", "--collectors", "queries"]);
    let script: String = (0..2000)
        .map(|i| format!("SELECT {i} AS c{i};\n"))
        .collect();
    let path = pg.path().join("templates.sql");
    std::fs::write(&path, script).expect("script");
    let mut args = pg.conn_args(false);
    args.extend(["-X", "-q", "-d", "postgres", "-f"].map(String::from));
    args.push(path.display().to_string());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = pg.command(&pg.bin("psql"), &args).output().expect("psql");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let total = |m: &Metrics| {
        m.sum(
            "pipelens_db_query_duration_seconds_count",
            &[("process", "psql"), ("db_name", "postgres")],
        )
    };
    let m = agent.wait_for("2,000 statements", WAIT, |m| total(m) >= 2000.0);
    assert_eq!(total(&m), 2000.0);
    let named: std::collections::BTreeSet<&str> = m
        .samples
        .iter()
        .filter(|(n, l, _)| {
            n == "pipelens_db_query_duration_seconds_count" && l["process"] == "psql"
        })
        .map(|(_, l, _)| l["query"].as_str())
        .filter(|q| *q != "other")
        .collect();
    assert_eq!(named.len(), 500, "templates reported by name");
    assert_eq!(count(&m, "psql", "other"), 1500.0);
    assert_eq!(
        m.sum(
            "pipelens_label_overflow_total",
            &[("collector", "queries"), ("label", "query")]
        ),
        1500.0
    );
    let peak = agent.peak_resident_bytes();
    assert!(peak < 128 << 20, "agent peak RSS {} KiB", peak >> 10);
    agent.stop();
}

/// `--capture-bytes` at its minimum, 4096: pgbench in the simple, extended
/// and prepared protocols still counts exactly on both ends, with no parse
/// error. (Below 512 the server's startup reply, about 400 bytes of
/// ParameterStatus and the like in one write, loses framing once per
/// connection: the measurement the minimum rests on.)
#[test]
fn the_minimum_capture_keeps_postgres_in_frame() {
    if !probes_available("the_minimum_capture_keeps_postgres_in_frame") {
        return;
    }
    let pg = TestPostgres::start();
    init_pgbench(&pg);
    let agent = Agent::start(&[
        "--comm",
        "pgbench",
        "--comm",
        "postgres",
        "--collectors",
        "queries",
        "--capture-bytes",
        "4096",
    ]);
    let mut expected = 0u64;
    for mode in ["simple", "extended", "prepared"] {
        expected += pgbench(&pg, mode, false, &["-t", "100"]);
        let m = agent.wait_for(&format!("{expected} after {mode}"), WAIT, |m| {
            count(m, "pgbench", SELECT_TEMPLATE) >= expected as f64
                && count(m, "postgres", SELECT_TEMPLATE) >= expected as f64
        });
        for process in ["pgbench", "postgres"] {
            assert_eq!(
                count(&m, process, SELECT_TEMPLATE),
                expected as f64,
                "{process} after {mode}:\n{}",
                m.dump()
            );
        }
        assert_eq!(
            m.sum("pipelens_db_parse_errors_total", &[]),
            0.0,
            "after {mode}:\n{}",
            m.dump()
        );
    }
    agent.stop();
}

/// Quoted identifiers are exported as written by default (the README says
/// so); `--mask-identifiers` reports them as `"?"`, and then the name
/// appears in no series.
#[test]
fn mask_identifiers_hides_quoted_names() {
    if !probes_available("mask_identifiers_hides_quoted_names") {
        return;
    }
    let pg = TestPostgres::start();
    let create = pg.psql(r#"CREATE TABLE "alice@example.com" (id int)"#);
    assert!(
        create.status.success(),
        "{}",
        String::from_utf8_lossy(&create.stderr)
    );
    let agent = Agent::start(&[
        "--comm",
        "psql",
        "--collectors",
        "queries",
        "--mask-identifiers",
    ]);
    for _ in 0..3 {
        let out = pg.psql(r#"SELECT id FROM "alice@example.com" WHERE id = 7"#);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let masked = r#"SELECT id FROM "?" WHERE id = ?"#;
    let m = agent.wait_for("the masked template", WAIT, |m| {
        count(m, "psql", masked) >= 3.0
    });
    assert_eq!(count(&m, "psql", masked), 3.0, "{}", m.dump());
    assert!(!agent.metrics_text().contains("alice"), "{}", m.dump());
    let summary = agent.stop();
    assert!(!summary.to_string().contains("alice"), "{summary}");
}
