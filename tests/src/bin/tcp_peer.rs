//! A TCP peer whose behaviour is known exactly, for the probe tests: it is
//! the ground truth the agent's counts are compared with.
//!
//! ```text
//! tcp-peer serve ADDR N REQ RESP HOLD_MS [linger0]   accept N, read REQ, wait, write RESP, close
//! tcp-peer connect ADDR N REQ RESP HOLD_MS THREADS  N connections: write REQ, read to EOF
//! tcp-peer refused ADDR N [nonblocking]             N connects to a closed port
//! tcp-peer hold-server ADDR                          accept one, echo bytes until EOF
//! tcp-peer hold-client ADDR                          connect, then per stdin line "send N" / "close"
//! tcp-peer fork-client ADDR N                        wait for a stdin line, fork, child connects N times
//! tcp-peer churn PORT SECS THREADS                   benchmark: connect, 64 B each way, close, in a loop
//! tcp-peer burst ADDR N [both|client|server] [linger0]  hold N pairs (or one end of each), on "go" close them all
//! tcp-peer burst-fits N                              exit 0 if one process may hold 2N descriptors
//! tcp-peer not-sockets DIR                           an HTTP exchange over a pipe, a file in DIR, then a Unix socket pair
//! ```
//! Every mode prints `ready` once set up and `done` with its own counts.

use std::{
    io::{BufRead, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    thread,
    time::Duration,
};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let mode = args.get(1).map(String::as_str).unwrap_or("");
    let arg = |i: usize| -> String {
        args.get(i)
            .cloned()
            .unwrap_or_else(|| panic!("missing argument {i} for {mode}"))
    };
    let num = |i: usize| -> u64 { arg(i).parse().expect("number") };
    match mode {
        "serve" => serve(
            arg(2).parse().expect("addr"),
            num(3),
            num(4) as usize,
            num(5) as usize,
            num(6),
            args.get(7).is_some_and(|s| s == "linger0"),
        ),
        "connect" => connect(
            arg(2).parse().expect("addr"),
            num(3),
            num(4) as usize,
            num(5) as usize,
            num(6),
            num(7),
        ),
        "refused" => refused(
            arg(2).parse().expect("addr"),
            num(3),
            args.get(4).is_some_and(|s| s == "nonblocking"),
        ),
        "hold-server" => hold_server(arg(2).parse().expect("addr")),
        "hold-client" => hold_client(arg(2).parse().expect("addr")),
        "fork-client" => fork_client(arg(2).parse().expect("addr"), num(3)),
        "churn" => churn(num(2) as u16, num(3), num(4)),
        "burst" => burst(
            arg(2).parse().expect("addr"),
            num(3),
            args.iter().any(|s| s == "linger0"),
            match args.get(4).map(String::as_str) {
                Some("client") => Ends::Client,
                Some("server") => Ends::Server,
                _ => Ends::Both,
            },
        ),
        "burst-fits" => {
            // Exit status 0 when one process may hold both ends of N pairs.
            let n = num(2);
            let want = 2 * n + 8;
            let fits = fd_limit_allows(want) || {
                let lim = libc::rlimit {
                    rlim_cur: want,
                    rlim_max: want,
                };
                // SAFETY: a valid in-pointer; a refusal only answers the question.
                let rc = unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raw const lim) };
                rc == 0
            };
            std::process::exit(i32::from(!fits));
        }
        "not-sockets" => not_sockets(&arg(2)),
        _ => {
            eprintln!("usage: see the doc comment of tests/src/bin/tcp_peer.rs");
            std::process::exit(2);
        }
    }
}

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}").expect("stdout");
    out.flush().expect("stdout");
}

fn serve(addr: SocketAddr, n: u64, req: usize, resp: usize, hold_ms: u64, linger0: bool) {
    let listener = TcpListener::bind(addr).expect("bind");
    say(&format!(
        "ready {}",
        listener.local_addr().expect("addr").port()
    ));
    let payload = vec![b's'; resp];
    let mut handles = Vec::new();
    for _ in 0..n {
        let (mut c, _) = listener.accept().expect("accept");
        let payload = payload.clone();
        handles.push(thread::spawn(move || {
            let mut buf = vec![0u8; req];
            c.read_exact(&mut buf).expect("read request");
            thread::sleep(Duration::from_millis(hold_ms));
            c.write_all(&payload).expect("write response");
            if linger0 {
                set_linger0(&c);
            }
            drop(c);
        }));
    }
    for h in handles {
        h.join().expect("server thread");
    }
    say(&format!("done {n}"));
}

fn set_linger0(c: &TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: valid fd and a correctly sized option value.
    let rc = unsafe {
        libc::setsockopt(
            c.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const linger).cast(),
            size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "SO_LINGER");
}

fn connect(addr: SocketAddr, n: u64, req: usize, resp: usize, _hold_ms: u64, threads: u64) {
    say("ready");
    let per = n / threads;
    let mut handles = Vec::new();
    for t in 0..threads {
        let count = if t == threads - 1 {
            n - per * (threads - 1)
        } else {
            per
        };
        handles.push(thread::spawn(move || {
            let mut got_total = 0usize;
            let mut resets = 0u64;
            for _ in 0..count {
                let mut c = TcpStream::connect(addr).expect("connect");
                c.write_all(&vec![b'c'; req]).expect("write request");
                let mut got = Vec::with_capacity(resp);
                match c.read_to_end(&mut got) {
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => resets += 1,
                    Err(e) => panic!("read: {e}"),
                }
                got_total += got.len();
            }
            (got_total, resets)
        }));
    }
    let (mut bytes, mut resets) = (0, 0);
    for h in handles {
        let (b, r) = h.join().expect("client thread");
        bytes += b;
        resets += r;
    }
    say(&format!("done {n} received {bytes} resets {resets}"));
}

fn refused(addr: SocketAddr, n: u64, nonblocking: bool) {
    say("ready");
    let mut refused = 0;
    for _ in 0..n {
        let err = if nonblocking {
            nonblocking_connect(addr)
        } else {
            TcpStream::connect(addr)
                .err()
                .and_then(|e| e.raw_os_error())
        };
        if err == Some(libc::ECONNREFUSED) {
            refused += 1;
        }
    }
    say(&format!("done {refused}"));
}

/// connect() on a non-blocking socket, then poll and SO_ERROR: the path
/// event loops (tokio, Go, libuv) take.
fn nonblocking_connect(addr: SocketAddr) -> Option<i32> {
    let SocketAddr::V4(v4) = addr else {
        panic!("nonblocking mode is IPv4 only")
    };
    // SAFETY: plain socket syscalls on a descriptor owned here.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_NONBLOCK, 0);
        assert!(fd >= 0);
        let sin = libc::sockaddr_in {
            sin_family: libc::AF_INET as u16,
            sin_port: v4.port().to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from_ne_bytes(v4.ip().octets()),
            },
            sin_zero: [0; 8],
        };
        let rc = libc::connect(
            fd,
            (&raw const sin).cast(),
            size_of::<libc::sockaddr_in>() as u32,
        );
        let mut err = 0;
        if rc != 0 {
            let e = *libc::__errno_location();
            if e == libc::EINPROGRESS {
                let mut pfd = libc::pollfd {
                    fd,
                    events: libc::POLLOUT,
                    revents: 0,
                };
                libc::poll(&mut pfd, 1, 5000);
                let mut len = size_of::<i32>() as u32;
                libc::getsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    libc::SO_ERROR,
                    (&raw mut err).cast(),
                    &mut len,
                );
            } else {
                err = e;
            }
        }
        libc::close(fd);
        (err != 0).then_some(err)
    }
}

fn hold_server(addr: SocketAddr) {
    let listener = TcpListener::bind(addr).expect("bind");
    say(&format!(
        "ready {}",
        listener.local_addr().expect("addr").port()
    ));
    let (mut c, _) = listener.accept().expect("accept");
    let mut total = 0;
    let mut buf = [0u8; 4096];
    loop {
        match c.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => total += n,
        }
    }
    say(&format!("done {total}"));
}

fn hold_client(addr: SocketAddr) {
    let mut c = TcpStream::connect(addr).expect("connect");
    say("ready");
    for line in std::io::stdin().lock().lines() {
        let line = line.expect("stdin");
        if let Some(n) = line.strip_prefix("send ") {
            let n: usize = n.trim().parse().expect("count");
            c.write_all(&vec![b'h'; n]).expect("write");
            say("sent");
        } else if line == "close" {
            break;
        }
    }
    drop(c);
    say("done");
}

fn fork_client(addr: SocketAddr, n: u64) {
    say("ready");
    let mut line = String::new();
    std::io::stdin().read_line(&mut line).expect("stdin");
    // SAFETY: the process is single-threaded here; the child only makes
    // syscalls through std and exits.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork");
    if pid == 0 {
        for _ in 0..n {
            let mut c = TcpStream::connect(addr).expect("connect");
            c.write_all(b"q").expect("write");
            let mut sink = Vec::new();
            let _ = c.read_to_end(&mut sink);
        }
        std::process::exit(0);
    }
    let mut status = 0;
    // SAFETY: waiting for our own child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    say(&format!("done {n}"));
}

/// Loopback connection churn for `cargo xtask bench`: `threads` server
/// threads looping accept / read 64 B / write 64 B / close on one listener,
/// and as many client threads looping connect / write / read / close. Prints
/// the number of completed connections.
fn churn(port: u16, secs: u64, threads: u64) {
    let listener = std::sync::Arc::new(TcpListener::bind(("127.0.0.1", port)).expect("bind"));
    for _ in 0..threads {
        let listener = listener.clone();
        thread::spawn(move || {
            let mut buf = [0u8; 64];
            loop {
                let Ok((mut c, _)) = listener.accept() else {
                    continue;
                };
                if c.read_exact(&mut buf).is_ok() {
                    let _ = c.write_all(&buf);
                }
            }
        });
    }
    say("ready");
    let deadline = std::time::Instant::now() + Duration::from_secs(secs);
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            thread::spawn(move || {
                let mut n = 0u64;
                let mut buf = [0u8; 64];
                while std::time::Instant::now() < deadline {
                    let mut c = TcpStream::connect(("127.0.0.1", port)).expect("connect");
                    c.write_all(&[b'b'; 64]).expect("write");
                    c.read_exact(&mut buf).expect("read");
                    n += 1;
                }
                n
            })
        })
        .collect();
    let total: u64 = handles.into_iter().map(|h| h.join().expect("client")).sum();
    say(&format!("done {total}"));
}

/// Which ends of the burst's connections this process holds.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Ends {
    Both,
    Client,
    Server,
}

/// One process holds both ends of `n` loopback connections (each end has
/// carried one byte, so the accepted end is claimed by this process), then,
/// on a `go` line, closes every one of them as fast as it can: the client
/// ends first, then the accepted ends, or (`linger0`) the accepted ends
/// first with SO_LINGER 0 (a RST each), then the clients. The close burst
/// of issue 13. Where the descriptor limit cannot hold both ends (20,000
/// without CAP_SYS_RESOURCE), two processes hold one end each (`server`,
/// started first, and `client`) and close on the same `go`.
fn burst(addr: SocketAddr, n: u64, linger0: bool, ends: Ends) {
    let per_end = if ends == Ends::Both { 2 } else { 1 };
    raise_fd_limit(per_end * n + 8);
    let listener = (ends != Ends::Client).then(|| TcpListener::bind(addr).expect("bind"));
    if ends == Ends::Server {
        say("listening");
    }
    let mut clients = Vec::with_capacity(n as usize);
    let mut servers = Vec::with_capacity(n as usize);
    let mut byte = [0u8; 1];
    for _ in 0..n {
        if ends != Ends::Server {
            let mut c = TcpStream::connect(addr).expect("connect");
            c.write_all(b"c").expect("write");
            clients.push(c);
        }
        if let Some(l) = &listener {
            let (mut s, _) = l.accept().expect("accept");
            s.read_exact(&mut byte).expect("read");
            s.write_all(b"s").expect("write");
            servers.push(s);
        }
        if let Some(c) = clients.last_mut() {
            c.read_exact(&mut byte).expect("read");
        }
    }
    drop(listener);
    say("ready");
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line).expect("stdin");
    if linger0 {
        for s in &servers {
            set_linger0(s);
        }
        drop(servers);
        drop(clients);
    } else {
        drop(clients);
        drop(servers);
    }
    say(&format!("done {n}"));
}

/// Whether this process may hold `want` descriptors.
fn fd_limit_allows(want: u64) -> bool {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: a valid out-pointer.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut lim) };
    rc == 0 && lim.rlim_max >= want
}

/// Lets this process hold `want` descriptors (root may raise the hard limit).
fn raise_fd_limit(want: u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: a valid out-pointer.
    assert_eq!(
        unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut lim) },
        0
    );
    if lim.rlim_cur >= want {
        return;
    }
    lim.rlim_cur = want;
    lim.rlim_max = lim.rlim_max.max(want);
    // SAFETY: a valid in-pointer.
    let rc = unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raw const lim) };
    assert_eq!(
        rc,
        0,
        "RLIMIT_NOFILE to {want}: {}",
        std::io::Error::last_os_error()
    );
}

const HTTP_REQUEST: &[u8] = b"GET /not-a-socket HTTP/1.1\r\nHost: peer\r\n\r\n";
const HTTP_RESPONSE: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";

/// The same server-side HTTP exchange (read a request, write its response)
/// on a pipe, on a regular file, and on a Unix socket pair. Each request
/// is written before `ready`, that is before the agent is started, so that
/// the first call the agent sees on each is the read of a request, as on a
/// server's socket. Waits for a `go` line on stdin after `ready`.
fn not_sockets(dir: &str) {
    use std::io::{Seek, SeekFrom};
    let (mut pipe_r, mut pipe_w) = std::io::pipe().expect("pipe");
    pipe_w.write_all(HTTP_REQUEST).expect("write pipe");
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(std::path::Path::new(dir).join("http.txt"))
        .expect("file");
    file.write_all(HTTP_REQUEST).expect("write file");
    let (mut client, mut server) = std::os::unix::net::UnixStream::pair().expect("socketpair");
    client.write_all(HTTP_REQUEST).expect("write socket");
    println!("ready");
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line).expect("stdin");
    let mut buf = vec![0u8; HTTP_REQUEST.len()];

    pipe_r.read_exact(&mut buf).expect("read pipe");
    pipe_w.write_all(HTTP_RESPONSE).expect("write pipe");
    file.seek(SeekFrom::Start(0)).expect("seek");
    file.read_exact(&mut buf).expect("read file");
    file.write_all(HTTP_RESPONSE).expect("write file");
    server.read_exact(&mut buf).expect("read socket");
    server.write_all(HTTP_RESPONSE).expect("write socket");
    let mut reply = vec![0u8; HTTP_RESPONSE.len()];
    client.read_exact(&mut reply).expect("read socket");
    drop((server, client));
    println!("done 1");
}
