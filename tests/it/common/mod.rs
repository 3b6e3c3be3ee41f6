//! Shared test fixtures: real brokers, a collecting subscriber ("central"), configs, and the
//! rule for tests that need an external program.
#![allow(dead_code)]

pub mod contract;
pub mod https;
pub mod net;
pub mod postgres;
pub mod powercut;
pub mod process;
pub mod register;

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

/// An HTTP client for the local API (reqwest needs the rustls provider installed first).
pub async fn get(url: impl reqwest::IntoUrl) -> reqwest::Result<reqwest::Response> {
    storelink::install_crypto_provider();
    reqwest::get(url).await
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Starts an in-process rumqttd on a free port.
pub fn start_rumqttd() -> SocketAddr {
    let addr = local(free_port());
    storelink::demo::start_broker(addr).expect("rumqttd starts");
    addr
}

/// Whether an external program is available. Without it, a test prints a loud skip line and
/// returns early; with `STORELINK_REQUIRE_EXTERNAL=1` (set by `.ci/run`) it fails instead.
pub fn require_external(program: &str, test: &str) -> bool {
    if find_program(program).is_some() {
        return true;
    }
    if std::env::var("STORELINK_REQUIRE_EXTERNAL").as_deref() == Ok("1") {
        panic!("{test}: `{program}` is required (STORELINK_REQUIRE_EXTERNAL=1) but not on PATH");
    }
    eprintln!(
        "\n!!!!!!!! SKIPPED {test}: `{program}` is not installed; .ci/run installs it !!!!!!!!\n"
    );
    false
}

/// Finds a program on PATH or in the sbin directories, where Debian puts mosquitto.
pub fn find_program(program: &str) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    dirs.extend(["/usr/sbin", "/usr/local/sbin", "/sbin"].map(PathBuf::from));
    dirs.into_iter()
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

/// A mosquitto broker on a free port, killed on drop.
pub struct Mosquitto {
    pub addr: SocketAddr,
    child: Child,
    conf: PathBuf,
    _dir: tempfile::TempDir,
}

impl Mosquitto {
    pub fn start() -> Mosquitto {
        Self::start_on(free_port())
    }

    pub fn start_on(port: u16) -> Mosquitto {
        Self::start_with(port, "persistence false\n")
    }

    /// A broker that keeps sessions and queued messages across a graceful restart.
    pub fn start_persistent() -> Mosquitto {
        Self::start_with(free_port(), "persistence true\n")
    }

    fn start_with(port: u16, extra: &str) -> Mosquitto {
        let dir = tempfile::tempdir().unwrap();
        // Started as root, mosquitto drops to its own user, which must be able to write its
        // persistence file here; otherwise it saves nothing and says so only in its log.
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o777),
        )
        .unwrap();
        let conf = dir.path().join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "listener {port} 127.0.0.1\nallow_anonymous true\nmax_inflight_messages 0\nmax_queued_messages 0\npersistence_location {}/\n{extra}",
                dir.path().display()
            ),
        )
        .unwrap();
        let addr = local(port);
        let child = Self::spawn(&conf, addr);
        Mosquitto {
            addr,
            child,
            conf,
            _dir: dir,
        }
    }

    fn spawn(conf: &Path, addr: SocketAddr) -> Child {
        let child = Command::new(find_program("mosquitto").expect("mosquitto is installed"))
            .arg("-c")
            .arg(conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("mosquitto starts");
        wait_for_port(addr, Duration::from_secs(10));
        child
    }

    /// Stops the broker gracefully (SIGTERM: a persistent one saves its state) and starts it
    /// again on the same port.
    pub fn restart(mut self) -> Mosquitto {
        use nix::sys::signal::{Signal, kill};
        use nix::unistd::Pid;
        let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM);
        let _ = self.child.wait();
        let conf = std::fs::read_to_string(&self.conf).unwrap_or_default();
        if conf.contains("persistence true") {
            assert!(
                self._dir.path().join("mosquitto.db").exists(),
                "mosquitto saved no persistence file on SIGTERM; the restart would lose its sessions"
            );
        }
        let mut tries = 0;
        loop {
            // The port may linger for a moment after the old process exits.
            let attempt = std::panic::catch_unwind(|| Self::spawn(&self.conf, self.addr));
            match attempt {
                Ok(child) => {
                    self.child = child;
                    return self;
                }
                Err(_) if tries < 20 => {
                    tries += 1;
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => std::panic::resume_unwind(e),
            }
        }
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn wait_for_port(addr: SocketAddr, patience: Duration) {
    let deadline = Instant::now() + patience;
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "nothing listens on {addr}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One message as central received it.
#[derive(Debug, Clone)]
pub struct Received {
    pub topic: String,
    pub retain: bool,
    pub event: Value,
}

/// Plays central: subscribes to everything and keeps what arrives. Reconnects on its own, so it
/// can be started before the broker.
pub struct Central {
    received: Arc<Mutex<Vec<Received>>>,
    token: CancellationToken,
}

impl Central {
    /// A subscriber under a fresh client id. Its session is kept (clean_session false): on a
    /// loaded machine, with tens of thousands of events schema-checked in a debug build, its
    /// connection can drop and come back, and a clean session would lose what the broker held
    /// for it then, which the test would take for the agent's loss.
    pub async fn subscribe(broker: SocketAddr, filter: &str) -> Central {
        Self::subscribe_as(broker, filter, &format!("central-{}", rand_suffix()), false).await
    }

    /// A subscriber with a persistent session: the broker queues what arrives while it is away.
    pub async fn subscribe_persistent(
        broker: SocketAddr,
        filter: &str,
        client_id: &str,
    ) -> Central {
        Self::subscribe_as(broker, filter, client_id, false).await
    }

    async fn subscribe_as(
        broker: SocketAddr,
        filter: &str,
        client_id: &str,
        clean_session: bool,
    ) -> Central {
        let received = Arc::new(Mutex::new(Vec::new()));
        let token = CancellationToken::new();
        let mut options = MqttOptions::new(client_id, broker.ip().to_string(), broker.port());
        options.set_clean_session(clean_session);
        options.set_max_packet_size(8 << 20, 8 << 20);
        // Long enough that a subscriber starved of CPU for a few seconds is not dropped.
        options.set_keep_alive(Duration::from_secs(30));
        let (client, mut eventloop) = AsyncClient::new(options, 1000);
        let (subscribed_tx, subscribed_rx) = tokio::sync::oneshot::channel::<()>();
        let mut subscribed_tx = Some(subscribed_tx);
        let filter = filter.to_string();
        let sink = received.clone();
        let stop = token.clone();
        tokio::spawn(async move {
            loop {
                let event = tokio::select! {
                    e = eventloop.poll() => e,
                    _ = stop.cancelled() => return,
                };
                match event {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        let _ = client.subscribe(filter.clone(), QoS::AtLeastOnce).await;
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        if let Some(tx) = subscribed_tx.take() {
                            let _ = tx.send(());
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let event = serde_json::from_slice(&p.payload).unwrap_or(Value::Null);
                        // Every event central receives must match docs/schemas/. Checked under
                        // the lock: a violation panics this task and poisons `received`, so the
                        // test also fails at its next look at what central received.
                        let mut received = sink.lock().unwrap();
                        contract::check(&event);
                        received.push(Received {
                            topic: p.topic.clone(),
                            retain: p.retain,
                            event,
                        });
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        // Wait for the subscription when the broker is up; carry on when it is not.
        let _ = tokio::time::timeout(Duration::from_secs(2), subscribed_rx).await;
        Central { received, token }
    }

    pub fn all(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }

    /// Events of one CloudEvent type, in arrival order.
    pub fn of_type(&self, kind: &str) -> Vec<Value> {
        self.all()
            .into_iter()
            .filter(|r| r.event["type"] == kind)
            .map(|r| r.event)
            .collect()
    }

    /// Distinct ids of one type, with how often each arrived.
    pub fn ids(&self, kind: &str) -> BTreeMap<String, usize> {
        let mut ids = BTreeMap::new();
        for e in self.of_type(kind) {
            *ids.entry(e["id"].as_str().unwrap_or("").to_string())
                .or_default() += 1;
        }
        ids
    }

    /// Waits until `n` distinct ids of `kind` arrived; panics with what did arrive otherwise.
    pub async fn wait_for_ids(&self, kind: &str, n: usize, patience: Duration) {
        let deadline = tokio::time::Instant::now() + patience;
        loop {
            let got = self.ids(kind).len();
            if got >= n {
                return;
            }
            if tokio::time::Instant::now() > deadline {
                panic!("waited {patience:?} for {n} distinct {kind} events; got {got}");
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

impl Drop for Central {
    fn drop(&mut self) {
        self.token.cancel();
    }
}

fn rand_suffix() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(Instant::now())
}

/// A config for one agent in tests: one jsonl tcp-listen register per entry of `registers`.
pub fn config_text(
    storage: &Path,
    broker: SocketAddr,
    api_port: u16,
    registers: &[(&str, u16)],
) -> String {
    let mut text = format!(
        r#"
[store]
id = "s042"
tenant = "acme"
timezone = "Europe/Berlin"
currency = "EUR"

[storage]
path = "{}"

[central.mqtt]
url = "mqtt://{broker}"
keep_alive_s = 5

[cashier]
bind = "127.0.0.1:{api_port}"
"#,
        storage.display()
    );
    for (name, port) in registers {
        text.push_str(&format!(
            "\n[[registers]]\nname = \"{name}\"\nlane = \"{}\"\nformat = \"jsonl\"\ntransport = {{ kind = \"tcp-listen\", bind = \"127.0.0.1:{port}\" }}\n",
            name.trim_start_matches("lane-")
        ));
    }
    text
}

pub fn config(
    storage: &Path,
    broker: SocketAddr,
    api_port: u16,
    registers: &[(&str, u16)],
) -> storelink::config::Config {
    let text = config_text(storage, broker, api_port, registers);
    storelink::config::Config::parse(&text, "test.toml", &std::collections::HashMap::new()).unwrap()
}

/// The built `storelink` binary.
pub fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_storelink"))
}

/// Polls `count` until it reaches `target`, for as long as it keeps growing: fails when it has
/// not moved for `stall`, or after `limit` in all. A loss shows as a stall; a subscriber slowed
/// by a loaded machine (schema checks on every event, in a debug build, beside other tests in
/// this binary) still counts up, and is not mistaken for one.
pub async fn until_all_arrive(
    what: &str,
    target: usize,
    stall: Duration,
    limit: Duration,
    mut count: impl FnMut() -> usize,
) {
    let started = tokio::time::Instant::now();
    let (mut last, mut moved) = (0, started);
    loop {
        let n = count();
        if n >= target {
            return;
        }
        if n > last {
            (last, moved) = (n, tokio::time::Instant::now());
        }
        assert!(
            moved.elapsed() < stall,
            "{what}: stalled at {n} of {target} for {stall:?}"
        );
        assert!(
            started.elapsed() < limit,
            "{what}: {n} of {target} after {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Polls `f` until it returns true.
pub async fn eventually(what: &str, patience: Duration, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + patience;
    while !f() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A TCP proxy between the agent and a broker, so a test decides when "the broker" is
/// reachable from the agent's side: closed (connections refused), open (bytes forwarded), and
/// `cut` (every live connection dropped at once).
pub struct Proxy {
    pub addr: SocketAddr,
    upstream: SocketAddr,
    state: Arc<Mutex<ProxyState>>,
    /// The port, bound but not listening (so connections are refused) until `open`. Holding
    /// it keeps another test from taking the port in between.
    reserved: Mutex<Option<tokio::net::TcpSocket>>,
}

#[derive(Default)]
struct ProxyState {
    listener: Option<tokio::task::JoinHandle<()>>,
    connections: Vec<tokio::task::JoinHandle<()>>,
}

impl Proxy {
    /// A closed proxy on a free port in front of `upstream`.
    pub fn new(upstream: SocketAddr) -> Proxy {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_reuseaddr(true).unwrap();
        socket.bind(local(0)).unwrap();
        Proxy {
            addr: socket.local_addr().unwrap(),
            upstream,
            state: Arc::default(),
            reserved: Mutex::new(Some(socket)),
        }
    }

    /// Starts accepting and forwarding.
    pub async fn open(&self) {
        let reserved = self.reserved.lock().unwrap().take();
        let socket = match reserved {
            Some(s) => s,
            // Re-opened after `close`: the port was released; take it again, waiting out a
            // connection that may hold it for a moment.
            None => {
                let mut tries = 0;
                loop {
                    let s = tokio::net::TcpSocket::new_v4().unwrap();
                    s.set_reuseaddr(true).unwrap();
                    match s.bind(self.addr) {
                        Ok(()) => break s,
                        Err(_) if tries < 100 => {
                            tries += 1;
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                        Err(e) => panic!("proxy cannot take {} again: {e}", self.addr),
                    }
                }
            }
        };
        let listener = socket.listen(1024).unwrap();
        let upstream = self.upstream;
        let state = self.state.clone();
        let handle = tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    return;
                };
                let conn = tokio::spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                state.lock().unwrap().connections.push(conn);
            }
        });
        self.state.lock().unwrap().listener = Some(handle);
    }

    /// Drops every live connection; the proxy keeps accepting new ones.
    pub fn cut(&self) {
        for c in self.state.lock().unwrap().connections.drain(..) {
            c.abort();
        }
    }

    /// Stops accepting and drops every live connection.
    pub fn close(&self) {
        let mut state = self.state.lock().unwrap();
        if let Some(l) = state.listener.take() {
            l.abort();
        }
        for c in state.connections.drain(..) {
            c.abort();
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.close();
    }
}

/// An agent running in the test process with jsonl registers on free ports.
pub struct TestAgent {
    pub agent: storelink::daemon::Agent,
    pub token: CancellationToken,
    /// Register name → its tcp-listen address.
    pub registers: Vec<(String, SocketAddr)>,
    pub dir: tempfile::TempDir,
}

impl TestAgent {
    pub async fn start(broker: SocketAddr, registers: &[&str]) -> TestAgent {
        Self::start_with(broker, registers, "").await
    }

    /// Like [`TestAgent::start`], with more config appended (more `[[registers]]`, say).
    pub async fn start_with(broker: SocketAddr, registers: &[&str], extra: &str) -> TestAgent {
        let dir = tempfile::tempdir().unwrap();
        Self::start_in(dir, broker, registers, extra).await
    }

    /// Starts an agent on an existing storage directory (a restart).
    pub async fn start_in(
        dir: tempfile::TempDir,
        broker: SocketAddr,
        registers: &[&str],
        extra: &str,
    ) -> TestAgent {
        let ports: Vec<(&str, u16)> = registers.iter().map(|r| (*r, free_port())).collect();
        let text = config_text(dir.path(), broker, free_port(), &ports) + extra;
        Self::from_text(
            dir,
            &ports,
            &text,
            &std::collections::HashMap::new(),
            storelink::clock::system(),
        )
        .await
    }

    /// Starts an agent on a complete config text whose registers listen on `ports`.
    pub async fn from_text(
        dir: tempfile::TempDir,
        ports: &[(&str, u16)],
        text: &str,
        env: &std::collections::HashMap<String, String>,
        clock: storelink::clock::SharedClock,
    ) -> TestAgent {
        let config = storelink::config::Config::parse(text, "test.toml", env)
            .unwrap_or_else(|e| panic!("{e}\n{text}"));
        let token = CancellationToken::new();
        let agent = storelink::daemon::start(config, clock, token.clone())
            .await
            .unwrap();
        TestAgent {
            agent,
            token,
            registers: ports
                .iter()
                .map(|(n, p)| (n.to_string(), local(*p)))
                .collect(),
            dir,
        }
    }

    /// The local API's base URL.
    pub fn api(&self) -> String {
        format!("http://{}", self.agent.config.cashier.bind)
    }

    /// Stops the agent and hands back its storage directory.
    pub async fn stop_keep(self) -> tempfile::TempDir {
        self.token.cancel();
        self.agent.shutdown().await.unwrap();
        self.dir
    }

    /// A register connection to the `i`-th register.
    pub async fn client(&self, i: usize) -> storelink::sim::JsonlClient {
        storelink::sim::JsonlClient::connect_patiently(self.registers[i].1, Duration::from_secs(5))
            .await
            .unwrap()
    }

    pub async fn stop(self) {
        self.token.cancel();
        self.agent.shutdown().await.unwrap();
    }
}

impl std::ops::Deref for TestAgent {
    type Target = storelink::daemon::Agent;
    fn deref(&self) -> &Self::Target {
        &self.agent
    }
}

/// The tests' campaign set: `games-at-till`, 20 % off games for the "gamers" segment when a
/// transaction starts, with `cashier` as its cashier texts; `extra` adds or replaces campaign
/// fields (`value`, `caps`, `holdout_bp`).
pub fn games_campaign(
    version: u64,
    cashier: serde_json::Value,
    extra: serde_json::Value,
) -> serde_json::Value {
    let mut campaign = serde_json::json!({
        "id": "games-at-till",
        "name": "Games for console owners, at the till",
        "valid_from": "2020-01-01T00:00:00Z",
        "valid_until": "2100-01-01T00:00:00Z",
        "trigger": {"kind": "transaction_started"},
        "audience": "'gamers' in segments",
        "offers": [{
            "id": "games-20",
            "texts": {"cashier": cashier},
            "code": "GAMES20",
            "items": [{"category": "games"}]
        }],
        "attribution_days": 14
    });
    if let (Some(c), Some(e)) = (campaign.as_object_mut(), extra.as_object()) {
        c.extend(e.clone());
    }
    serde_json::json!({"version": version, "campaigns": [campaign]})
}

/// A consenting loyalty customer in the "gamers" segment (card 9990001), for offer tests.
pub fn gamer() -> storelink::profiles::Profile {
    let mut p = storelink::profiles::Profile::new("c77");
    p.first_name = Some("Ada".into());
    p.tier = Some("gold".into());
    p.points = 420;
    p.cards = vec!["9990001".into()];
    p.consents.personalised_offers = true;
    p.segments = vec!["gamers".into()];
    p.version = 3;
    p
}

/// The loyalty app's service UUID that the presence tests advertise.
pub const TENANT_UUID: &str = "6f3c1a52-8d1e-4c1b-9a7e-5b2d0c4e8f11";

/// Presence config replaying `file` through the demo store's zones, with short timers so the
/// tests are quick.
pub fn replay_presence_config(file: &Path) -> String {
    let (_, zones) = storelink::presence::walk::demo_store();
    let mut text = format!(
        "\n[presence]\nsource = \"replay\"\nservice_uuid = \"{TENANT_UUID}\"\nstore_away_s = 6\n\n[presence.replay]\nfile = \"{}\"\n",
        file.display()
    );
    for z in zones {
        text.push_str(&format!(
            "\n[[presence.zones]]\nname = \"{}\"\n{}scanners = {:?}\nenter_m = {}\nexit_m = {}\ndwell_s = 3\naway_s = 3\n",
            z.name,
            z.lane.map(|l| format!("lane = \"{l}\"\n")).unwrap_or_default(),
            z.scanners,
            z.enter_m,
            z.exit_m,
        ));
    }
    text
}
