//! A private, throwaway PostgreSQL cluster for tests: `initdb` in a temporary
//! directory, a free loopback port, its own Unix socket directory, trust
//! authentication for the `postgres` superuser. Dropping the value stops the
//! server and deletes the directory.
//!
//! The server refuses to run as root, so when the tests run as root (they do
//! in CI, to load probes) every server-side command runs through
//! `runuser -u postgres` — the system user the Debian packages create — and
//! the directory is handed to that user first.
//!
//! ```no_run
//! let pg = pipelens_demo::testpg::TestPostgres::start()?;
//! let out = pg.psql("SELECT 1")?;
//! assert_eq!(out.trim(), "1");
//! println!("{}", pg.unix_url()); // host=/tmp/pipelens-pg-…/sock port=… user=postgres dbname=postgres
//! # Ok::<(), pipelens_demo::testpg::TestPgError>(())
//! ```

use std::{
    ffi::OsStr,
    fmt, fs,
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
};

/// The account PostgreSQL runs as when the caller is root.
const SERVER_USER_WHEN_ROOT: &str = "postgres";
/// The superuser `initdb` creates; every connection string uses it.
pub const SUPERUSER: &str = "postgres";
/// The database every cluster has from the start.
pub const DATABASE: &str = "postgres";

#[derive(Debug, thiserror::Error)]
pub enum TestPgError {
    #[error("no PostgreSQL server binaries under /usr/lib/postgresql/*/bin (install postgresql)")]
    NotInstalled,
    #[error("running as root, but there is no `{user}` system user to run the server as")]
    NoServerUser { user: &'static str },
    #[error("{action}: {source}")]
    Io {
        action: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{command}` failed ({status}):\n{output}")]
    CommandFailed {
        command: String,
        status: std::process::ExitStatus,
        output: String,
    },
}

type Result<T> = std::result::Result<T, TestPgError>;

fn io_err(action: impl Into<String>) -> impl FnOnce(std::io::Error) -> TestPgError {
    let action = action.into();
    move |source| TestPgError::Io { action, source }
}

/// The `bin` directory of the newest installed PostgreSQL server
/// (`/usr/lib/postgresql/<major>/bin`), if any.
pub fn server_bin_dir() -> Option<PathBuf> {
    let mut versions: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .flatten()
        .filter_map(|entry| {
            let major = entry.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").is_file().then_some((major, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin)
}

/// Whether [`TestPostgres::start`] can be expected to work here.
pub fn is_available() -> bool {
    server_bin_dir().is_some()
}

/// Who owns the cluster's files and runs its server processes.
#[derive(Debug, Clone)]
enum ServerUser {
    /// The current (non-root) user.
    Current,
    /// Root delegates to this system account through `runuser`.
    Other { name: String, uid: u32, gid: u32 },
}

impl ServerUser {
    fn detect() -> Result<ServerUser> {
        // SAFETY: geteuid has no preconditions and cannot fail.
        let euid = unsafe { libc::geteuid() };
        if euid != 0 {
            return Ok(ServerUser::Current);
        }
        let id = |flag: &str| -> Option<u32> {
            let out = Command::new("id")
                .args([flag, SERVER_USER_WHEN_ROOT])
                .stderr(Stdio::null())
                .output()
                .ok()?;
            if !out.status.success() {
                return None;
            }
            String::from_utf8(out.stdout).ok()?.trim().parse().ok()
        };
        match (id("-u"), id("-g")) {
            (Some(uid), Some(gid)) => Ok(ServerUser::Other {
                name: SERVER_USER_WHEN_ROOT.to_owned(),
                uid,
                gid,
            }),
            _ => Err(TestPgError::NoServerUser {
                user: SERVER_USER_WHEN_ROOT,
            }),
        }
    }

    fn command(&self, program: &Path) -> Command {
        match self {
            ServerUser::Current => Command::new(program),
            ServerUser::Other { name, .. } => {
                let mut c = Command::new("runuser");
                c.args(["-u", name, "--"]).arg(program);
                c
            }
        }
    }

    fn chown(&self, path: &Path) -> Result<()> {
        if let ServerUser::Other { uid, gid, .. } = self {
            std::os::unix::fs::chown(path, Some(*uid), Some(*gid))
                .map_err(io_err(format!("chown {}", path.display())))?;
        }
        Ok(())
    }
}

/// A running private PostgreSQL cluster; stopped and deleted on drop.
pub struct TestPostgres {
    port: u16,
    bin_dir: PathBuf,
    user: ServerUser,
    // Declared last so that it is removed after `Drop::drop` stopped the server.
    dir: tempfile::TempDir,
}

impl fmt::Debug for TestPostgres {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TestPostgres")
            .field("port", &self.port)
            .field("dir", &self.dir.path())
            .field("bin_dir", &self.bin_dir)
            .finish()
    }
}

impl TestPostgres {
    /// Creates a cluster in a new temporary directory and starts its server
    /// on a free port of 127.0.0.1 and on a Unix socket in [`Self::socket_dir`].
    /// Returns once the server accepts connections.
    pub fn start() -> Result<TestPostgres> {
        let bin_dir = server_bin_dir().ok_or(TestPgError::NotInstalled)?;
        let user = ServerUser::detect()?;
        // Short prefix in /tmp: a Unix socket path must fit in 107 bytes.
        let dir = tempfile::Builder::new()
            .prefix("pipelens-pg-")
            .tempdir_in("/tmp")
            .map_err(io_err("create the cluster directory"))?;
        let sock = dir.path().join("sock");
        fs::create_dir(&sock).map_err(io_err("create the socket directory"))?;
        user.chown(dir.path())?;
        user.chown(&sock)?;

        let mut pg = TestPostgres {
            port: 0,
            bin_dir,
            user,
            dir,
        };
        pg.run(
            "initdb",
            [
                OsStr::new("-D"),
                pg.data_dir().as_os_str(),
                OsStr::new("-U"),
                OsStr::new(SUPERUSER),
                OsStr::new("-A"),
                OsStr::new("trust"),
                OsStr::new("-E"),
                OsStr::new("UTF8"),
                OsStr::new("--no-sync"),
            ],
        )?;

        // Another process may take the port between our probe and the
        // server's bind; a couple of retries make that race irrelevant.
        let mut last_err = None;
        for _ in 0..3 {
            pg.port = free_port()?;
            match pg.start_server() {
                Ok(()) => return Ok(pg),
                Err(e) => last_err = Some(e),
            }
        }
        Err(last_err.expect("at least one attempt"))
    }

    fn start_server(&self) -> Result<()> {
        let options = format!(
            "-p {port} -k {sock} -c listen_addresses=127.0.0.1 -c fsync=off \
             -c synchronous_commit=off -c full_page_writes=off -c max_connections=100",
            port = self.port,
            sock = self.socket_dir().display(),
        );
        self.run(
            "pg_ctl",
            [
                OsStr::new("-D"),
                self.data_dir().as_os_str(),
                OsStr::new("-l"),
                self.log_path().as_os_str(),
                OsStr::new("-o"),
                OsStr::new(&options),
                OsStr::new("-w"),
                OsStr::new("-t"),
                OsStr::new("60"),
                OsStr::new("start"),
            ],
        )
        .map(drop)
    }

    /// The TCP port the server listens on (127.0.0.1), also the number in
    /// the socket file name (`.s.PGSQL.<port>`).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The directory holding the server's Unix socket; usable as `host` in a
    /// connection string or as `psql -h`.
    pub fn socket_dir(&self) -> PathBuf {
        self.dir.path().join("sock")
    }

    /// The cluster's data directory (`PGDATA`).
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The server's log file.
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("server.log")
    }

    /// The server's log so far, for failure messages.
    pub fn log(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// A libpq key/value connection string over TCP:
    /// `host=127.0.0.1 port=P user=postgres dbname=postgres`.
    pub fn tcp_url(&self) -> String {
        self.tcp_url_for(DATABASE)
    }

    /// [`Self::tcp_url`] for another database of this cluster.
    pub fn tcp_url_for(&self, dbname: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user={SUPERUSER} dbname={dbname}",
            self.port
        )
    }

    /// A libpq key/value connection string over the Unix socket:
    /// `host=<socket dir> port=P user=postgres dbname=postgres`.
    pub fn unix_url(&self) -> String {
        self.unix_url_for(DATABASE)
    }

    /// [`Self::unix_url`] for another database of this cluster.
    pub fn unix_url_for(&self, dbname: &str) -> String {
        format!(
            "host={} port={} user={SUPERUSER} dbname={dbname}",
            self.socket_dir().display(),
            self.port
        )
    }

    /// Path of one of the server's programs (`psql`, `pgbench`, `pg_ctl`, …).
    /// Client programs can run as any user: authentication is `trust`.
    pub fn bin(&self, name: &str) -> PathBuf {
        self.bin_dir.join(name)
    }

    /// Runs `psql` over TCP against `dbname=postgres` with `-X -A -t
    /// -v ON_ERROR_STOP=1 -c SQL` and returns its standard output (unaligned,
    /// tuples only: `SELECT count(*) …` gives `"42\n"`).
    pub fn psql(&self, sql: &str) -> Result<String> {
        self.psql_in(DATABASE, sql)
    }

    /// [`Self::psql`] against another database.
    pub fn psql_in(&self, dbname: &str, sql: &str) -> Result<String> {
        let mut cmd = Command::new(self.bin("psql"));
        cmd.args(["-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1"])
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(["-U", SUPERUSER, "-d", dbname, "-c", sql]);
        let out = output(&mut cmd)?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Creates a database (`createdb`), for tests that want a clean schema.
    pub fn create_database(&self, dbname: &str) -> Result<()> {
        let mut cmd = Command::new(self.bin("createdb"));
        cmd.args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(["-U", SUPERUSER, dbname]);
        output(&mut cmd).map(drop)
    }

    /// Runs a server program (`name` in [`Self::bin`]) as the cluster's
    /// owner, in the cluster directory, and returns its output; a non-zero
    /// exit is an error carrying stdout, stderr and the server log.
    pub fn run<I, S>(&self, name: &str, args: I) -> Result<Output>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = self.user.command(&self.bin(name));
        cmd.args(args).current_dir(self.dir.path());
        output(&mut cmd).map_err(|e| match e {
            TestPgError::CommandFailed {
                command,
                status,
                output,
            } => TestPgError::CommandFailed {
                command,
                status,
                output: format!("{output}\n--- server log ---\n{}", self.log()),
            },
            other => other,
        })
    }
}

impl Drop for TestPostgres {
    fn drop(&mut self) {
        if self.port == 0 {
            return;
        }
        // Immediate: nothing in a test cluster is worth a checkpoint.
        let data = self.data_dir();
        let _ = self.run(
            "pg_ctl",
            [
                OsStr::new("-D"),
                data.as_os_str(),
                OsStr::new("-m"),
                OsStr::new("immediate"),
                OsStr::new("-w"),
                OsStr::new("stop"),
            ],
        );
    }
}

/// Runs a command with no input and collects its output; a failure to run
/// or a non-zero exit is an error.
fn output(cmd: &mut Command) -> Result<Output> {
    let command = format!("{cmd:?}");
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(io_err(format!("run {command}")))?;
    if out.status.success() {
        Ok(out)
    } else {
        Err(TestPgError::CommandFailed {
            command,
            status: out.status,
            output: format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        })
    }
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(io_err("bind a probe socket"))?;
    let port = listener
        .local_addr()
        .map_err(io_err("read the probe socket's address"))?
        .port();
    Ok(port)
}
