//! `cargo xtask fuzz`: the cargo-fuzz targets of `agent/fuzz`, each run
//! for a bounded time, seeded from the recorded captures.
//!
//! Seeds are written from the fixtures at every run (into
//! `agent/fuzz/seeds/<target>`, not committed): the captures are the
//! source of truth, the seeds only their encoding in the targets' input
//! format (`agent/fuzz/src/lib.rs`). What libFuzzer finds beyond them
//! goes to `agent/fuzz/corpus/<target>`, crashes to
//! `agent/fuzz/artifacts/<target>`.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::Command,
    time::{Instant, SystemTime},
};

use anyhow::{Context as _, bail};
use pipelens_common::{
    connections::{
        ConnEvent, DIR_INBOUND, DIR_OUTBOUND, EV_CLOSE, EV_CONNECT_FAILED, EV_OPEN, SockTuple,
    },
    memory::{MemNote, MemSampleHeader},
};

use crate::{root, run_cmd};

/// Seconds each target runs inside `cargo xtask test`: four targets stay
/// near two minutes, besides their build.
pub const TEST_SECONDS: u64 = 30;

/// A single input running longer than this is a hang, reported as a crash.
const HANG_SECONDS: u64 = 10;

fn fuzz_dir() -> PathBuf {
    root().join("agent/fuzz")
}

/// `cargo fuzz` on the stable toolchain: its `-Z` flags (sanitizer,
/// coverage instrumentation) are allowed by RUSTC_BOOTSTRAP=1, as for the
/// kernel objects.
fn cargo_fuzz() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(root().join("agent"))
        .env("RUSTC_BOOTSTRAP", "1")
        .arg("fuzz");
    c
}

fn targets() -> anyhow::Result<Vec<String>> {
    let out = cargo_fuzz()
        .arg("list")
        .output()
        .context("cannot run `cargo fuzz list` (cargo xtask setup installs cargo-fuzz)")?;
    if !out.status.success() {
        bail!(
            "cargo fuzz list failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.trim().to_owned())
        .filter(|l| !l.is_empty())
        .collect())
}

/// Builds every target, then runs `only` (or all) for `seconds` each. A
/// crash or hang fails with the reproducer's path.
pub fn run(only: Option<&str>, seconds: u64) -> anyhow::Result<()> {
    let all = targets()?;
    let chosen: Vec<&String> = match only {
        Some(t) => {
            let Some(t) = all.iter().find(|a| *a == t) else {
                bail!("no fuzz target {t}: the targets are {all:?}");
            };
            vec![t]
        }
        None => all.iter().collect(),
    };
    write_seeds()?;
    run_cmd(cargo_fuzz().args(["build", "--sanitizer", "address"]))?;
    let mut failed = Vec::new();
    for target in chosen {
        let started = Instant::now();
        match run_target(target, seconds) {
            Ok(()) => eprintln!(
                "xtask: fuzz target {target}: no crash in {:.0} s",
                started.elapsed().as_secs_f64()
            ),
            Err(e) => {
                eprintln!("xtask: fuzz target {target} FAILED: {e:#}");
                failed.push(target.clone());
            }
        }
    }
    if !failed.is_empty() {
        bail!(
            "fuzz targets failed: {failed:?}; reproduce with \
             `RUSTC_BOOTSTRAP=1 cargo fuzz run TARGET ARTIFACT` in agent/"
        );
    }
    Ok(())
}

fn run_target(target: &str, seconds: u64) -> anyhow::Result<()> {
    let dir = fuzz_dir();
    let corpus = dir.join("corpus").join(target);
    let seeds = dir.join("seeds").join(target);
    // Where cargo-fuzz tells libFuzzer to write crashes.
    let artifacts = dir.join("artifacts").join(target);
    for d in [&corpus, &seeds, &artifacts] {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    let before = SystemTime::now();
    let mut cmd = cargo_fuzz();
    cmd.args(["run", "--sanitizer", "address", target])
        .arg(&corpus)
        .arg(&seeds)
        .arg("--")
        .arg(format!("-max_total_time={seconds}"))
        .arg(format!("-timeout={HANG_SECONDS}"))
        .arg("-print_final_stats=1");
    let shown = format!("{cmd:?}");
    eprintln!("xtask: {shown}");
    let status = cmd
        .status()
        .with_context(|| format!("cannot start {shown}"))?;
    if status.success() {
        return Ok(());
    }
    let new: Vec<PathBuf> = std::fs::read_dir(&artifacts)?
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|t| t >= before)
        })
        .map(|e| e.path())
        .collect();
    if new.is_empty() {
        bail!("{status}, no reproducer written (see the output above)");
    }
    let list: Vec<String> = new.iter().map(|p| p.display().to_string()).collect();
    bail!("{status}; reproducer: {}", list.join(", "))
}

// --- Seeds ----------------------------------------------------------------

fn unhex(s: &str) -> anyhow::Result<Vec<u8>> {
    (0..s.len() / 2)
        .map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).context("hex"))
        .collect()
}

/// One write or close of a recorded capture, as the conversation format
/// needs it.
enum Recorded {
    Write {
        conn: u32,
        /// Written by the client (the PostgreSQL frontend).
        by_client: bool,
        ts: u64,
        head: Vec<u8>,
        hidden: usize,
        tail: Vec<u8>,
    },
    Close {
        conn: u32,
        ts: u64,
    },
}

/// `agent/src/queries/fixtures/*.pgw`: `<conn> <F|B> <ts> <len> [head [tail]]`.
fn load_pgw(text: &str) -> anyhow::Result<Vec<Recorded>> {
    let mut out = Vec::new();
    for l in text.lines() {
        if l.starts_with('#') || l.trim().is_empty() {
            continue;
        }
        let f: Vec<&str> = l.split_whitespace().collect();
        let len: usize = f[3].parse()?;
        let head = f.get(4).map(|h| unhex(h)).transpose()?.unwrap_or_default();
        let tail = f.get(5).map(|h| unhex(h)).transpose()?.unwrap_or_default();
        out.push(Recorded::Write {
            conn: f[0].parse()?,
            by_client: f[1] == "F",
            ts: f[2].parse()?,
            hidden: len.saturating_sub(head.len() + tail.len()),
            head,
            tail,
        });
    }
    Ok(out)
}

/// `agent/src/websocket/fixtures/*.cap`: `<conn> <C|S> <ts> <len> <hex>`
/// or `<conn> X <ts>`.
fn load_cap(text: &str) -> anyhow::Result<Vec<Recorded>> {
    let mut out = Vec::new();
    for l in text.lines() {
        if l.starts_with('#') || l.is_empty() {
            continue;
        }
        let f: Vec<&str> = l.split(' ').collect();
        let conn = f[0].parse()?;
        let ts = f[2].parse()?;
        if f[1] == "X" {
            out.push(Recorded::Close { conn, ts });
            continue;
        }
        let len: usize = f[3].parse()?;
        let head = unhex(f.get(4).copied().unwrap_or(""))?;
        out.push(Recorded::Write {
            conn,
            by_client: f[1] == "C",
            ts,
            hidden: len.saturating_sub(head.len()),
            head,
            tail: Vec::new(),
        });
    }
    Ok(out)
}

/// Header variants of each seed: (capture, pieces, flags) — as recorded;
/// the smallest capture with tails; 9-byte syscalls; 2 KiB captures of
/// 400-byte syscalls without tails.
const CUTS: &[[u8; 4]] = &[[0, 0, 1, 0], [1, 0, 1, 0], [0, 3, 1, 0], [32, 20, 0, 0]];

/// The conversation-format encoding of a capture, the traced process
/// being the client or the server.
fn conversation(records: &[Recorded], cut: [u8; 4], traced_client: bool) -> Vec<u8> {
    let mut out = cut.to_vec();
    let mut last_ts = None;
    let mut dt = |ts: u64| -> u8 {
        let step = last_ts.map_or(0, |l: u64| ts.saturating_sub(l) / 1_000_000);
        last_ts = Some(ts);
        16 + step.min(200) as u8
    };
    for r in records {
        match r {
            Recorded::Close { conn, ts } => {
                out.push((conn % 4) as u8 | 1 << 3);
                out.push(dt(*ts));
            }
            Recorded::Write {
                conn,
                by_client,
                ts,
                head,
                hidden,
                tail,
            } => {
                let sent = *by_client == traced_client;
                out.push((conn % 4) as u8 | if sent { 1 << 2 } else { 0 });
                out.push(dt(*ts));
                // A tail longer than its 255-byte field is partly hidden.
                let keep = tail.len().min(255);
                let hidden = hidden + tail.len() - keep;
                out.extend((head.len() as u32).to_le_bytes());
                out.extend(head);
                out.extend((hidden as u32).to_le_bytes());
                out.push(keep as u8);
                out.extend(&tail[tail.len() - keep..]);
            }
        }
    }
    out
}

/// The SQL texts of a capture's frontend messages (`Q` and `P`).
fn statements(records: &[Recorded], into: &mut BTreeSet<Vec<u8>>) {
    for r in records {
        let Recorded::Write {
            by_client: true,
            head,
            ..
        } = r
        else {
            continue;
        };
        let mut at = 0;
        // An untagged startup-phase message starts with its length's zero byte.
        if head.first() == Some(&0) && head.len() >= 4 {
            at = u32::from_be_bytes(head[..4].try_into().expect("4")) as usize;
        }
        while at + 5 <= head.len() {
            let tag = head[at];
            let len = u32::from_be_bytes(head[at + 1..at + 5].try_into().expect("4")) as usize;
            let body = &head[at + 5..(at + 1 + len).min(head.len())];
            let text = match tag {
                b'Q' => Some(body),
                b'P' => body
                    .iter()
                    .position(|&b| b == 0)
                    .map(|name| &body[name + 1..]),
                _ => None,
            };
            if let Some(t) = text {
                let end = t.iter().position(|&b| b == 0).unwrap_or(t.len());
                into.insert(t[..end].to_vec());
            }
            at += 1 + len.max(4);
        }
    }
}

/// Statements no capture has, in the forms the normaliser must know.
const SQL_SEEDS: &[&str] = &[
    "SELECT $1, E'it''s\\n', $tag$ $1 'x' $tag$, U&'\\0041', B'101', X'ff' FROM t",
    "select * from t where id in (1, 2, 3) and name = 'a' -- comment\n",
    "INSERT INTO t (a, b) VALUES (1, 'x'), (2, 'y') /* nested /* comment */ */;",
    "WITH x AS (SELECT 1) UPDATE t SET v = 1.5e3 FROM x;",
    "SELECT 'unterminated",
    "",
    // Operators next to placeholders, literals and comments, which
    // sqlparser reads otherwise than PostgreSQL without a separator.
    "SELECT * FROM t WHERE b &> $1 AND b&>'x' AND d->>'k' = $2 AND e #-- c\n<*/* c */ f",
    "SELECT a FROM t WHERE (a, b) IN ((1, -2), (3, $4::int)) AND c IN (-1, '2'::text)",
];

/// A statement whose template is longer than the normaliser keeps, with
/// a list longer still: what is cut, and what folds before the cut.
fn long_statement() -> String {
    let columns: Vec<String> = (0..300).map(|i| format!("c{i}")).collect();
    let values: Vec<String> = (0..1_000).map(|i| format!("-{i}")).collect();
    format!(
        "SELECT {} FROM t WHERE id IN ({}) AND \"é\" &> $1",
        columns.join(", "),
        values.join(", ")
    )
}

fn write_dir(dir: &Path, seeds: impl IntoIterator<Item = (String, Vec<u8>)>) -> anyhow::Result<()> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir)?;
    for (name, bytes) in seeds {
        std::fs::write(dir.join(name), bytes)?;
    }
    Ok(())
}

fn fixtures(dir: &Path, ext: &str) -> anyhow::Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = e?.path();
        if path.extension().and_then(|e| e.to_str()) != Some(ext) {
            continue;
        }
        let name = path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("capture")
            .to_owned();
        out.push((name, std::fs::read_to_string(&path)?));
    }
    out.sort();
    Ok(out)
}

fn with_cuts(name: &str, records: &[Recorded]) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for (i, cut) in CUTS.iter().enumerate() {
        for (side, client) in [("client", true), ("server", false)] {
            out.push((
                format!("{name}-{side}-{i}"),
                conversation(records, *cut, client),
            ));
        }
    }
    out
}

fn pod_bytes<T: Copy>(v: &T) -> Vec<u8> {
    // SAFETY: only called with the shared crate's `#[repr(C)]` records,
    // plain integers with explicit padding fields.
    unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), size_of::<T>()) }.to_vec()
}

/// Records of the connections and memory rings, each `len u16 LE, bytes`.
fn kernel_record_seeds() -> Vec<(String, Vec<u8>)> {
    let mut addr = SockTuple::EMPTY;
    addr.family = 2;
    addr.lport = 8080;
    addr.rport = 40_000;
    let ev = |kind, direction, ts_ns, duration_ns| ConnEvent {
        ts_ns,
        sk: 0xffff_8000_0000_1000,
        duration_ns,
        bytes_sent: 1_000,
        bytes_received: 2_000,
        retransmits: 1,
        comm: *b"server\0\0\0\0\0\0\0\0\0\0",
        addr,
        tgid: 4242,
        kind,
        reason: 0,
        flags: 0,
        direction,
        _pad: [0; 6],
    };
    let framed = |records: &[Vec<u8>]| -> Vec<u8> {
        let mut out = Vec::new();
        for r in records {
            out.extend((r.len() as u16).to_le_bytes());
            out.extend(r);
        }
        out
    };
    let lifecycle = [
        pod_bytes(&ev(EV_OPEN, DIR_INBOUND, 1_000, 0)),
        pod_bytes(&ev(EV_CLOSE, DIR_INBOUND, 9_000, 8_000)),
        pod_bytes(&ev(EV_CONNECT_FAILED, DIR_OUTBOUND, 10_000, 0)),
    ];
    let note = MemNote {
        kind: 1,
        tgid: 4242,
        tid: 4242,
        seq: 7,
        addr: 0x1000,
        size: 64,
        ..MemNote::default()
    };
    let mut sample = pod_bytes(&MemSampleHeader {
        kind: 1,
        tgid: 4242,
        tid: 4242,
        stack_len: 16,
        ..MemSampleHeader::default()
    });
    sample.extend([0u8; 16]);
    vec![
        ("connections".to_owned(), framed(&lifecycle)),
        ("memory".to_owned(), framed(&[pod_bytes(&note), sample])),
    ]
}

/// Writes every target's seeds from the recorded captures.
pub fn write_seeds() -> anyhow::Result<()> {
    let seeds = fuzz_dir().join("seeds");
    let agent = root().join("agent/src");
    let mut pg = Vec::new();
    let mut sql = BTreeSet::new();
    for (name, text) in fixtures(&agent.join("queries/fixtures"), "pgw")? {
        let records = load_pgw(&text).with_context(|| format!("{name}.pgw"))?;
        statements(&records, &mut sql);
        pg.extend(with_cuts(&name, &records));
    }
    let mut web = Vec::new();
    for (name, text) in fixtures(&agent.join("websocket/fixtures"), "cap")? {
        let records = load_cap(&text).with_context(|| format!("{name}.cap"))?;
        web.extend(with_cuts(&name, &records));
    }
    write_dir(&seeds.join("postgres"), pg)?;
    write_dir(&seeds.join("http_websocket"), web)?;
    sql.extend(SQL_SEEDS.iter().map(|s| s.as_bytes().to_vec()));
    sql.insert(long_statement().into_bytes());
    write_dir(
        &seeds.join("sql_template"),
        sql.into_iter()
            .enumerate()
            .map(|(i, s)| (format!("statement-{i}"), s)),
    )?;
    write_dir(&seeds.join("kernel_records"), kernel_record_seeds())?;
    Ok(())
}
