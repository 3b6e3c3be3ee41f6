//! A real PostgreSQL server for a test: Debian's package (`postgresql`), a fresh cluster in a
//! temporary directory on a free port, trust authentication on 127.0.0.1 only, stopped on
//! drop. As root, the server runs as the `postgres` user (it refuses to run as root).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{free_port, local, wait_for_port};

/// Where Debian puts the server binaries: `/usr/lib/postgresql/{major}/bin`, newest first.
fn server_bin(program: &str) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .collect();
    dirs.sort();
    dirs.into_iter()
        .rev()
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

/// Whether the server is installed; like [`super::require_external`] otherwise.
pub fn require_postgres(test: &str) -> bool {
    if server_bin("postgres").is_some() && server_bin("initdb").is_some() {
        return true;
    }
    if std::env::var("STORELINK_REQUIRE_EXTERNAL").as_deref() == Ok("1") {
        panic!(
            "{test}: PostgreSQL (Debian's postgresql) is required (STORELINK_REQUIRE_EXTERNAL=1) but not installed"
        );
    }
    eprintln!(
        "\n!!!!!!!! SKIPPED {test}: PostgreSQL is not installed; .ci/run installs it !!!!!!!!\n"
    );
    false
}

pub struct Postgres {
    pub port: u16,
    child: Child,
    _dir: tempfile::TempDir,
}

/// The ids to run the server as: the `postgres` user's when we are root.
fn run_as() -> Option<(u32, u32)> {
    let id = |args: &[&str]| -> u32 {
        let out = Command::new("id").args(args).output().expect("id runs");
        assert!(out.status.success(), "id {args:?} failed");
        String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
    };
    if id(&["-u"]) != 0 {
        return None;
    }
    Some((id(&["-u", "postgres"]), id(&["-g", "postgres"])))
}

fn command(program: &str, ids: Option<(u32, u32)>) -> Command {
    use std::os::unix::process::CommandExt;
    let mut c = Command::new(server_bin(program).expect("PostgreSQL is installed"));
    if let Some((uid, gid)) = ids {
        c.uid(uid).gid(gid);
    }
    c
}

impl Postgres {
    /// A new cluster with a superuser `bi` and a database `bi`.
    pub fn start() -> Postgres {
        Self::start_with(None)
    }

    /// The same, serving TLS as well with this server certificate and key (PEM; for
    /// 127.0.0.1).
    pub fn start_tls(cert_pem: &str, key_pem: &str) -> Postgres {
        Self::start_with(Some((cert_pem, key_pem)))
    }

    fn start_with(tls: Option<(&str, &str)>) -> Postgres {
        let dir = tempfile::tempdir().unwrap();
        let ids = run_as();
        if let Some((uid, gid)) = ids {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).unwrap();
        }
        let data = dir.path().join("data");
        let out = command("initdb", ids)
            .arg("-D")
            .arg(&data)
            .args(["-U", "bi", "--auth=trust", "-E", "UTF8", "--locale=C"])
            .stdout(Stdio::null())
            .output()
            .expect("initdb runs");
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut settings = Vec::new();
        if let Some((cert_pem, key_pem)) = tls {
            use std::os::unix::fs::PermissionsExt;
            // PostgreSQL refuses a key that others can read, or that another user owns.
            for (name, pem, mode) in [
                ("server.crt", cert_pem, 0o644),
                ("server.key", key_pem, 0o600),
            ] {
                let path = data.join(name);
                std::fs::write(&path, pem).unwrap();
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
                if let Some((uid, gid)) = ids {
                    std::os::unix::fs::chown(&path, Some(uid), Some(gid)).unwrap();
                }
            }
            settings = vec![
                "ssl=on".to_string(),
                format!("ssl_cert_file={}", data.join("server.crt").display()),
                format!("ssl_key_file={}", data.join("server.key").display()),
            ];
        }
        let port = free_port();
        let child = Self::spawn(dir.path(), &data, port, ids, &settings);
        let pg = Postgres {
            port,
            child,
            _dir: dir,
        };
        pg.wait_ready();
        let out = command("createdb", ids)
            .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "bi", "bi"])
            .output()
            .expect("createdb runs");
        assert!(
            out.status.success(),
            "createdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        pg
    }

    fn spawn(
        dir: &Path,
        data: &Path,
        port: u16,
        ids: Option<(u32, u32)>,
        settings: &[String],
    ) -> Child {
        let mut c = command("postgres", ids);
        for setting in settings {
            c.arg("-c").arg(setting);
        }
        let child = c
            .arg("-D")
            .arg(data)
            .args(["-p", &port.to_string(), "-c", "listen_addresses=127.0.0.1"])
            .arg("-k")
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("postgres starts");
        wait_for_port(local(port), Duration::from_secs(30));
        child
    }

    /// The port answers before the server takes connections: wait until it does.
    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let out = command("pg_isready", None)
                .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
                .output()
                .expect("pg_isready runs");
            if out.status.success() {
                return;
            }
            assert!(Instant::now() < deadline, "PostgreSQL did not become ready");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The connection string for the bridge's config.
    pub fn url(&self) -> String {
        format!("host=127.0.0.1 port={} user=bi dbname=bi", self.port)
    }

    /// A client for the test's own queries.
    pub async fn client(&self) -> tokio_postgres::Client {
        let (client, connection) = tokio_postgres::connect(&self.url(), tokio_postgres::NoTls)
            .await
            .expect("connects to the test's PostgreSQL");
        tokio::spawn(connection);
        client
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        // SIGINT: PostgreSQL's fast shutdown.
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGINT,
        );
        let _ = self.child.wait();
    }
}
