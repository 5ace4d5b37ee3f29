//! A PostgreSQL cluster of a test's own, for tests that restart or stop PostgreSQL: doing
//! that to the shared server would break every test running beside them.
//!
//! The cluster lives in a fresh temporary directory (data, unix socket, server log) that is
//! removed with it. It trades durability for speed (`fsync=off`): nothing in it outlives the
//! test anyway. It runs with `wal_level = logical`, for the tests of change capture.

use std::{
    path::{Path, PathBuf},
    process::Output,
    sync::OnceLock,
    time::Duration,
};

use anyhow::{Context, Result};
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use uuid::Uuid;

use crate::{scaled, wait_port};

/// How long initdb, a start or a restart may take before the test fails (scaled).
const SERVER_DEADLINE: Duration = Duration::from_secs(120);

pub struct PgServer {
    port: u16,
    /// The temporary directory: `data/`, the unix socket and `postgres.log`.
    dir: PathBuf,
    bin: PathBuf,
}

impl PgServer {
    /// Creates a cluster listening on 127.0.0.1:`port` only (trust auth, superuser
    /// `postgres`) and returns once it accepts TCP connections. Panics, with the server log,
    /// if it cannot.
    pub async fn start(port: u16) -> PgServer {
        let dir = std::env::temp_dir().join(format!(
            "stalewatch-pg-{}",
            // Short: the socket path inside must stay under the ~107-byte unix limit.
            &Uuid::new_v4().simple().to_string()[..12]
        ));
        std::fs::create_dir(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
        // From here on Drop cleans up, whatever fails below.
        let server = PgServer {
            port,
            dir,
            bin: bin_dir(),
        };
        if running_as_root() {
            // initdb and postgres refuse to run as root; they run as `postgres`, which must
            // own the directory.
            let status = std::process::Command::new("chown")
                .args(["postgres:postgres"])
                .arg(&server.dir)
                .status()
                .expect("running chown");
            assert!(status.success(), "chown postgres {}", server.dir.display());
        }

        let data = server.data_dir();
        server
            .run(
                "initdb",
                &[
                    "-D",
                    path_str(&data),
                    "-U",
                    "postgres",
                    "--auth=trust",
                    "--encoding=UTF8",
                    "--locale=C",
                    // No fsync of the new files: the cluster is thrown away with the test.
                    "--no-sync",
                ],
            )
            .await;
        // In postgresql.conf rather than on pg_ctl's command line, so a restart keeps them.
        let settings = format!(
            "\n# stalewatch-testkit\n\
             listen_addresses = '127.0.0.1'\n\
             port = {port}\n\
             unix_socket_directories = '{}'\n\
             fsync = off\n\
             full_page_writes = off\n\
             wal_level = logical\n",
            server.dir.display()
        );
        let conf = data.join("postgresql.conf");
        let mut text = std::fs::read_to_string(&conf).expect("reading postgresql.conf");
        text.push_str(&settings);
        std::fs::write(&conf, text).expect("writing postgresql.conf");

        let log = server.log_path();
        let wait = deadline_secs();
        server
            .run(
                "pg_ctl",
                &[
                    "start",
                    "-D",
                    path_str(&data),
                    "-l",
                    path_str(&log),
                    "-w",
                    "-t",
                    &wait,
                ],
            )
            .await;
        wait_port(port).await;
        server
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The URL of database `db` on this server.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// A fast shutdown (every session is ended, as in a real restart) and a start; returns
    /// once the server accepts TCP connections again.
    pub async fn restart(&self) {
        let (data, log) = (self.data_dir(), self.log_path());
        let wait = deadline_secs();
        self.run(
            "pg_ctl",
            &[
                "restart",
                "-D",
                path_str(&data),
                "-l",
                path_str(&log),
                "-m",
                "fast",
                "-w",
                "-t",
                &wait,
            ],
        )
        .await;
        wait_port(self.port).await;
    }

    /// A fast shutdown, waiting until the server is gone. Stopping a stopped server is a
    /// no-op.
    pub fn stop(&self) {
        if !self.data_dir().join("postmaster.pid").exists() {
            return;
        }
        let out = self.command("pg_ctl", &self.stop_args("fast")).output();
        match out {
            Ok(out) if out.status.success() => {}
            Ok(out) => panic!("pg_ctl stop failed:\n{}", self.report(&out)),
            Err(e) => panic!("running pg_ctl stop: {e}"),
        }
    }

    /// Turns TLS on (`ssl = on`) with this certificate chain and key, and restarts. Plain
    /// connections stay allowed: the client decides, with `sslmode`.
    pub async fn use_tls(&self, cert_pem: &str, key_pem: &str) {
        let data = self.data_dir();
        for (name, text) in [("server.crt", cert_pem), ("server.key", key_pem)] {
            let path = data.join(name);
            std::fs::write(&path, text).unwrap_or_else(|e| panic!("writing {name}: {e}"));
            // PostgreSQL refuses a key that others may read.
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
                .expect("chmod 600");
            if running_as_root() {
                let status = std::process::Command::new("chown")
                    .arg("postgres:postgres")
                    .arg(&path)
                    .status()
                    .expect("running chown");
                assert!(status.success(), "chown postgres {}", path.display());
            }
        }
        let conf = data.join("postgresql.conf");
        let mut text = std::fs::read_to_string(&conf).expect("reading postgresql.conf");
        text.push_str("ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n");
        std::fs::write(&conf, text).expect("writing postgresql.conf");
        self.restart().await;
    }

    /// Creates database `name` with every migration applied; returns its URL.
    pub async fn create_database(&self, name: &str) -> Result<String> {
        let admin_url = self.url("postgres");
        let mut conn = AsyncPgConnection::establish(&admin_url)
            .await
            .with_context(|| format!("connecting to {admin_url}"))?;
        diesel::sql_query(format!("CREATE DATABASE \"{}\"", name.replace('"', "\"\"")))
            .execute(&mut conn)
            .await
            .with_context(|| format!("creating database {name}"))?;
        let url = self.url(name);
        stalewatch_core::db::migrate(&url)
            .await
            .with_context(|| format!("migrating {url}"))?;
        Ok(url)
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("postgres.log")
    }

    fn stop_args(&self, mode: &str) -> Vec<String> {
        ["stop", "-D", path_str(&self.data_dir()), "-m", mode, "-w"]
            .into_iter()
            .map(String::from)
            .chain(["-t".to_string(), deadline_secs()])
            .collect()
    }

    /// `program` from the PostgreSQL bin directory, as `postgres` when we are root.
    fn command<S: AsRef<std::ffi::OsStr>>(
        &self,
        program: &str,
        args: &[S],
    ) -> std::process::Command {
        let exe = self.bin.join(program);
        let mut cmd = if running_as_root() {
            let mut c = std::process::Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(exe);
            c
        } else {
            std::process::Command::new(exe)
        };
        // The test's working directory may be one `postgres` cannot read.
        cmd.args(args).current_dir(&self.dir);
        cmd
    }

    /// Runs a PostgreSQL tool to completion; panics with its output and the server log if
    /// it fails or outlives the deadline.
    async fn run(&self, program: &str, args: &[&str]) {
        let mut cmd = tokio::process::Command::from(self.command(program, args));
        cmd.kill_on_drop(true);
        let what = format!("{program} {}", args.join(" "));
        match tokio::time::timeout(scaled(SERVER_DEADLINE), cmd.output()).await {
            Ok(Ok(out)) if out.status.success() => {}
            Ok(Ok(out)) => panic!("{what} failed:\n{}", self.report(&out)),
            Ok(Err(e)) => panic!("running {what}: {e}"),
            Err(_) => panic!(
                "{what} still running after {:?}\n--- server log:\n{}",
                scaled(SERVER_DEADLINE),
                self.log()
            ),
        }
    }

    fn report(&self, out: &Output) -> String {
        format!(
            "{}\n--- stdout:\n{}\n--- stderr:\n{}\n--- server log ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.log_path().display(),
            self.log()
        )
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- log of the test's PostgreSQL ({}):\n{}",
                self.log_path().display(),
                self.log()
            );
        }
        if self.data_dir().join("postmaster.pid").exists() {
            // Immediate: nothing in the cluster is worth a clean shutdown.
            let _ = self
                .command("pg_ctl", &self.stop_args("immediate"))
                .output();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The bin directory of the newest PostgreSQL under /usr/lib/postgresql (Debian's layout).
fn bin_dir() -> PathBuf {
    let root = Path::new("/usr/lib/postgresql");
    std::fs::read_dir(root)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("pg_ctl").exists().then_some((version, bin))
        })
        .max_by_key(|(version, _)| *version)
        .map(|(_, bin)| bin)
        .unwrap_or_else(|| {
            panic!(
                "no PostgreSQL server binaries under {}/<version>/bin",
                root.display()
            )
        })
}

fn running_as_root() -> bool {
    static ROOT: OnceLock<bool> = OnceLock::new();
    *ROOT.get_or_init(|| {
        let out = std::process::Command::new("id")
            .arg("-u")
            .output()
            .expect("running id -u");
        String::from_utf8_lossy(&out.stdout).trim() == "0"
    })
}

fn deadline_secs() -> String {
    scaled(SERVER_DEADLINE).as_secs().max(1).to_string()
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("a UTF-8 temporary path")
}

#[cfg(test)]
mod tests {
    use super::*;
    use diesel::{sql_types::Integer, QueryableByName};

    #[derive(QueryableByName)]
    struct One {
        #[diesel(sql_type = Integer)]
        n: i32,
    }

    async fn select_one(url: &str) -> i32 {
        let mut conn = AsyncPgConnection::establish(url).await.unwrap();
        let row: One = diesel::sql_query("SELECT 1 AS n")
            .get_result(&mut conn)
            .await
            .unwrap();
        row.n
    }

    #[tokio::test]
    async fn starts_restarts_stops_and_cleans_up() {
        let pg = PgServer::start(crate::free_port()).await;
        let url = pg.create_database("sw_pg_server_test").await.unwrap();
        assert_eq!(select_one(&url).await, 1);

        // A session open across the restart is ended by it, as with a real server.
        let mut held = AsyncPgConnection::establish(&url).await.unwrap();
        pg.restart().await;
        assert!(diesel::sql_query("SELECT 1")
            .execute(&mut held)
            .await
            .is_err());
        assert_eq!(select_one(&url).await, 1, "new sessions after the restart");

        pg.stop();
        pg.stop(); // a no-op the second time
        assert!(AsyncPgConnection::establish(&url).await.is_err());
        let dir = pg.dir.clone();
        drop(pg);
        assert!(!dir.exists(), "{} left behind", dir.display());
    }
}
