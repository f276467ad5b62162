//! A real, throwaway PostgreSQL server for the feedback-service tests (and `benches/serve.rs`):
//! tests/it/serve.rs starts one per run of the test binary, on first use, with one new database
//! per test (`createdb`) so tests stay independent. This file depends on nothing else in the
//! test crate so the benchmark can include it.
//!
//! It is Debian's `postgresql` (scripts/install-test-deps.sh installs it): `initdb` makes a
//! data directory in a temporary folder, `pg_ctl` starts the server on a free loopback port
//! with Unix sockets off. `initdb` refuses to run as root, so as root every server command runs
//! as the `postgres` user (`runuser -u postgres --`, the data directory chowned to it).
//!
//! Nothing drops a `static`, so the server is stopped by a guard process instead: a shell that
//! waits for EOF on a pipe whose write end only this process holds, then stops the server
//! (`pg_ctl stop -m immediate`) and removes the data directory. However the test binary ends,
//! the pipe closes and the server goes.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{ChildStdin, Command, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

/// The role the tests connect as over TCP, with a password (SCRAM), as a deployment would.
pub const ROLE: &str = "rlhf";
pub const PASSWORD: &str = "pg-test-password-0001";

pub struct PgServer {
    bin: PathBuf,
    port: u16,
    /// Runs server commands as the `postgres` user when the tests run as root.
    as_postgres: bool,
    /// Closing it (at exit) tells the guard process to stop the server.
    _guard: Mutex<ChildStdin>,
}

static DATABASES: AtomicUsize = AtomicUsize::new(0);

/// Where the server binaries are: `RLHF_PG_BIN`, else the newest `/usr/lib/postgresql/*/bin`.
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("RLHF_PG_BIN") {
        return PathBuf::from(dir);
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| Some((e.file_name().to_str()?.parse().ok()?, e.path().join("bin"))))
        .collect();
    versions.sort();
    versions
        .pop()
        .map_or_else(|| PathBuf::from("/usr/lib/postgresql/15/bin"), |(_, p)| p)
}

impl PgServer {
    fn command(&self, tool: &str) -> Command {
        command(&self.bin, self.as_postgres, tool)
    }

    /// Makes a data directory and starts a server from the binaries in `bin` (see [`bin_dir`]).
    pub fn start(bin: PathBuf) -> PgServer {
        let as_postgres = std::fs::metadata("/proc/self").map_or(0, |m| m.uid()) == 0;
        let data = tempfile::Builder::new()
            .prefix("rlhf-test-pg-")
            .tempdir()
            .expect("a temporary directory")
            .keep();
        if as_postgres {
            let chowned = Command::new("chown")
                .args(["postgres:postgres"])
                .arg(&data)
                .status()
                .expect("chown");
            assert!(
                chowned.success(),
                "the tests run as root and need a `postgres` user to run initdb (it refuses root)\nhint: apt-get install postgresql creates it"
            );
        }
        let password_file = data.with_extension("password");
        std::fs::write(&password_file, PASSWORD).expect("the password file");
        let out = command(&bin, as_postgres, "initdb")
            .arg("-D")
            .arg(&data)
            .arg(format!("--pwfile={}", password_file.display()))
            .args([
                "-U",
                ROLE,
                "--auth=scram-sha-256",
                "-E",
                "UTF8",
                "--no-sync",
            ])
            .output()
            .expect("initdb");
        let _ = std::fs::remove_file(&password_file);
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free loopback port")
            .port();
        // fsync off: the tests kill the service, never this server, so what they check (an
        // acknowledged write was committed) does not depend on it; it spares the shared disk.
        let settings = format!(
            "\nlisten_addresses = '127.0.0.1'\nport = {port}\nunix_socket_directories = ''\nmax_connections = 300\nfsync = off\n"
        );
        append(&data.join("postgresql.conf"), &settings);
        // Never waited for: it outlives this process by design (it acts when we are gone).
        #[allow(clippy::zombie_processes)]
        let guard = Command::new("sh")
            .args([
                "-c",
                r#"cat >/dev/null; "$@" -D "$DATA" -m immediate stop >/dev/null 2>&1; rm -rf "$DATA""#,
                "pg-guard",
            ])
            .args(prefix(as_postgres))
            .arg(bin.join("pg_ctl"))
            .env("DATA", &data)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("the guard process");
        let server = PgServer {
            bin: bin.clone(),
            port,
            as_postgres,
            _guard: Mutex::new(guard.stdin.expect("the guard's stdin")),
        };
        let out = server
            .command("pg_ctl")
            .arg("-D")
            .arg(&data)
            .arg("-l")
            .arg(data.join("server.log"))
            .args(["-w", "-t", "60", "start"])
            .output()
            .expect("pg_ctl start");
        assert!(
            out.status.success(),
            "pg_ctl start failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(data.join("server.log")).unwrap_or_default()
        );
        server
    }

    /// A new, empty database on the shared server: its URL for `server.database`.
    pub fn fresh_database(&self) -> String {
        let name = format!("feedback_{}", DATABASES.fetch_add(1, Ordering::Relaxed) + 1);
        let out = self
            .command("createdb")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", ROLE])
            .arg(&name)
            .output()
            .expect("createdb");
        assert!(
            out.status.success(),
            "createdb {name} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        format!(
            "postgres://{ROLE}:{PASSWORD}@127.0.0.1:{}/{name}",
            self.port
        )
    }

    /// Runs one SQL statement with psql on the database of `url`; its rows, `|`-separated.
    pub fn query(&self, url: &str, sql: &str) -> String {
        let out = self
            .command("psql")
            .args(["-X", "-At", "-v", "ON_ERROR_STOP=1", "-d", url, "-c", sql])
            .output()
            .expect("psql");
        assert!(
            out.status.success(),
            "psql failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }
}

fn prefix(as_postgres: bool) -> &'static [&'static str] {
    if as_postgres {
        &["runuser", "-u", "postgres", "--"]
    } else {
        &[]
    }
}

fn command(bin: &Path, as_postgres: bool, tool: &str) -> Command {
    let tool = bin.join(tool);
    let mut cmd = match prefix(as_postgres) {
        [runner, args @ ..] => {
            let mut cmd = Command::new(runner);
            cmd.args(args).arg(tool);
            cmd
        }
        [] => Command::new(tool),
    };
    // The `postgres` user may not be allowed into the test's working directory.
    cmd.current_dir("/").env("PGPASSWORD", PASSWORD);
    cmd
}

fn append(path: &Path, text: &str) {
    use std::io::Write as _;
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(path)
        .expect("postgresql.conf");
    file.write_all(text.as_bytes()).expect("postgresql.conf");
}
