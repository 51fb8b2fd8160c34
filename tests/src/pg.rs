//! A private PostgreSQL cluster for the probe tests: `initdb` in a
//! temporary directory, a free port on loopback, its own socket directory,
//! run as the `postgres` system user when the caller is root (the server
//! refuses to run as root), as the caller otherwise. The one PostgreSQL
//! harness of the workspace: the probe tests, xtask and the demo's smoke
//! test use it.
//! Stopped and removed on drop.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
};

use crate::{TempDir, free_port};

pub struct TestPostgres {
    pub port: u16,
    pub dir: TempDir,
    bin: PathBuf,
}

/// Whether [`TestPostgres::start`] can be expected to work here.
pub fn is_available() -> bool {
    bin_dir().is_some()
}

/// The newest installed server's binaries (`/usr/lib/postgresql/<v>/bin`).
pub fn bin_dir() -> Option<PathBuf> {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, p)| p)
}

impl TestPostgres {
    pub fn start() -> TestPostgres {
        let bin = bin_dir().expect("PostgreSQL server binaries (cargo xtask setup installs them)");
        let dir = TempDir::new("pg");
        std::fs::create_dir_all(dir.path.join("sock")).expect("socket dir");
        if is_root() {
            chown_postgres(&dir.path);
        }
        let port = free_port();
        let data = dir.path.join("data");
        let pg = TestPostgres { port, dir, bin };
        pg.as_postgres(
            &pg.bin("initdb"),
            &[
                "-D",
                data.to_str().expect("utf8"),
                "-A",
                "trust",
                "-U",
                "postgres",
                "--no-sync",
            ],
        );
        let opts = format!(
            "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off -c max_connections=50",
            pg.socket_dir().display()
        );
        pg.as_postgres(
            &pg.bin("pg_ctl"),
            &[
                "-D",
                data.to_str().expect("utf8"),
                "-l",
                pg.dir.path.join("log").to_str().expect("utf8"),
                "-o",
                &opts,
                "-w",
                "start",
            ],
        );
        pg
    }

    pub fn bin(&self, name: &str) -> String {
        self.bin.join(name).display().to_string()
    }

    pub fn socket_dir(&self) -> PathBuf {
        self.dir.path.join("sock")
    }

    /// `-h HOST -p PORT` for a client: 127.0.0.1 over TCP, or the socket
    /// directory over the Unix socket.
    pub fn conn_args(&self, unix: bool) -> Vec<String> {
        let host = if unix {
            self.socket_dir().display().to_string()
        } else {
            "127.0.0.1".to_owned()
        };
        vec!["-h".into(), host, "-p".into(), self.port.to_string()]
    }

    /// `pgbench ARGS` against this cluster's `postgres` database (over the
    /// Unix socket when `unix`), as a command to spawn.
    pub fn pgbench_command(&self, unix: bool, args: &[&str]) -> Command {
        let mut all: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        all.extend(self.conn_args(unix));
        all.push("postgres".into());
        let all: Vec<&str> = all.iter().map(String::as_str).collect();
        self.command(&self.bin("pgbench"), &all)
    }

    /// Runs pgbench to completion, panicking with its output on failure.
    pub fn pgbench(&self, unix: bool, args: &[&str]) -> Output {
        let out = self.pgbench_command(unix, args).output().expect("pgbench");
        assert!(
            out.status.success(),
            "pgbench {args:?} failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// Runs `program ARGS` as the postgres user in the cluster directory,
    /// panicking with its output when it fails.
    pub fn as_postgres(&self, program: &str, args: &[&str]) -> Output {
        let out = self
            .command(program, args)
            .output()
            .unwrap_or_else(|e| panic!("{program}: {e}"));
        assert!(
            out.status.success(),
            "{program} {args:?} failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// `program ARGS` as the `postgres` user. The switch is made by the
    /// child itself (setgid, setgroups, setuid), not by `runuser`, so the
    /// harness needs no PAM stack: the kernel-matrix guests have none.
    pub fn command(&self, program: &str, args: &[&str]) -> Command {
        use std::os::unix::process::CommandExt as _;
        let mut c = Command::new(program);
        c.args(args)
            .current_dir(&self.dir.path)
            .stdin(Stdio::null());
        // The server refuses to run as root; any other user runs it as
        // itself.
        if is_root() {
            let (uid, gid) = postgres_ids();
            c.uid(uid).gid(gid);
        }
        c
    }

    /// `psql -c SQL` over TCP; errors are expected and not fatal.
    pub fn psql(&self, sql: &str) -> Output {
        let mut args: Vec<String> = self.conn_args(false);
        args.extend([
            "-X".into(),
            "-q".into(),
            "-d".into(),
            "postgres".into(),
            "-c".into(),
            sql.into(),
        ]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.command(&self.bin("psql"), &args)
            .output()
            .expect("psql")
    }

    /// `psql -X -A -t -v ON_ERROR_STOP=1 -c SQL` over TCP: its output
    /// (unaligned, tuples only: `SELECT count(*) …` gives `"42\n"`),
    /// panicking with psql's stderr when the statement fails.
    pub fn query(&self, sql: &str) -> String {
        let mut args: Vec<String> = self.conn_args(false);
        args.extend(
            [
                "-X",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-d",
                "postgres",
                "-c",
                sql,
            ]
            .map(String::from),
        );
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        String::from_utf8_lossy(&self.as_postgres(&self.bin("psql"), &args).stdout).into_owned()
    }

    /// A libpq key/value connection string over TCP to `postgres`.
    pub fn tcp_url(&self) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres",
            self.port
        )
    }

    /// A libpq key/value connection string over the Unix socket.
    pub fn unix_url(&self) -> String {
        format!(
            "host={} port={} user=postgres dbname=postgres",
            self.socket_dir().display(),
            self.port
        )
    }

    pub fn path(&self) -> &Path {
        &self.dir.path
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// The `postgres` system user's uid and gid, from `/etc/passwd`.
fn postgres_ids() -> (u32, u32) {
    let passwd = std::fs::read_to_string("/etc/passwd").expect("/etc/passwd");
    passwd
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f.len() > 3 && f[0] == "postgres").then(|| (f[2].parse().ok(), f[3].parse().ok()))
        })
        .and_then(|(u, g)| Some((u?, g?)))
        .expect("a postgres user (the postgresql package creates it)")
}

fn chown_postgres(path: &Path) {
    let status = Command::new("chown")
        .args(["-R", "postgres:postgres"])
        .arg(path)
        .status()
        .expect("chown");
    assert!(
        status.success(),
        "chown to postgres (is the postgresql package installed?)"
    );
}

impl Drop for TestPostgres {
    fn drop(&mut self) {
        let data = self.dir.path.join("data");
        let _ = self
            .command(
                &self.bin("pg_ctl"),
                &[
                    "-D",
                    data.to_str().unwrap_or_default(),
                    "-m",
                    "immediate",
                    "-w",
                    "stop",
                ],
            )
            .output();
    }
}
