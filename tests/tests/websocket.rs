//! Probe tests of the websocket collector: the demo pipeline (a real
//! WebSocket and HTTP server) traced as the server, driven by real clients
//! whose own summaries are the ground truth: the demo's load generator
//! (Rust, tokio-tungstenite) and Python's `websockets`.

use std::{
    process::{Command, Stdio},
    time::Duration,
};

use pipelens_tests::{
    Agent, Metrics, Peer, TempDir, demo::Pipeline, http_get, pg::TestPostgres, probes_available,
    workspace_root,
};

const WAIT: Duration = Duration::from_secs(20);

/// The demo pipeline on `pg`, untraced until an agent follows `pipeline`.
fn start_pipeline(pg: &TestPostgres) -> Pipeline {
    let url = format!(
        "host=127.0.0.1 port={} user=postgres dbname=postgres",
        pg.port
    );
    Pipeline::start(&workspace_root().join("target/release/pipeline"), &url, &[])
}

/// A private PostgreSQL, the agent's websocket collector following every
/// process named `pipeline`, and the demo pipeline started after it (so
/// that its very first request is seen). Bind all three: they stop on drop,
/// pipeline first.
fn traced_pipeline() -> (TestPostgres, Agent, Pipeline) {
    let pg = TestPostgres::start();
    let agent = Agent::start(&["--comm", "pipeline", "--collectors", "websocket"]);
    let app = start_pipeline(&pg);
    (pg, agent, app)
}

fn loadgen(app: &Pipeline, args: &[&str]) -> serde_json::Value {
    app.loadgen(&workspace_root().join("target/release/loadgen"), args)
}

fn ws(m: &Metrics, name: &str, port: u16, extra: &[(&str, &str)]) -> f64 {
    let port = port.to_string();
    let mut want = vec![("process", "pipeline"), ("port", port.as_str())];
    want.extend_from_slice(extra);
    m.sum(name, &want)
}

/// Sessions with known messages of known sizes: counts per direction
/// exact, the size histogram's sum equal to the bytes sent, closes exact by
/// code (abrupt ones as 1006), and 100 keep-alive HTTP requests on one
/// connection counted as 100 with their status.
#[test]
fn demo_pipeline_sessions_are_exact() {
    if !probes_available("demo_pipeline_sessions_are_exact") {
        return;
    }
    let (_pg, agent, app) = traced_pipeline();
    // The readiness probe above was itself a request to the traced server.
    let health_checks = agent.wait_for("the readiness probe", WAIT, |m| {
        ws(
            m,
            "pipelens_http_server_request_duration_seconds_count",
            app.port,
            &[],
        ) >= 1.0
    });
    let before = ws(
        &health_checks,
        "pipelens_http_server_request_duration_seconds_count",
        app.port,
        &[("method", "GET"), ("status_code", "200")],
    );
    let s = loadgen(
        &app,
        &[
            "--sessions",
            "35",
            "--subscriber-share",
            "0",
            "--messages",
            "12",
            "--rate",
            "0",
            "--message-size",
            "700",
            "--close-mix",
            "1000=20,1001=10,abrupt=5",
            "--ping-every",
            "5",
            "--http-requests",
            "100",
        ],
    );
    let sent = s["publishers"]["messages_sent"].as_u64().expect("messages");
    let bytes = s["publishers"]["bytes_sent"].as_u64().expect("bytes");
    assert_eq!(sent, 35 * 12);
    let m = agent.wait_for("every session closed", WAIT, |m| {
        ws(m, "pipelens_websocket_closes_total", app.port, &[]) >= 35.0
            && ws(
                m,
                "pipelens_http_server_request_duration_seconds_count",
                app.port,
                &[],
            ) >= 100.0
    });
    assert_eq!(
        ws(&m, "pipelens_websocket_sessions_total", app.port, &[]),
        35.0,
        "{}",
        m.dump()
    );
    assert_eq!(
        ws(&m, "pipelens_websocket_sessions_active", app.port, &[]),
        0.0
    );
    // The server's own count of what it read agrees with the client's.
    let (_, stats) = http_get(app.port, "/stats").expect("GET /stats");
    let stats: serde_json::Value = serde_json::from_str(&stats).expect("stats JSON");
    assert_eq!(stats["messages_received"].as_u64(), Some(sent), "{stats}");
    assert_eq!(
        ws(
            &m,
            "pipelens_websocket_messages_total",
            app.port,
            &[("direction", "received")]
        ),
        sent as f64,
        "{}",
        m.dump()
    );
    assert_eq!(
        ws(
            &m,
            "pipelens_websocket_message_size_bytes_sum",
            app.port,
            &[("direction", "received")]
        ),
        bytes as f64
    );
    assert_eq!(
        ws(
            &m,
            "pipelens_websocket_closes_total",
            app.port,
            &[("code", "1000")]
        ),
        20.0
    );
    assert_eq!(
        ws(
            &m,
            "pipelens_websocket_closes_total",
            app.port,
            &[("code", "1001")]
        ),
        10.0
    );
    assert_eq!(
        ws(
            &m,
            "pipelens_websocket_closes_total",
            app.port,
            &[("code", "1006")]
        ),
        5.0
    );
    // Pings are control frames, not messages.
    let pings = s["publishers"]["pings_sent"].as_u64().expect("pings");
    assert!(pings > 0);
    assert_eq!(
        ws(
            &m,
            "pipelens_websocket_control_frames_total",
            app.port,
            &[("opcode", "ping"), ("direction", "received")]
        ),
        pings as f64
    );
    assert_eq!(
        ws(
            &m,
            "pipelens_http_server_request_duration_seconds_count",
            app.port,
            &[("method", "GET"), ("status_code", "200")]
        ),
        100.0 + before
    );
    agent.stop();
}

/// A client in another language, framing its own way: Python's
/// `websockets` sends a message in 3 fragments and pings. The fragmented
/// message is one message of the summed size; the pings are control frames.
#[test]
fn python_client_fragments_and_pings() {
    if !probes_available("python_client_fragments_and_pings") {
        return;
    }
    let (_pg, agent, app) = traced_pipeline();
    let script = format!(
        r#"
import asyncio, json, websockets
async def main():
    async with websockets.connect("ws://127.0.0.1:{port}/ws") as ws:
        for i in range(7):
            await ws.send(json.dumps({{"kind": "click", "payload": {{"i": i}}}}))
        # One message in three frames (continuations): 3 + 4 + 2 bytes of JSON.
        await ws.send(iter(['{{"k', 'ind":', '"click"', ',"payload":1}}']))
        for _ in range(3):
            pong = await ws.ping()
            await pong
        await ws.close(code=1000)
asyncio.run(main())
"#,
        port = app.port
    );
    let status = Command::new("/usr/bin/python3")
        .args(["-c", &script])
        .status()
        .expect("python3 (cargo xtask setup installs python3-websockets)");
    assert!(status.success());
    let m = agent.wait_for("the python session's close", WAIT, |m| {
        ws(m, "pipelens_websocket_closes_total", app.port, &[]) >= 1.0
    });
    assert_eq!(
        ws(
            &m,
            "pipelens_websocket_messages_total",
            app.port,
            &[("direction", "received")]
        ),
        8.0,
        "{}",
        m.dump()
    );
    assert_eq!(
        ws(
            &m,
            "pipelens_websocket_control_frames_total",
            app.port,
            &[("opcode", "ping"), ("direction", "received")]
        ),
        3.0
    );
    assert_eq!(
        ws(
            &m,
            "pipelens_websocket_closes_total",
            app.port,
            &[("code", "1000")]
        ),
        1.0
    );
    agent.stop();
}

/// Bad input on the traced server's port: bytes that are not HTTP, a header
/// block over the limit, a frame announcing 2^63 bytes, a close frame with
/// a reserved code, half a frame and then nothing. Each stream is marked
/// unparseable and counted; the agent stays healthy.
#[test]
fn bad_input_is_counted_not_fatal() {
    if !probes_available("bad_input_is_counted_not_fatal") {
        return;
    }
    let (_pg, agent, app) = traced_pipeline();
    let script = format!(
        r#"
import socket, struct, time
PORT = {port}
def conn():
    return socket.create_connection(("127.0.0.1", PORT))
UPGRADE = (b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
           b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
def upgraded():
    s = conn()
    s.sendall(UPGRADE)
    buf = b""
    while b"\r\n\r\n" not in buf:
        buf += s.recv(4096)
    assert b" 101 " in buf, buf
    return s
# A header block over 16 KiB.
s = conn(); s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"X-Pad: " + b"a" * 20000 + b"\r\n\r\n"); time.sleep(0.2); s.close()
# A masked frame announcing 2^63 bytes (the length's top bit must be 0).
s = upgraded(); s.sendall(bytes([0x82, 0xFF]) + struct.pack("!Q", 1 << 63) + b"\x00\x00\x00\x00"); time.sleep(0.2); s.close()
# A close frame with a reserved code (1005 must never be sent).
s = upgraded(); s.sendall(bytes([0x88, 0x82, 0, 0, 0, 0]) + struct.pack("!H", 1005)); time.sleep(0.2); s.close()
# Half a frame, then the peer vanishes.
s = upgraded(); s.sendall(bytes([0x81, 0xFE, 0x01])); time.sleep(0.2); s.close()
"#,
        port = app.port
    );
    let status = Command::new("/usr/bin/python3")
        .args(["-c", &script])
        .status()
        .expect("python3");
    assert!(status.success());
    let m = agent.wait_for("four unparseable streams", WAIT, |m| {
        ws(m, "pipelens_http_parse_errors_total", app.port, &[]) >= 4.0
    });
    assert!(
        ws(
            &m,
            "pipelens_http_parse_errors_total",
            app.port,
            &[("reason", "head_too_large")]
        ) >= 1.0,
        "{}",
        m.dump()
    );
    assert!(
        ws(
            &m,
            "pipelens_http_parse_errors_total",
            app.port,
            &[("reason", "ws_protocol")]
        ) >= 1.0,
        "{}",
        m.dump()
    );
    let (code, _) = http_get(agent.port, "/healthz").expect("healthz");
    assert_eq!(code, 200);
    // The server still serves, and is still analysed.
    let s = loadgen(
        &app,
        &[
            "--sessions",
            "2",
            "--subscriber-share",
            "0",
            "--messages",
            "3",
            "--rate",
            "0",
        ],
    );
    assert_eq!(s["publishers"]["messages_sent"], 6);
    agent.stop();
}

/// A peer that writes one byte per syscall (Python, `TCP_NODELAY`, a pause
/// between bytes so that the server reads them one by one): request heads,
/// the upgrade and every frame arrive in pieces, from the first byte on.
/// Requests, messages and the close are counted as when they come whole.
#[test]
fn a_peer_writing_byte_by_byte_is_followed() {
    if !probes_available("a_peer_writing_byte_by_byte_is_followed") {
        return;
    }
    let (_pg, agent, app) = traced_pipeline();
    let health = |m: &Metrics| {
        ws(
            m,
            "pipelens_http_server_request_duration_seconds_count",
            app.port,
            &[("method", "GET"), ("status_code", "200")],
        )
    };
    let before = health(&agent.wait_for("the readiness probe", WAIT, |m| health(m) >= 1.0));
    let script = format!(
        r#"
import os, socket, struct, time
def slowly(s, data):
    for b in data:
        s.send(bytes([b]))
        time.sleep(0.002)
def head(s):
    buf = b""
    while b"\r\n\r\n" not in buf:
        got = s.recv(4096)
        assert got, buf
        buf += got
    return buf
s = socket.create_connection(("127.0.0.1", {port}))
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
for _ in range(3):
    slowly(s, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    buf = head(s)
    h, body = buf.split(b"\r\n\r\n", 1)
    assert b" 200 " in h, h
    n = int([l.split(b":")[1] for l in h.split(b"\r\n") if l.lower().startswith(b"content-length")][0])
    while len(body) < n:
        body += s.recv(4096)
s.close()
def frame(opcode, payload):
    mask = os.urandom(4)
    return bytes([0x80 | opcode, 0x80 | len(payload)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
s = socket.create_connection(("127.0.0.1", {port}))
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
slowly(s, b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
          b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
assert b" 101 " in head(s)
for i in range(4):
    slowly(s, frame(1, b'{{"kind":"click","payload":%d}}' % i))
slowly(s, frame(8, struct.pack("!H", 1000)))
while s.recv(4096):
    pass
s.close()
"#,
        port = app.port
    );
    let status = Command::new("/usr/bin/python3")
        .args(["-c", &script])
        .status()
        .expect("python3");
    assert!(status.success());
    let m = agent.wait_for("the slow session's close", WAIT, |m| {
        ws(m, "pipelens_websocket_closes_total", app.port, &[]) >= 1.0 && health(m) >= before + 3.0
    });
    assert_eq!(health(&m), before + 3.0, "{}", m.dump());
    assert_eq!(
        ws(
            &m,
            "pipelens_websocket_messages_total",
            app.port,
            &[("direction", "received")]
        ),
        4.0,
        "{}",
        m.dump()
    );
    assert_eq!(
        ws(
            &m,
            "pipelens_websocket_closes_total",
            app.port,
            &[("code", "1000")]
        ),
        1.0
    );
    assert_eq!(
        ws(&m, "pipelens_http_parse_errors_total", app.port, &[]),
        0.0
    );
    agent.stop();
}

/// Peers whose every write is vectored, traced themselves (Python,
/// `sendmsg`/`os.writev`): an HTTP/1.1 server writing status line, each
/// header, the blank line and the body as separate iovecs (and a chunked
/// body with one iovec per chunk part), and a WebSocket client writing
/// each frame's header, mask and payload as separate iovecs. Requests and
/// messages are counted as the peers count them, with no parse error.
#[test]
fn vectored_http_and_websocket_writes_are_exact() {
    if !probes_available("vectored_http_and_websocket_writes_are_exact") {
        return;
    }
    const PEERS: &str = r#"
import os, socket, struct, sys
mode = sys.argv[1]
if mode == "server":
    n = int(sys.argv[2])
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(64)
    print(srv.getsockname()[1], flush=True)
    sys.stdin.readline()
    for i in range(n):
        c, _ = srv.accept()
        buf = b""
        while b"\r\n\r\n" not in buf:
            buf += c.recv(4096)
        body = b"x" * (50 + i)
        if i % 2:
            parts = [b"HTTP/1.1 200 OK\r\n", b"Content-Type: text/plain\r\n",
                     b"Content-Length: %d\r\n" % len(body), b"Connection: close\r\n", b"\r\n", body]
        else:
            parts = [b"HTTP/1.1 200 OK\r\n", b"Transfer-Encoding: chunked\r\n", b"Connection: close\r\n", b"\r\n"]
            for piece in (body[:20], body[20:]):
                parts += [b"%x\r\n" % len(piece), piece, b"\r\n"]
            parts.append(b"0\r\n\r\n")
        if i % 3:
            c.sendmsg(parts)
        else:
            os.writev(c.fileno(), parts)
        c.close()
    print(n, flush=True)
else:
    port, n = int(sys.argv[2]), int(sys.argv[3])
    sys.stdin.readline()
    s = socket.create_connection(("127.0.0.1", port))
    s.sendmsg([b"GET /ws HTTP/1.1\r\n", b"Host: x\r\n", b"Upgrade: websocket\r\n", b"Connection: Upgrade\r\n",
               b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n", b"Sec-WebSocket-Version: 13\r\n", b"\r\n"])
    buf = b""
    while b"\r\n\r\n" not in buf:
        buf += s.recv(4096)
    assert b" 101 " in buf, buf
    def frame(opcode, payload):
        mask = os.urandom(4)
        n = len(payload)
        head = bytes([0x80 | opcode, 0x80 | n]) if n < 126 else bytes([0x80 | opcode, 0x80 | 126]) + struct.pack("!H", n)
        return [head, mask, bytes(b ^ mask[i % 4] for i, b in enumerate(payload))]
    sent = 0
    for i in range(n):
        pad = "y" * (300 if i % 4 == 0 else 10)
        s.sendmsg(frame(1, b'{"kind":"click","payload":"%s"}' % pad.encode()))
        sent += 1
    s.sendmsg(frame(8, struct.pack("!H", 1000)))
    while s.recv(4096):
        pass
    print(sent, flush=True)
"#;
    let spawn = |args: &[&str]| {
        Command::new("/usr/bin/python3")
            .args(["-c", PEERS])
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3")
    };
    let pg = TestPostgres::start();
    let app = start_pipeline(&pg);
    const REQUESTS: usize = 24;
    const MESSAGES: usize = 12;
    let mut server = spawn(&["server", &REQUESTS.to_string()]);
    let mut server_out = std::io::BufReader::new(server.stdout.take().expect("stdout"));
    let mut line = String::new();
    std::io::BufRead::read_line(&mut server_out, &mut line).expect("port");
    let server_port: u16 = line.trim().parse().expect("port");
    let mut client = spawn(&["client", &app.port.to_string(), &MESSAGES.to_string()]);
    let (sp, cp) = (server.id().to_string(), client.id().to_string());
    let agent = Agent::start(&[
        "--pid",
        &sp,
        "--pid",
        &cp,
        "--comm",
        "pipeline",
        "--collectors",
        "websocket",
    ]);
    for child in [&mut server, &mut client] {
        std::io::Write::write_all(child.stdin.as_mut().expect("stdin"), b"go\n").expect("go");
    }
    for _ in 0..REQUESTS {
        let (code, body) = http_get(server_port, "/").expect("GET the python server");
        assert_eq!(code, 200);
        assert!(body.contains("xxxxx"), "{body}");
    }
    let client_out = client.wait_with_output().expect("client");
    assert!(client_out.status.success());
    let sent: usize = String::from_utf8_lossy(&client_out.stdout)
        .trim()
        .parse()
        .expect("client count");
    assert_eq!(sent, MESSAGES);
    assert!(server.wait().expect("server").success());
    let requests = |m: &Metrics| {
        m.sum(
            "pipelens_http_server_request_duration_seconds_count",
            &[
                ("process", "python3"),
                ("port", &server_port.to_string()),
                ("status_code", "200"),
            ],
        )
    };
    let sent_by_client = |m: &Metrics| {
        m.sum(
            "pipelens_websocket_messages_total",
            &[("process", "python3"), ("direction", "sent")],
        )
    };
    let m = agent.wait_for("every request and message", WAIT, |m| {
        requests(m) >= REQUESTS as f64
            && sent_by_client(m) >= MESSAGES as f64
            && ws(m, "pipelens_websocket_closes_total", app.port, &[]) >= 1.0
    });
    assert_eq!(requests(&m), REQUESTS as f64, "{}", m.dump());
    assert_eq!(sent_by_client(&m), MESSAGES as f64, "{}", m.dump());
    assert_eq!(
        ws(
            &m,
            "pipelens_websocket_messages_total",
            app.port,
            &[("direction", "received")]
        ),
        MESSAGES as f64,
        "{}",
        m.dump()
    );
    assert_eq!(
        m.sum("pipelens_http_parse_errors_total", &[]),
        0.0,
        "{}",
        m.dump()
    );
    agent.stop();
}

/// A Python `websockets` server that answers each message 20 ms after it
/// arrives, traced by pid, and a client that times every round trip: the
/// agent's response time of each message is at least the server's delay and
/// at most the client's round trip, and exactly one per message. HTTP
/// requests to `/items/<id>?token=…` are counted under their route class,
/// and neither the id nor the token appears in any series.
#[test]
fn served_messages_have_a_response_time_and_routes_are_classes() {
    if !probes_available("served_messages_have_a_response_time_and_routes_are_classes") {
        return;
    }
    const SERVER: &str = r#"
import asyncio, http, websockets
async def handler(ws, path=None):
    async for msg in ws:
        await asyncio.sleep(0.02)
        await ws.send("ack " + msg[:8])
async def plain(path, headers):
    if path.startswith("/items/"):
        return http.HTTPStatus.OK, [("Content-Length", "2")], b"ok"
async def main():
    async with websockets.serve(handler, "127.0.0.1", 0, process_request=plain) as srv:
        print("port", srv.sockets[0].getsockname()[1], flush=True)
        await asyncio.Future()
asyncio.run(main())
"#;
    const CLIENT: &str = r#"
import asyncio, sys, time, websockets
async def main():
    total = 0.0
    async with websockets.connect("ws://127.0.0.1:%s/ws" % sys.argv[1]) as ws:
        for i in range(int(sys.argv[2])):
            t = time.monotonic()
            await ws.send("event %d" % i)
            await ws.recv()
            total += time.monotonic() - t
    print(total, flush=True)
asyncio.run(main())
"#;
    const MESSAGES: usize = 20;
    const PLANTED: &str = "plantedt0ken";
    let mut server = Peer::spawn("/usr/bin/python3", &["-c", SERVER]);
    let port: u16 = server.expect("port").parse().expect("port");
    let agent = Agent::start(&[
        "--pid",
        &server.pid().to_string(),
        "--collectors",
        "websocket",
    ]);
    for id in [101, 202, 303] {
        // HTTP/1.1: `websockets` refuses 1.0 before its `process_request`.
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
        s.set_read_timeout(Some(WAIT)).expect("timeout");
        let request = format!("GET /items/{id}?token={PLANTED} HTTP/1.1\r\nHost: x\r\n\r\n");
        std::io::Write::write_all(&mut s, request.as_bytes()).expect("GET /items");
        let mut reply = String::new();
        std::io::Read::read_to_string(&mut s, &mut reply).expect("the reply, then the close");
        assert!(reply.starts_with("HTTP/1.1 200 "), "{reply}");
    }
    let out = Command::new("/usr/bin/python3")
        .args(["-c", CLIENT, &port.to_string(), &MESSAGES.to_string()])
        .output()
        .expect("python3 client");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let client_total: f64 = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("the client's total round-trip time");
    let port_label = port.to_string();
    let served = [("process", "python3"), ("port", port_label.as_str())];
    let m = agent.wait_for("every message's response", WAIT, |m| {
        m.sum(
            "pipelens_websocket_response_duration_seconds_count",
            &served,
        ) >= MESSAGES as f64
            && m.sum(
                "pipelens_http_server_request_duration_seconds_count",
                &served,
            ) >= 3.0
    });
    let count = m.sum(
        "pipelens_websocket_response_duration_seconds_count",
        &served,
    );
    let sum = m.sum("pipelens_websocket_response_duration_seconds_sum", &served);
    assert_eq!(count, MESSAGES as f64, "{}", m.dump());
    assert!(
        sum >= 0.02 * MESSAGES as f64 && sum <= client_total,
        "response time sum {sum} s: at least {} s of server delay, at most the client's {client_total} s",
        0.02 * MESSAGES as f64
    );
    let mut items = served.to_vec();
    items.extend([("route", "/items/{id}"), ("status_code", "200")]);
    assert_eq!(
        m.sum(
            "pipelens_http_server_request_duration_seconds_count",
            &items
        ),
        3.0,
        "{}",
        m.dump()
    );
    let text = agent.metrics_text();
    for literal in [PLANTED, "/items/101", "/items/202", "token="] {
        assert!(
            !text
                .lines()
                .any(|l| l.starts_with("pipelens_http") && l.contains(literal)),
            "`{literal}` in an HTTP series"
        );
    }
    agent.stop();
    drop(server);
}

/// The demo pipeline and its database traced by every collector at once:
/// every series of connections, queries, WebSocket and HTTP carries the
/// same identity labels, `process` and `container` (the memory collector's
/// are checked in the memory tests).
#[test]
fn every_series_carries_process_and_container() {
    if !probes_available("every_series_carries_process_and_container") {
        return;
    }
    let pg = TestPostgres::start();
    let agent = Agent::start(&["--comm", "pipeline", "--comm", "postgres"]);
    let app = start_pipeline(&pg);
    loadgen(
        &app,
        &[
            "--sessions",
            "4",
            "--messages",
            "5",
            "--rate",
            "0",
            "--http-requests",
            "5",
        ],
    );
    let m = agent.wait_for("series of every collector", WAIT, |m| {
        [
            "pipelens_tcp_",
            "pipelens_db_",
            "pipelens_websocket_",
            "pipelens_http_",
        ]
        .iter()
        .all(|f| m.samples.iter().any(|(n, _, _)| n.starts_with(f)))
    });
    m.assert_identity_labels(&[
        "pipelens_tcp_",
        "pipelens_db_",
        "pipelens_websocket_",
        "pipelens_http_",
    ]);
    agent.stop();
}

/// A pipe or a regular file is never taken for a socket: the kernel checks
/// each file's inode mode before reading its `private_data` as a `struct
/// socket`. The traced peer serves the same HTTP exchange over a pipe, a
/// file and a Unix socket pair; exactly the socket pair's request is
/// counted, and no TCP connection. (On 6.18, a pipe's `private_data` read
/// as a socket happens to yield an address family the capture rejects as
/// well, so this guards the outcome on every kernel rather than failing
/// by itself when the mode check is removed.)
#[test]
fn pipes_and_files_are_not_taken_for_sockets() {
    if !probes_available("pipes_and_files_are_not_taken_for_sockets") {
        return;
    }
    let dir = TempDir::new("not-sockets");
    let mut peer = Peer::spawn(
        env!("CARGO_BIN_EXE_tcp-peer"),
        &["not-sockets", dir.path.to_str().expect("utf-8 path")],
    );
    peer.expect("ready");
    let agent = Agent::start(&["--pid", &peer.pid().to_string()]);
    peer.send("go");
    assert_eq!(peer.expect("done"), "1");
    let requests = |m: &Metrics| {
        m.sum(
            "pipelens_http_server_request_duration_seconds_count",
            &[("process", "tcp-peer")],
        )
    };
    let m = agent.wait_for("the socket pair's request", WAIT, |m| requests(m) >= 1.0);
    // The pipe's and the file's exchanges came first: had they been
    // captured, they would be counted by now.
    assert_eq!(requests(&m), 1.0, "{}", m.dump());
    assert_eq!(
        m.sum(
            "pipelens_tcp_connections_opened_total",
            &[("process", "tcp-peer")]
        ),
        0.0
    );
    peer.wait();
    agent.stop();
}

/// `--capture-bytes` at its minimum, 4096, with 700-byte messages:
/// upgrades, sessions, messages, bytes, closes by code and keep-alive HTTP
/// requests exact, no parse error. Each session's five messages fit one
/// capture even when the server reads them in one call; a burst past the
/// capture loses the frames that start beyond it (counted as
/// `capture_too_short`: measured at 64, 1,024 and 4,096 bytes with twelve).
#[test]
fn the_minimum_capture_keeps_http_and_websocket_in_frame() {
    if !probes_available("the_minimum_capture_keeps_http_and_websocket_in_frame") {
        return;
    }
    let pg = TestPostgres::start();
    let agent = Agent::start(&[
        "--comm",
        "pipeline",
        "--collectors",
        "websocket",
        "--capture-bytes",
        "4096",
    ]);
    let app = start_pipeline(&pg);
    let ready = agent.wait_for("the readiness probe", WAIT, |m| {
        ws(
            m,
            "pipelens_http_server_request_duration_seconds_count",
            app.port,
            &[],
        ) >= 1.0
    });
    let ok = [("status_code", "200")];
    let before = ws(
        &ready,
        "pipelens_http_server_request_duration_seconds_count",
        app.port,
        &ok,
    );
    let s = loadgen(
        &app,
        &[
            "--sessions",
            "30",
            "--subscriber-share",
            "0",
            "--messages",
            "5",
            "--rate",
            "0",
            "--message-size",
            "700",
            "--close-mix",
            "1000=20,abrupt=10",
            "--http-requests",
            "50",
        ],
    );
    let sent = s["publishers"]["messages_sent"].as_u64().expect("messages");
    let bytes = s["publishers"]["bytes_sent"].as_u64().expect("bytes");
    assert_eq!(sent, 150);
    let m = agent.wait_for("every session closed", WAIT, |m| {
        ws(m, "pipelens_websocket_closes_total", app.port, &[]) >= 30.0
            && ws(
                m,
                "pipelens_http_server_request_duration_seconds_count",
                app.port,
                &[],
            ) >= before + 50.0
    });
    let received = [("direction", "received")];
    for (name, extra, want) in [
        ("pipelens_websocket_sessions_total", &[][..], 30.0),
        ("pipelens_websocket_sessions_active", &[][..], 0.0),
        (
            "pipelens_websocket_messages_total",
            &received[..],
            sent as f64,
        ),
        (
            "pipelens_websocket_message_size_bytes_sum",
            &received[..],
            bytes as f64,
        ),
        (
            "pipelens_websocket_closes_total",
            &[("code", "1000")][..],
            20.0,
        ),
        (
            "pipelens_websocket_closes_total",
            &[("code", "1006")][..],
            10.0,
        ),
        (
            "pipelens_http_server_request_duration_seconds_count",
            &ok[..],
            before + 50.0,
        ),
        (
            "pipelens_http_server_request_duration_seconds_count",
            &[("status_code", "101")][..],
            30.0,
        ),
        ("pipelens_http_parse_errors_total", &[][..], 0.0),
    ] {
        assert_eq!(
            ws(&m, name, app.port, extra),
            want,
            "{name} {extra:?}:\n{}",
            m.dump()
        );
    }
    agent.stop();
}
