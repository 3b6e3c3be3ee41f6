//! The uplink against a local mosquitto at QoS 1, each figure beside a baseline measured in the
//! same run on the same broker and subscriber: a raw QoS 1 publisher (rumqttc with the agent's
//! window, and `mosquitto_pub -q 1 -l`) sending the agent's own event payloads.
//!
//! - **drain**: a backlog held in the outbox, then the uplink connects; from its start to the
//!   last event's arrival at a QoS 1 subscriber.
//! - **live**: the agent binary as a daemon, one TCP register connection pipelining a burst of
//!   `jsonl` transactions; from the first byte sent to the last transaction's arrival at the
//!   subscriber. The agent's peak RSS over the burst is read from `/proc` (VmHWM).
//! - publish latency on an idle uplink, and bytes on the wire per transaction.
//!
//! `cargo bench --bench uplink [-- --backlog N --burst N --runs R --latency-samples S]`
//!
//! Needs `mosquitto` and `mosquitto_pub` on PATH (`.ci/run` installs them).

use std::collections::HashSet;
use std::io::Write as _;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use storelink::clock::SharedClock;
use storelink::config::{MqttEndpoint, MqttProtocol};
use storelink::events::{self, EventKind};
use storelink::sim::SimRegister;
use storelink::store::{Store, StoreOptions};
use storelink::supervisor::StatusBoard;
use storelink::uplink::PathState;
use storelink::uplink::mqtt::{self, MqttSettings};
use storelink::uplink::outbox::{Limits, NewEvent, Outbox, Take};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

mod common;
use common::{Broker, free_port, median};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const TOPIC: &str = "storelink/v1/acme/s042/events/transaction";

/// `cargo bench --bench uplink -- [flags]`
#[derive(clap::Parser)]
struct Args {
    /// Events held in the outbox before the uplink connects (drain).
    #[arg(long, default_value_t = 100_000)]
    backlog: usize,
    /// Transactions pipelined on one register connection (live).
    #[arg(long, default_value_t = 20_000)]
    burst: usize,
    #[arg(long, default_value_t = 3)]
    runs: usize,
    #[arg(long, default_value_t = 1000)]
    latency_samples: usize,
}

/// Central's side: a QoS 1 subscriber that notes when each distinct event id arrived.
struct Subscriber {
    arrivals: Arc<Mutex<(HashSet<String>, Option<Instant>)>>,
    token: CancellationToken,
}

impl Subscriber {
    async fn start(port: u16) -> Subscriber {
        let mut options = MqttOptions::new(format!("central-{port}"), "127.0.0.1", port);
        options.set_max_packet_size(8 << 20, 8 << 20);
        options.set_keep_alive(Duration::from_secs(30));
        let (client, mut eventloop) = AsyncClient::new(options, 100);
        let arrivals: Arc<Mutex<(HashSet<String>, Option<Instant>)>> = Arc::default();
        let token = CancellationToken::new();
        let (ready_tx, ready) = tokio::sync::oneshot::channel();
        let mut ready_tx = Some(ready_tx);
        let (sink, stop) = (arrivals.clone(), token.clone());
        tokio::spawn(async move {
            loop {
                let event = tokio::select! {
                    e = eventloop.poll() => e,
                    _ = stop.cancelled() => return,
                };
                match event {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        let _ = client.subscribe(TOPIC, QoS::AtLeastOnce).await;
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        if let Some(tx) = ready_tx.take() {
                            let _ = tx.send(());
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let id = event_id(&p.payload);
                        let mut a = sink.lock().unwrap();
                        if a.0.insert(id) {
                            a.1 = Some(Instant::now());
                        }
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        });
        ready.await.expect("subscribed");
        Subscriber { arrivals, token }
    }

    fn count(&self) -> usize {
        self.arrivals.lock().unwrap().0.len()
    }

    /// Waits for `n` distinct events; when the last of them arrived.
    async fn wait_for(&self, n: usize, patience: Duration) -> Instant {
        let deadline = Instant::now() + patience;
        loop {
            {
                let a = self.arrivals.lock().unwrap();
                if a.0.len() >= n {
                    return a.1.expect("arrivals noted");
                }
            }
            assert!(
                Instant::now() < deadline,
                "waited {patience:?} for {n} events at the subscriber, got {}",
                self.count()
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    fn clear(&self) {
        let mut a = self.arrivals.lock().unwrap();
        a.0.clear();
        a.1 = None;
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        self.token.cancel();
    }
}

/// The CloudEvent id (`"id":"…"`, first in the object as the agent writes it).
fn event_id(payload: &[u8]) -> String {
    let text = String::from_utf8_lossy(payload);
    text.split("\"id\":\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .unwrap_or("")
        .to_string()
}

fn register_transactions(n: usize, seed: u64) -> Vec<storelink::model::transaction::Transaction> {
    let mut register = SimRegister::new("s042", "lane-1", Some("1"), seed);
    let start = jiff::Timestamp::now();
    (0..n)
        .map(|i| register.next(start + jiff::SignedDuration::from_millis(i as i64 * 50)))
        .collect()
}

fn transactions(n: usize, seed: u64) -> Vec<NewEvent> {
    register_transactions(n, seed)
        .into_iter()
        .map(|tx| NewEvent {
            kind: EventKind::Transaction,
            id: tx.id.clone(),
            payload: events::encode(EventKind::Transaction, &tx.id, "s042", tx.ended_at, &tx),
        })
        .collect()
}

fn settings(port: u16) -> MqttSettings {
    MqttSettings {
        endpoint: MqttEndpoint::parse(&format!("mqtt://127.0.0.1:{port}")).unwrap(),
        protocol: MqttProtocol::V311,
        client_id: format!("bench-{port}"),
        topic_prefix: "storelink/v1/acme".into(),
        store: "s042".into(),
        keep_alive: Duration::from_secs(30),
        clean_session: true,
        inflight: 100,
        username: None,
        password: None,
        proxy: None,
        tls: None,
        live_after: Duration::from_secs(30),
        downlink: None,
    }
}

/// The baseline: a raw rumqttc publisher at QoS 1 with the agent's settings (100 in flight),
/// the given payloads on the agent's topic. Seconds from the first publish to the last arrival.
async fn raw_rumqttc(port: u16, payloads: &[Vec<u8>], sub: &Subscriber) -> f64 {
    sub.clear();
    let mut options = MqttOptions::new(format!("raw-{}", free_port()), "127.0.0.1", port);
    options.set_max_packet_size(8 << 20, 8 << 20);
    options.set_inflight(100);
    options.set_keep_alive(Duration::from_secs(30));
    let (client, mut eventloop) = AsyncClient::new(options, 200);
    let driver = tokio::spawn(async move {
        loop {
            if eventloop.poll().await.is_err() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    });
    let started = Instant::now();
    for p in payloads {
        client
            .publish(TOPIC, QoS::AtLeastOnce, false, p.clone())
            .await
            .unwrap();
    }
    let last = sub.wait_for(payloads.len(), Duration::from_secs(120)).await;
    driver.abort();
    last.duration_since(started).as_secs_f64()
}

/// The baseline the issue measured with: `mosquitto_pub -q 1 -l`, one payload per line.
async fn raw_mosquitto_pub(port: u16, payloads: &[Vec<u8>], sub: &Subscriber) -> f64 {
    sub.clear();
    let mut input = Vec::with_capacity(payloads.iter().map(|p| p.len() + 1).sum());
    for p in payloads {
        input.extend_from_slice(p);
        input.push(b'\n');
    }
    let started = Instant::now();
    let mut child = std::process::Command::new("mosquitto_pub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-q",
            "1",
            "-t",
            TOPIC,
            "-l",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("mosquitto_pub on PATH");
    let mut stdin = child.stdin.take().unwrap();
    // stdin stays open until everything has arrived: mosquitto 2.0.11's `-l` disconnects at
    // end of input with PUBACKs still outstanding, and the broker drops what was in flight
    // ("disconnected due to out of memory"; eclipse-mosquitto/mosquitto#3253).
    let writer = std::thread::spawn(move || stdin.write_all(&input).map(|()| stdin));
    let last = sub.wait_for(payloads.len(), Duration::from_secs(120)).await;
    drop(writer.join().unwrap().unwrap());
    let _ = child.wait();
    last.duration_since(started).as_secs_f64()
}

fn open_outbox() -> (Arc<Outbox>, Store, tempfile::TempDir, SharedClock) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), &StoreOptions::default()).unwrap();
    let clock = storelink::clock::system();
    let outbox =
        Arc::new(Outbox::open(&store, Limits::with_max_bytes(8 << 30), clock.clone()).unwrap());
    (outbox, store, dir, clock)
}

fn start_uplink(
    port: u16,
    outbox: Arc<Outbox>,
    clock: SharedClock,
) -> (CancellationToken, tokio::task::JoinHandle<()>) {
    let token = CancellationToken::new();
    let board = StatusBoard::new(clock.clone());
    let component = board.component("uplink.mqtt");
    let t = token.clone();
    let task = tokio::spawn(async move {
        mqtt::run(
            settings(port),
            outbox,
            clock,
            Arc::new(PathState::default()),
            component,
            t,
        )
        .await
        .unwrap();
    });
    (token, task)
}

/// A backlog of `n` transactions held, then the uplink starts: seconds until the last one
/// arrives at the subscriber.
async fn drain_once(port: u16, events: &[NewEvent], sub: &Subscriber) -> f64 {
    sub.clear();
    let (outbox, store, _dir, clock) = open_outbox();
    for chunk in events.chunks(1000) {
        outbox.append(chunk).unwrap();
    }
    store.flush().await.unwrap();
    let started = Instant::now();
    let (token, task) = start_uplink(port, outbox.clone(), clock);
    let last = sub.wait_for(events.len(), Duration::from_secs(300)).await;
    let secs = last.duration_since(started).as_secs_f64();
    token.cancel();
    let _ = task.await;
    secs
}

/// The agent binary with one `jsonl` register, its MQTT uplink on `port`.
struct AgentProcess {
    child: std::process::Child,
    register: std::net::SocketAddr,
    _dir: tempfile::TempDir,
}

impl AgentProcess {
    fn start(port: u16) -> AgentProcess {
        let dir = tempfile::tempdir().unwrap();
        let register = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
        let conf = dir.path().join("storelink.toml");
        std::fs::write(
            &conf,
            format!(
                "[store]\nid = \"s042\"\ntenant = \"acme\"\n\n[storage]\npath = \"{}\"\n\n[central.mqtt]\nurl = \"mqtt://127.0.0.1:{port}\"\n\n[cashier]\nbind = \"127.0.0.1:{}\"\n\n[[registers]]\nname = \"lane-1\"\nlane = \"1\"\nformat = \"jsonl\"\ntransport = {{ kind = \"tcp-listen\", bind = \"{register}\" }}\n",
                dir.path().join("data").display(),
                free_port()
            ),
        )
        .unwrap();
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_storelink"))
            .arg("run")
            .arg("--config")
            .arg(&conf)
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(register).is_err() {
            assert!(Instant::now() < deadline, "the agent did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        AgentProcess {
            child,
            register,
            _dir: dir,
        }
    }

    /// A `/proc/<pid>/status` field in KiB (VmRSS, VmHWM).
    fn kib(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find(|l| l.starts_with(field))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What one live burst showed.
struct Live {
    secs: f64,
    idle_rss_kib: u64,
    peak_rss_kib: u64,
}

/// One TCP connection pipelining `lines`; seconds from the first byte to the last arrival.
async fn live_once(port: u16, lines: &[Vec<u8>], sub: &Subscriber) -> Live {
    sub.clear();
    let agent = AgentProcess::start(port);
    // Settled and connected before the clock starts.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle_rss_kib = agent.kib("VmRSS:");
    let stream = tokio::net::TcpStream::connect(agent.register)
        .await
        .unwrap();
    stream.set_nodelay(true).unwrap();
    let (read, mut write) = stream.into_split();
    let n = lines.len();
    let reader = tokio::spawn(async move {
        let mut replies = tokio::io::BufReader::new(read).lines();
        let mut ok = 0;
        while ok < n {
            match replies.next_line().await {
                Ok(Some(l)) if l.starts_with("ok") => ok += 1,
                Ok(Some(l)) => panic!("the agent refused a transaction: {l}"),
                _ => panic!("the agent closed the connection after {ok} replies"),
            }
        }
    });
    let mut bytes = Vec::with_capacity(lines.iter().map(|l| l.len()).sum());
    for l in lines {
        bytes.extend_from_slice(l);
    }
    let started = Instant::now();
    write.write_all(&bytes).await.unwrap();
    let last = sub.wait_for(n, Duration::from_secs(300)).await;
    reader.await.unwrap();
    let secs = last.duration_since(started).as_secs_f64();
    Live {
        secs,
        idle_rss_kib,
        peak_rss_kib: agent.kib("VmHWM:"),
    }
}

/// One event at a time on an idle, connected uplink: append + flush → PUBACK → removed.
async fn latency(port: u16, samples: usize) -> Vec<Duration> {
    let (outbox, store, _dir, clock) = open_outbox();
    let (token, task) = start_uplink(port, outbox.clone(), clock);
    let events = transactions(samples + 10, 99);
    let mut out = Vec::with_capacity(samples);
    for (i, event) in events.iter().enumerate() {
        let t = Instant::now();
        outbox.append(std::slice::from_ref(event)).unwrap();
        store.flush().await.unwrap();
        outbox.notify();
        while outbox.depth() > 0 {
            tokio::task::yield_now().await;
        }
        if i >= 10 {
            out.push(t.elapsed());
        }
    }
    token.cancel();
    let _ = task.await;
    out.sort();
    out
}

fn bytes_per_transaction() {
    let events = transactions(500, 7);
    let plain: usize = events.iter().map(|e| e.payload.len()).sum();
    let (outbox, _store, _dir, _clock) = open_outbox();
    outbox.append(&events).unwrap();
    let batch = outbox.claim(Take::Front, 500, usize::MAX).unwrap();
    let body = storelink::uplink::https::batch_body(&batch);
    let gz = storelink::uplink::https::gzip(&body);
    // MQTT 3.1.1 PUBLISH at QoS 1: fixed header (1 + 2-3 length bytes), topic (2 + len),
    // packet id (2); PUBACK 4 bytes back.
    let mqtt_overhead = 1 + 3 + 2 + TOPIC.len() + 2;
    println!(
        "bytes/tx: CloudEvent {:.0} B; MQTT QoS 1 on the wire {:.0} B (+4 B PUBACK); HTTPS batch of 500 gzip {:.0} B ({:.1}x smaller)",
        plain as f64 / 500.0,
        plain as f64 / 500.0 + mqtt_overhead as f64,
        gz.len() as f64 / 500.0,
        body.len() as f64 / gz.len() as f64
    );
}

fn list(v: &[f64], decimals: usize) -> String {
    v.iter()
        .map(|r| format!("{r:.decimals$}"))
        .collect::<Vec<_>>()
        .join(" / ")
}

/// The agent's rates beside the two raw publishers' of the same runs, with the per-run ratios.
fn against_baselines(agent: &[f64], raw: &[f64], pub_: &[f64]) -> String {
    let ratios =
        |base: &[f64]| -> Vec<f64> { agent.iter().zip(base).map(|(a, r)| a / r).collect() };
    let (to_raw, to_pub) = (ratios(raw), ratios(pub_));
    format!(
        "agent median {:.0} ({}); raw rumqttc {:.0} ({}); mosquitto_pub -l {:.0} ({}); ratio to rumqttc {:.2}x (runs {}), to mosquitto_pub {:.2}x (runs {})",
        median(agent.to_vec()),
        list(agent, 0),
        median(raw.to_vec()),
        list(raw, 0),
        median(pub_.to_vec()),
        list(pub_, 0),
        median(to_raw.clone()),
        list(&to_raw, 2),
        median(to_pub.clone()),
        list(&to_pub, 2),
    )
}

fn main() {
    let args: Args = common::args();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        // No in-flight or queue cap: the baselines and the agent meet the same unlimited broker.
        let broker = Broker::start("max_inflight_messages 0\nmax_queued_messages 0\n");
        let port = broker.port;
        let sub = Subscriber::start(port).await;

        // Drain: the agent's outbox against the raw publishers, alternating within each run.
        let backlog = transactions(args.backlog, 7);
        let payloads: Vec<Vec<u8>> = backlog.iter().map(|e| e.payload.clone()).collect();
        let size = payloads.iter().map(|p| p.len()).sum::<usize>() / payloads.len();
        let (mut agent, mut raw, mut pub_) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..args.runs {
            agent.push(args.backlog as f64 / drain_once(port, &backlog, &sub).await);
            raw.push(args.backlog as f64 / raw_rumqttc(port, &payloads, &sub).await);
            pub_.push(args.backlog as f64 / raw_mosquitto_pub(port, &payloads, &sub).await);
        }
        println!(
            "drain: {} events of {size} B held → mosquitto QoS 1 → subscriber, events/s: {}",
            args.backlog,
            against_baselines(&agent, &raw, &pub_)
        );

        // Live: the agent binary fed over one TCP connection, against the raw publishers
        // sending the CloudEvents those same transactions become.
        let txs = register_transactions(args.burst, 11);
        let lines: Vec<Vec<u8>> = txs
            .iter()
            .map(|tx| {
                let mut l = serde_json::to_vec(tx).unwrap();
                l.push(b'\n');
                l
            })
            .collect();
        let payloads: Vec<Vec<u8>> = txs
            .iter()
            .map(|tx| events::encode(EventKind::Transaction, &tx.id, "s042", tx.ended_at, tx))
            .collect();
        let size = payloads.iter().map(|p| p.len()).sum::<usize>() / payloads.len();
        let (mut agent, mut raw, mut pub_, mut peak, mut idle) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for _ in 0..args.runs {
            let live = live_once(port, &lines, &sub).await;
            agent.push(args.burst as f64 / live.secs);
            peak.push(live.peak_rss_kib as f64 / 1024.0);
            idle.push(live.idle_rss_kib as f64 / 1024.0);
            raw.push(args.burst as f64 / raw_rumqttc(port, &payloads, &sub).await);
            pub_.push(args.burst as f64 / raw_mosquitto_pub(port, &payloads, &sub).await);
        }
        println!(
            "live: {} transactions on one TCP connection → agent (release binary) → mosquitto QoS 1 → subscriber, events of {size} B, tx/s: {}",
            args.burst,
            against_baselines(&agent, &raw, &pub_)
        );
        println!(
            "agent RSS: before the burst median {:.1} MiB ({}), peak over the burst median {:.1} MiB ({})",
            median(idle.clone()),
            list(&idle, 1),
            median(peak.clone()),
            list(&peak, 1),
        );

        let lat = latency(port, args.latency_samples).await;
        let pct = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)];
        println!(
            "publish latency (append+fsync → PUBACK → removed), {} samples: p50 {:?}, p90 {:?}, p99 {:?}",
            lat.len(),
            pct(0.5),
            pct(0.9),
            pct(0.99)
        );
    });
    bytes_per_transaction();
}
