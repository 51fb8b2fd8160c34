//! End to end: a private PostgreSQL, the `pipeline` binary on it, `loadgen`
//! against it; the load generator's summary must match the rows in the
//! database and the pipeline's own counters exactly.

use std::{
    path::Path,
    process::{Command, Stdio},
    thread::sleep,
    time::{Duration, Instant},
};

use pipelens_demo::{
    loadgen::plan::CloseMix,
    pipeline::{session::SUBSCRIBED, store::SEEDED_KINDS},
};
use pipelens_tests::{
    demo::Pipeline,
    pg::{self, TestPostgres},
};
use serde_json::Value;

const PIPELINE: &str = env!("CARGO_BIN_EXE_pipeline");
const LOADGEN: &str = env!("CARGO_BIN_EXE_loadgen");

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

fn postgres() -> Option<TestPostgres> {
    if !pg::is_available() {
        assert!(
            !in_ci(),
            "PostgreSQL server binaries are missing (CI=true: not skipping)"
        );
        eprintln!("skipping test - no PostgreSQL server under /usr/lib/postgresql/*/bin");
        return None;
    }
    Some(TestPostgres::start())
}

fn start(database_url: &str, extra: &[&str]) -> Pipeline {
    Pipeline::start(Path::new(PIPELINE), database_url, extra)
}

/// Runs loadgen with whitespace-separated `args`; its summary.
fn loadgen(pipeline: &Pipeline, args: &str) -> Value {
    let args: Vec<&str> = args.split_whitespace().collect();
    pipeline.loadgen(Path::new(LOADGEN), &args)
}

fn count(pg: &TestPostgres, sql: &str) -> u64 {
    let out = pg.query(sql);
    out.trim()
        .parse()
        .unwrap_or_else(|e| panic!("{sql} gave {out:?}: {e}"))
}

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a count: {v}"))
}

/// Close frames the plan sends, by code, and how many sessions it resets.
fn planned_closes(mix: &str, publishers: usize, subscribers: usize) -> (Value, u64) {
    let mix: CloseMix = mix.parse().expect("mix");
    let mut codes = serde_json::Map::new();
    let mut abrupt = 0;
    for n in [publishers, subscribers] {
        for (kind, c) in mix.counts(n) {
            let key = kind.to_string();
            if key == "abrupt" {
                abrupt += c as u64;
            } else if c > 0 {
                let prev = codes.get(&key).map_or(0, u);
                codes.insert(key, Value::from(prev + c as u64));
            }
        }
    }
    (Value::Object(codes), abrupt)
}

#[test]
fn loadgen_summary_matches_the_database_and_the_pipeline() {
    let Some(pg) = postgres() else { return };

    // 1. One INSERT per event, PostgreSQL over its Unix socket.
    let pipeline = start(&pg.unix_url(), &["--insert-mode", "per-event"]);
    let mix = "1000=1,1001=1,abrupt=1";
    let s = loadgen(
        &pipeline,
        &format!(
            "--sessions 6 --subscriber-share 0.34 --messages 40 --rate 200 --message-size 200 \
         --close-mix {mix} --ping-every 10 --http-requests 5 --per-session"
        ),
    );
    let (publishers, subscribers) = (4u64, 2u64);
    let sent = publishers * 40;
    assert_eq!(s["sessions"]["planned"], 6, "{s}");
    assert_eq!(s["sessions"]["opened"], 6, "{s}");
    assert_eq!(s["errors"], 0, "{s}");
    assert_eq!(s["publishers"]["sessions"], publishers);
    assert_eq!(s["subscribers"]["sessions"], subscribers);
    assert_eq!(s["publishers"]["messages_sent"], sent);
    assert_eq!(s["publishers"]["bytes_sent"], sent * 200);
    assert_eq!(
        s["publishers"]["pongs_received"],
        s["publishers"]["pings_sent"]
    );
    // Every subscriber was confirmed before the first event: each saw all.
    assert_eq!(
        s["subscribers"]["events_received"],
        sent * subscribers,
        "{s}"
    );
    assert_eq!(
        s["subscribers"]["messages_received"],
        (sent + 1) * subscribers
    );
    assert_eq!(
        s["subscribers"]["bytes_received"],
        (sent * 200 + SUBSCRIBED.len() as u64) * subscribers
    );
    let (codes, abrupt) = planned_closes(mix, 4, 2);
    assert_eq!(s["closes"], codes, "{s}");
    assert_eq!(s["abrupt"], abrupt);
    let closes: u64 = codes.as_object().expect("map").values().map(u).sum();
    assert_eq!(s["close_acknowledged"], closes);
    assert_eq!(s["http"]["connections"], 1);
    assert_eq!(s["http"]["responses"], 5);
    assert_eq!(s["http"]["status_codes"]["200"], 5);

    assert_eq!(count(&pg, "SELECT count(*) FROM events"), sent);
    for r in s["per_session"].as_array().expect("per_session") {
        if r["class"] == "publisher" {
            let sql = format!(
                "SELECT count(*) FROM events WHERE (payload->>'session')::int = {}",
                r["index"]
            );
            assert_eq!(count(&pg, &sql), u(&r["messages_sent"]), "{r}");
        }
    }

    let stats = pipeline.settled_stats();
    assert_eq!(stats["insert_mode"], "per-event");
    assert_eq!(stats["sessions_opened"], 6, "{stats}");
    assert_eq!(stats["messages_received"], sent);
    assert_eq!(stats["bytes_received"], sent * 200);
    assert_eq!(stats["events_stored"], sent);
    assert_eq!(stats["fanout_dropped"], 0);
    assert_eq!(stats["pings_received"], s["publishers"]["pings_sent"]);
    assert_eq!(stats["client_closes"], codes, "{stats}");
    assert_eq!(stats["abnormal_disconnects"], abrupt);
    assert_eq!(
        stats["messages_sent"],
        s["subscribers"]["messages_received"]
    );

    let recent = pipeline.get_json("/events/recent?limit=5");
    let events = recent["events"].as_array().expect("events");
    assert_eq!(events.len(), 5);
    for e in events {
        let kind = e["kind"].as_str().expect("kind");
        let (_, description) = SEEDED_KINDS
            .iter()
            .find(|(k, _)| *k == kind)
            .expect("seeded kind");
        assert_eq!(e["description"], *description);
    }
    assert!(pipeline.terminate().success());

    // 2. Batched inserts, N+1 reads, unbounded buffers, PostgreSQL over TCP.
    let pipeline = start(
        &pg.tcp_url(),
        &[
            "--insert-mode",
            "batched",
            "--batch-size",
            "16",
            "--n-plus-one",
            "--unbounded-buffer",
        ],
    );
    let s = loadgen(
        &pipeline,
        "--sessions 5 --subscriber-share 0.2 --duration 1.5 --rate 100 --message-size 100 \
         --close-mix 1000=1,abrupt=1",
    );
    assert_eq!(s["sessions"]["opened"], 5, "{s}");
    assert_eq!(s["errors"], 0, "{s}");
    let sent2 = u(&s["publishers"]["messages_sent"]);
    assert!(sent2 > 0, "{s}");
    assert_eq!(s["subscribers"]["events_received"], sent2, "{s}");
    let stats = pipeline.settled_stats();
    assert_eq!(stats["insert_mode"], "batched");
    assert_eq!(stats["messages_received"], sent2);
    let (codes, abrupt) = planned_closes("1000=1,abrupt=1", 4, 1);
    assert_eq!(stats["client_closes"], codes, "{stats}");
    assert_eq!(stats["abnormal_disconnects"], abrupt);
    let recent = pipeline.get_json("/events/recent?limit=50");
    let ids: Vec<u64> = recent["events"]
        .as_array()
        .expect("events")
        .iter()
        .map(|e| u(&e["id"]))
        .collect();
    assert_eq!(ids.len(), 50);
    assert!(ids.windows(2).all(|w| w[0] > w[1]), "newest first: {ids:?}");
    assert_eq!(ids[0], count(&pg, "SELECT max(id) FROM events"));
    assert!(recent["events"][0]["description"].is_string());
    assert!(pipeline.terminate().success());
    // The batcher has written everything it was handed.
    assert_eq!(count(&pg, "SELECT count(*) FROM events"), sent + sent2);

    // 3. The server closes live sessions with 1001 when it is stopped.
    let pipeline = start(&pg.unix_url(), &[]);
    let addr = pipeline.addr();
    let loadgen = std::thread::spawn(move || {
        let out = Command::new(LOADGEN)
            .args([
                "--target",
                &addr,
                "--sessions",
                "3",
                "--subscriber-share",
                "0.34",
            ])
            .args(["--duration", "30", "--rate", "20", "--drain-max-ms", "100"])
            .stdin(Stdio::null())
            .output()
            .expect("run loadgen");
        serde_json::from_slice::<Value>(&out.stdout).expect("summary")
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while pipeline.get_json("/stats")["messages_received"].as_u64() < Some(10) {
        assert!(Instant::now() < deadline, "no traffic");
        sleep(Duration::from_millis(50));
    }
    assert!(pipeline.terminate().success());
    let s = loadgen.join().expect("loadgen thread");
    assert_eq!(s["closed_by_server"]["1001"], 3, "{s}");
}
