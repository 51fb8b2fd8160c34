//! `cargo xtask demo`: a private PostgreSQL, the demo event pipeline, a load
//! generator and the agent targeting the pipeline by name, with a live
//! terminal summary every few seconds. Ctrl-C (or `--duration`) stops
//! everything it started.

use std::{
    collections::BTreeMap,
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use pipelens_tests::{Metrics, http_get, pg::TestPostgres};

use crate::root;

pub struct DemoArgs {
    pub duration: Option<u64>,
    pub listen: String,
    pub interval: u64,
}

pub fn run(args: DemoArgs) -> anyhow::Result<()> {
    if !crate::is_root() {
        bail!("the demo loads kernel programs: run it as root (or `sudo -E cargo xtask demo`)");
    }
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        ctrlc::set_handler(move || stop.store(true, Ordering::SeqCst))
            .context("installing the Ctrl-C handler")?;
    }
    let bin = root().join("target/release");
    let out_dir = root().join("target/demo");
    std::fs::create_dir_all(&out_dir)?;
    let summary_path = out_dir.join("summary.json");

    eprintln!("demo: starting a private PostgreSQL");
    let pg = TestPostgres::start();
    let port = args
        .listen
        .rsplit(':')
        .next()
        .and_then(|p| p.parse::<u16>().ok())
        .context("--listen must be HOST:PORT")?;

    eprintln!("demo: starting pipelens (targets: every process named `pipeline`)");
    let mut agent = Processes::default();
    agent.spawn(
        "pipelens",
        Command::new(bin.join("pipelens"))
            .args(["run", "--comm", "pipeline", "--listen", &args.listen])
            .arg("--summary-json")
            .arg(&summary_path)
            .env("RUST_LOG", "warn"),
    )?;
    wait_healthy(port, &stop)?;

    let app_port = free_port()?;
    let db_url = format!(
        "host=127.0.0.1 port={} user=postgres dbname=postgres",
        pg.port
    );
    let mut services = Processes::default();
    eprintln!("demo: starting the event pipeline on 127.0.0.1:{app_port}");
    services.spawn(
        "pipeline",
        Command::new(bin.join("pipeline"))
            .args(["--listen", &format!("127.0.0.1:{app_port}")])
            .args(["--database-url", &db_url])
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    )?;
    wait_http(app_port, "/health", &stop)?;

    eprintln!(
        "demo: load running; metrics on http://{}/metrics; Ctrl-C to stop",
        args.listen
    );
    let started = Instant::now();
    let mut last_print = Instant::now() - Duration::from_secs(args.interval);
    let mut round = 0u64;
    let mut load: Option<Child> = None;
    while !stop.load(Ordering::SeqCst) {
        if args
            .duration
            .is_some_and(|d| started.elapsed() >= Duration::from_secs(d))
        {
            break;
        }
        // Rounds of load: new sessions each time, so that connection churn
        // and closes of every kind show up.
        let running = match load.as_mut() {
            Some(c) => c.try_wait()?.is_none(),
            None => false,
        };
        if !running {
            round += 1;
            load = Some(
                Command::new(bin.join("loadgen"))
                    .args(["--target", &format!("127.0.0.1:{app_port}")])
                    .args(["--sessions", "20", "--subscriber-share", "0.25"])
                    .args(["--rate", "20", "--message-size", "300", "--duration", "8"])
                    .args([
                        "--close-mix",
                        "1000=5,1001=2,abrupt=1",
                        "--ping-every",
                        "10",
                    ])
                    .args(["--http-requests", "20"])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .context("starting loadgen")?,
            );
        }
        if last_print.elapsed() >= Duration::from_secs(args.interval) {
            last_print = Instant::now();
            match http_get(port, "/metrics") {
                Ok((200, text)) => print_summary(&Metrics::parse(&text), started.elapsed(), round),
                _ => eprintln!("demo: /metrics did not answer"),
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!("demo: stopping");
    if let Some(mut c) = load {
        let _ = c.kill();
        let _ = c.wait();
    }
    services.stop_all();
    agent.stop_all();
    drop(pg);
    eprintln!("demo: summary written to {}", summary_path.display());
    Ok(())
}

/// Children stopped with SIGINT (then SIGKILL) when the demo ends.
#[derive(Default)]
struct Processes {
    children: Vec<(&'static str, Child)>,
}

impl Processes {
    fn spawn(&mut self, name: &'static str, cmd: &mut Command) -> anyhow::Result<()> {
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {name} (cargo xtask build)"))?;
        self.children.push((name, child));
        Ok(())
    }

    fn stop_all(&mut self) {
        for (name, child) in self.children.iter_mut().rev() {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            if let Ok(None) = child.try_wait() {
                eprintln!("demo: {name} did not stop on SIGINT; killing it");
                let _ = child.kill();
            }
            let _ = child.wait();
        }
        self.children.clear();
    }
}

impl Drop for Processes {
    fn drop(&mut self) {
        self.stop_all();
    }
}

fn wait_healthy(port: u16, stop: &AtomicBool) -> anyhow::Result<()> {
    wait_http(port, "/healthz", stop)
}

fn wait_http(port: u16, path: &str, stop: &AtomicBool) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline && !stop.load(Ordering::SeqCst) {
        if let Ok((200, _)) = http_get(port, path) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("nothing healthy on 127.0.0.1:{port}{path}")
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// The smallest bucket bound under which `q` of the observations fall.
fn quantile(m: &Metrics, name: &str, filter: &BTreeMap<String, String>, q: f64) -> Option<f64> {
    let mut buckets: Vec<(f64, f64)> = m
        .samples
        .iter()
        .filter(|(n, l, _)| {
            n == &format!("{name}_bucket") && filter.iter().all(|(k, v)| l.get(k) == Some(v))
        })
        .filter_map(|(_, l, v)| {
            let le = l.get("le")?;
            let bound = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((bound, *v))
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total = buckets.last()?.1;
    if total == 0.0 {
        return None;
    }
    buckets
        .iter()
        .find(|(_, c)| *c >= q * total)
        .map(|(b, _)| *b)
}

fn print_summary(m: &Metrics, elapsed: Duration, round: u64) {
    println!(
        "\n=== pipelens demo — {:.0} s, load round {round} ===",
        elapsed.as_secs_f64()
    );
    // Counts are whole numbers; `as i64` also turns the -0 of an empty sum
    // into 0.
    let n = |name: &str, f: &[(&str, &str)]| m.sum(name, f) as i64;
    println!("connections (process `pipeline`):");
    for dir in ["inbound", "outbound"] {
        let f = [("process", "pipeline"), ("direction", dir)];
        println!(
            "  {dir:<8} opened {:>7}  closed {:>7}  active {:>5}  resets {:>5}  connect failures {:>4}  bytes in/out {:>10}/{:<10}",
            n("pipelens_tcp_connections_opened_total", &f),
            n("pipelens_tcp_connections_closed_total", &f),
            n("pipelens_tcp_connections_active", &f),
            n("pipelens_tcp_resets_total", &f),
            n("pipelens_tcp_connect_failures_total", &f),
            n("pipelens_tcp_bytes_received_total", &f),
            n("pipelens_tcp_bytes_sent_total", &f),
        );
    }
    let w = [("process", "pipeline")];
    println!(
        "websocket (process `pipeline`): sessions {} (active {})  messages received {} sent {}  closes 1000/1001/1006: {}/{}/{}  http requests {}  parse errors {}",
        n("pipelens_websocket_sessions_total", &w),
        n("pipelens_websocket_sessions_active", &w),
        n(
            "pipelens_websocket_messages_total",
            &[("process", "pipeline"), ("direction", "received")]
        ),
        n(
            "pipelens_websocket_messages_total",
            &[("process", "pipeline"), ("direction", "sent")]
        ),
        n(
            "pipelens_websocket_closes_total",
            &[("process", "pipeline"), ("code", "1000")]
        ),
        n(
            "pipelens_websocket_closes_total",
            &[("process", "pipeline"), ("code", "1001")]
        ),
        n(
            "pipelens_websocket_closes_total",
            &[("process", "pipeline"), ("code", "1006")]
        ),
        n("pipelens_http_server_request_duration_seconds_count", &w),
        n("pipelens_http_parse_errors_total", &w),
    );
    let mut queries: Vec<(f64, BTreeMap<String, String>)> = m
        .samples
        .iter()
        .filter(|(n, l, _)| {
            n == "pipelens_db_query_duration_seconds_count"
                && l.get("process").map(String::as_str) == Some("pipeline")
        })
        .map(|(_, l, v)| (*v, l.clone()))
        .collect();
    queries.sort_by(|a, b| b.0.total_cmp(&a.0));
    println!("top queries (process `pipeline`, client side):");
    if queries.is_empty() {
        println!("  (none yet)");
    }
    for (count, labels) in queries.iter().take(6) {
        let count = *count as i64;
        let mut filter = labels.clone();
        filter.remove("le");
        let p95 = quantile(m, "pipelens_db_query_duration_seconds", &filter, 0.95)
            .map_or("-".to_owned(), |s| format!("≤{:.2} ms", s * 1e3));
        let mut query = labels.get("query").cloned().unwrap_or_default();
        if query.len() > 70 {
            query.truncate(70);
            query.push('…');
        }
        println!(
            "  {count:>8}  p95 {p95:>10}  {:<5} {query}",
            labels.get("status").map(String::as_str).unwrap_or("")
        );
    }
    let mut growth: Vec<(f64, String)> = m
        .samples
        .iter()
        .filter(|(n, l, _)| {
            n == "pipelens_memory_growth_bytes_total"
                && l.get("process").map(String::as_str) == Some("pipeline")
        })
        .map(|(_, l, v)| (*v, l.get("site").cloned().unwrap_or_default()))
        .collect();
    growth.sort_by(|a, b| b.0.total_cmp(&a.0));
    println!("memory growth by site (process `pipeline`, resident bytes, estimated):");
    if growth.is_empty() {
        println!("  (none yet)");
    }
    for (bytes, full) in growth.iter().take(5) {
        let mut site: String = full.chars().take(90).collect();
        if site.len() < full.len() {
            site.push('…');
        }
        println!("  {:>9.1} MiB  {site}", bytes / (1024.0 * 1024.0));
    }
    let errors = n("pipelens_db_query_errors_total", &[("process", "pipeline")]);
    let lost = n("pipelens_events_lost_total", &[]);
    println!("query errors: {errors}   agent events lost: {lost}");
}
