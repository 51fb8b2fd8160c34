//! A PostgreSQL client that speaks the extended query protocol by hand and
//! lays its messages out over iovecs the way corking drivers do (Node's
//! `pg` sends each statement as one `writev` of one iovec per message), so
//! that the probe tests control exactly how the bytes cross the syscall
//! boundary. It is their ground truth: it prints what it sent, per
//! statement, once every reply is in.
//!
//! ```text
//! pg-vectored ADDR ROUNDS [option]...
//!   ADDR               host:port, or the path of a Unix socket
//!   ROUNDS             rounds of: an INSERT (unnamed statement) and an
//!                      execution of the named prepared SELECT
//!   iovecs=K           at most K iovecs per call (default: one statement's)
//!   empty              an empty iovec after every second message
//!   split-headers      every message's 5-byte header cut across two iovecs
//!   sendmsg            sendmsg(2) instead of writev(2)
//!   read-iovecs=K      replies read by readv(2) (recvmsg with sendmsg) into
//!                      K buffers of 7 bytes
//! ```
//! Prints `{"INSERT": n, "SELECT": n, "calls": c, "max_iovecs": k}`.

use std::{
    io::{Read, Write},
    net::TcpStream,
    os::{fd::AsRawFd, unix::net::UnixStream},
};

trait Conn: Read + Write + AsRawFd {}
impl Conn for TcpStream {}
impl Conn for UnixStream {}

fn message(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut m = vec![tag];
    m.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
    m.extend_from_slice(body);
    m
}

fn cstr(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(s.as_bytes());
    out.push(0);
}

fn parse(name: &str, sql: &str) -> Vec<u8> {
    let mut b = Vec::new();
    cstr(&mut b, name);
    cstr(&mut b, sql);
    b.extend_from_slice(&0u16.to_be_bytes());
    message(b'P', &b)
}

/// Bind of text parameters to `statement`'s unnamed portal.
fn bind(statement: &str, params: &[&str]) -> Vec<u8> {
    let mut b = Vec::new();
    cstr(&mut b, "");
    cstr(&mut b, statement);
    b.extend_from_slice(&0u16.to_be_bytes());
    b.extend_from_slice(&(params.len() as u16).to_be_bytes());
    for p in params {
        b.extend_from_slice(&(p.len() as u32).to_be_bytes());
        b.extend_from_slice(p.as_bytes());
    }
    b.extend_from_slice(&0u16.to_be_bytes());
    message(b'B', &b)
}

fn describe_portal() -> Vec<u8> {
    message(b'D', b"P\0")
}

fn execute() -> Vec<u8> {
    message(b'E', &[0, 0, 0, 0, 0])
}

fn sync() -> Vec<u8> {
    message(b'S', &[])
}

#[derive(Clone, Copy)]
struct Options {
    iovecs: Option<usize>,
    empty: bool,
    split_headers: bool,
    sendmsg: bool,
    read_iovecs: Option<usize>,
}

/// The messages as iovec pieces: headers cut, empty pieces added.
fn pieces(messages: &[Vec<u8>], o: &Options) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for (i, m) in messages.iter().enumerate() {
        if o.split_headers {
            out.push(m[..2].to_vec());
            out.push(m[2..].to_vec());
        } else {
            out.push(m.clone());
        }
        if o.empty && i % 2 == 1 {
            out.push(Vec::new());
        }
    }
    out
}

/// A `msghdr` carrying just `iovs`.
fn msghdr(iovs: &[libc::iovec]) -> libc::msghdr {
    // SAFETY: msghdr is plain data; all-zero is "no name, no control".
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iovs.as_ptr() as *mut libc::iovec;
    msg.msg_iovlen = iovs.len();
    msg
}

fn send(conn: &mut dyn Conn, iovs: &[Vec<u8>], o: &Options) {
    let total: usize = iovs.iter().map(Vec::len).sum();
    let raw: Vec<libc::iovec> = iovs
        .iter()
        .map(|p| libc::iovec {
            iov_base: p.as_ptr() as *mut libc::c_void,
            iov_len: p.len(),
        })
        .collect();
    // SAFETY: the iovecs point into `iovs`, alive for the call.
    let n = unsafe {
        if o.sendmsg {
            libc::sendmsg(conn.as_raw_fd(), &msghdr(&raw), 0)
        } else {
            libc::writev(conn.as_raw_fd(), raw.as_ptr(), raw.len() as i32)
        }
    };
    // A blocking socket with room for the whole call sends it whole; a
    // short write would change what the test means, so it is refused.
    assert_eq!(n, total as isize, "{}", std::io::Error::last_os_error());
}

/// Reads into `buf` more bytes from the server, the way the options say.
fn receive(conn: &mut dyn Conn, buf: &mut Vec<u8>, o: &Options) {
    let n = match o.read_iovecs {
        None => {
            let mut b = [0u8; 8192];
            let n = conn.read(&mut b).expect("read");
            buf.extend_from_slice(&b[..n]);
            n
        }
        Some(k) => {
            let mut small = vec![[0u8; 7]; k];
            let raw: Vec<libc::iovec> = small
                .iter_mut()
                .map(|b| libc::iovec {
                    iov_base: b.as_mut_ptr().cast(),
                    iov_len: b.len(),
                })
                .collect();
            // SAFETY: the iovecs point into `small`, alive for the call.
            let n = unsafe {
                if o.sendmsg {
                    libc::recvmsg(conn.as_raw_fd(), &mut msghdr(&raw), 0)
                } else {
                    libc::readv(conn.as_raw_fd(), raw.as_ptr(), raw.len() as i32)
                }
            };
            assert!(n >= 0, "{}", std::io::Error::last_os_error());
            let n = n as usize;
            buf.extend(small.iter().flatten().take(n));
            n
        }
    };
    assert!(n > 0, "the server closed the connection");
}

/// Reads until `syncs` ReadyForQuery have come; counts CommandCompletes by
/// their command word and fails on any ErrorResponse.
fn replies(
    conn: &mut dyn Conn,
    buf: &mut Vec<u8>,
    syncs: usize,
    done: &mut [usize; 2],
    o: &Options,
) {
    let mut ready = 0;
    while ready < syncs {
        while buf.len() >= 5 {
            let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
            if buf.len() < 1 + len {
                break;
            }
            let msg: Vec<u8> = buf.drain(..1 + len).collect();
            match msg[0] {
                b'Z' => ready += 1,
                b'E' => panic!("server error: {}", String::from_utf8_lossy(&msg[5..])),
                b'C' if msg[5..].starts_with(b"INSERT") => done[0] += 1,
                b'C' if msg[5..].starts_with(b"SELECT") => done[1] += 1,
                _ => {}
            }
        }
        if ready < syncs {
            receive(conn, buf, o);
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let addr = args.get(1).expect("ADDR");
    let rounds: usize = args.get(2).expect("ROUNDS").parse().expect("ROUNDS");
    let mut o = Options {
        iovecs: None,
        empty: false,
        split_headers: false,
        sendmsg: false,
        read_iovecs: None,
    };
    for a in &args[3..] {
        match a.split_once('=') {
            Some(("iovecs", k)) => o.iovecs = Some(k.parse().expect("iovecs=K")),
            Some(("read-iovecs", k)) => o.read_iovecs = Some(k.parse().expect("read-iovecs=K")),
            _ if a == "empty" => o.empty = true,
            _ if a == "split-headers" => o.split_headers = true,
            _ if a == "sendmsg" => o.sendmsg = true,
            _ => panic!("unknown option {a}"),
        }
    }
    let mut conn: Box<dyn Conn> = if addr.starts_with('/') {
        Box::new(UnixStream::connect(addr).expect("connect"))
    } else {
        let s = TcpStream::connect(addr).expect("connect");
        s.set_nodelay(true).expect("nodelay");
        Box::new(s)
    };
    let conn = conn.as_mut();
    let mut startup = Vec::new();
    startup.extend_from_slice(&196_608u32.to_be_bytes());
    for kv in ["user", "postgres", "database", "postgres"] {
        cstr(&mut startup, kv);
    }
    startup.push(0);
    let mut first = ((startup.len() + 4) as u32).to_be_bytes().to_vec();
    first.extend_from_slice(&startup);
    conn.write_all(&first).expect("startup");
    let mut buf = Vec::new();
    let mut done = [0usize; 2];
    // Trust authentication: AuthenticationOk … ReadyForQuery.
    replies(conn, &mut buf, 1, &mut done, &o);

    // Setup, one statement per call as psql would.
    let mut setup = vec![parse(
        "",
        "CREATE TEMP TABLE vec_t (id int PRIMARY KEY, note text)",
    )];
    setup.extend([bind("", &[]), execute(), sync()]);
    setup.extend([parse("sel", "SELECT note FROM vec_t WHERE id = $1"), sync()]);
    let (mut calls, mut max_iovecs) = (0, 0);
    send(conn, &setup, &Options { iovecs: None, ..o });
    replies(conn, &mut buf, 2, &mut [0; 2], &o);

    // Each round: one INSERT and one execution of the prepared SELECT,
    // each ending in its own Sync.
    let mut statements: Vec<Vec<Vec<u8>>> = Vec::new();
    for i in 0..rounds {
        let id = i.to_string();
        let note = format!("note-{i}");
        statements.push(vec![
            parse("", "INSERT INTO vec_t (id, note) VALUES ($1, $2)"),
            bind("", &[&id, &note]),
            describe_portal(),
            execute(),
            sync(),
        ]);
        statements.push(vec![
            bind("sel", &[&id]),
            describe_portal(),
            execute(),
            sync(),
        ]);
    }
    // Calls: one statement per call, or K iovecs per call across
    // statements (a statement may straddle two calls).
    let mut pending: Vec<Vec<u8>> = Vec::new();
    let mut syncs = 0;
    for (n, s) in statements.iter().enumerate() {
        pending.extend(pieces(s, &o));
        syncs += 1;
        let last = n + 1 == statements.len();
        let flush: Vec<Vec<Vec<u8>>> = match o.iovecs {
            None => vec![std::mem::take(&mut pending)],
            Some(k) => {
                let mut out = Vec::new();
                while pending.len() >= k || (last && !pending.is_empty()) {
                    let take = pending.len().min(k);
                    out.push(pending.drain(..take).collect());
                }
                out
            }
        };
        for call in flush {
            max_iovecs = max_iovecs.max(call.len());
            send(conn, &call, &o);
            calls += 1;
        }
        // Replies are read once the calls carrying each Sync are out; with
        // a Sync still waiting in `pending` they come later.
        if pending.is_empty() {
            replies(conn, &mut buf, syncs, &mut done, &o);
            syncs = 0;
        }
    }
    assert_eq!(done, [rounds, rounds], "replies to what was sent");
    conn.write_all(&message(b'X', &[])).expect("terminate");
    println!(
        "{}",
        serde_json::json!({
            "INSERT": rounds, "SELECT": rounds, "calls": calls, "max_iovecs": max_iovecs,
        })
    );
}
