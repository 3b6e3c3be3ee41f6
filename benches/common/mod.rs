//! What the benchmarks share: their command lines, free ports, a mosquitto of their own, and
//! percentiles. Each bench is its own crate and uses a part of this, hence `dead_code` below.
//!
//! Invariants:
//! - Everything a bench starts (a broker, a temp dir) stops or goes with the value that holds
//!   it, so an interrupted bench leaves no process behind.
//! - A flag a bench does not know is an error, not ignored: a figure measured with a misspelt
//!   `--transactions` would be recorded as if it were the asked-for one.

#![allow(dead_code)]

use std::path::PathBuf;
use std::time::{Duration, Instant};

/// The bench's flags. `cargo bench` appends `--bench` to every bench's arguments; that one is
/// dropped here, the rest are the bench's own.
pub fn args<A: clap::Parser>() -> A {
    A::parse_from(std::env::args().filter(|a| a != "--bench"))
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn local(port: u16) -> std::net::SocketAddr {
    std::net::SocketAddr::from(([127, 0, 0, 1], port))
}

/// Waits until something accepts connections on `addr`.
pub fn wait_for_port(addr: std::net::SocketAddr, patience: Duration) {
    let deadline = Instant::now() + patience;
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "nothing listens on {addr}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A PostgreSQL server of the bench's own: the same one the integration tests start.
#[path = "../../tests/it/common/postgres.rs"]
pub mod postgres;

/// Where mosquitto is: on PATH, or in Debian's `/usr/sbin`, which a user's PATH often lacks.
pub fn mosquitto_program() -> PathBuf {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    dirs.extend(["/usr/sbin", "/usr/local/sbin", "/sbin"].map(PathBuf::from));
    dirs.into_iter()
        .map(|d| d.join("mosquitto"))
        .find(|p| p.is_file())
        .expect("mosquitto is installed (PATH or /usr/sbin)")
}

/// A mosquitto of the bench's own on a loopback port; killed when dropped.
pub struct Broker {
    child: std::process::Child,
    pub port: u16,
    dir: tempfile::TempDir,
}

impl Broker {
    /// Starts mosquitto on a free port with `settings` (lines of mosquitto.conf) after the
    /// listener, and waits until it accepts connections.
    pub fn start(settings: &str) -> Broker {
        let port = free_port();
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n{settings}"
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.path().join("mosquitto.log")).unwrap();
        let child = std::process::Command::new(mosquitto_program())
            .arg("-c")
            .arg(&conf)
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .expect("mosquitto starts");
        let broker = Broker { child, port, dir };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "mosquitto did not start:\n{}",
                broker.log_tail()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        broker
    }

    /// `/proc/{pid}/{file}` of the broker, for its CPU (`stat`) and memory (`status`).
    pub fn proc(&self, file: &str) -> PathBuf {
        PathBuf::from(format!("/proc/{}/{file}", self.child.id()))
    }

    /// The last lines mosquitto logged, for a failure message.
    pub fn log_tail(&self) -> String {
        let log =
            std::fs::read_to_string(self.dir.path().join("mosquitto.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The sample at quantile `q` (0..=1) of `samples`, sorting them in place; nearest rank.
pub fn quantile<T: PartialOrd + Copy>(samples: &mut [T], q: f64) -> T {
    samples.sort_by(|a, b| a.partial_cmp(b).expect("no NaN among the samples"));
    samples[((samples.len() - 1) as f64 * q).round() as usize]
}

/// The median of the runs (the upper one of an even count).
pub fn median(mut runs: Vec<f64>) -> f64 {
    runs.sort_by(f64::total_cmp);
    runs[runs.len() / 2]
}
