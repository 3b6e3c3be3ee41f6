//! The uplink against a local mosquitto at QoS 1: drain rate of a backlog, steady-state
//! publish latency (append → PUBACK → removed from the outbox), and bytes on the wire per
//! transaction, plain and in a gzip HTTPS batch.
//!
//! `cargo bench --bench uplink [-- --backlog N --runs R --latency-samples S]`
//!
//! Needs `mosquitto` on PATH (`.ci/run` installs it).

use std::sync::Arc;
use std::time::{Duration, Instant};

use storelink::clock::SharedClock;
use storelink::config::{MqttEndpoint, MqttProtocol};
use storelink::events::{self, EventKind};
use storelink::sim::SimRegister;
use storelink::store::{Store, StoreOptions};
use storelink::supervisor::StatusBoard;
use storelink::uplink::PathState;
use storelink::uplink::mqtt::{self, MqttSettings};
use storelink::uplink::outbox::{Limits, NewEvent, Outbox, Take};
use tokio_util::sync::CancellationToken;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

struct Args {
    backlog: usize,
    runs: usize,
    latency_samples: usize,
}

fn args() -> Args {
    let mut a = Args {
        backlog: 100_000,
        runs: 3,
        latency_samples: 1000,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--backlog" => a.backlog = it.next().unwrap().parse().unwrap(),
            "--runs" => a.runs = it.next().unwrap().parse().unwrap(),
            "--latency-samples" => a.latency_samples = it.next().unwrap().parse().unwrap(),
            _ => {}
        }
    }
    a
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Broker(std::process::Child, #[allow(dead_code)] tempfile::TempDir);

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn mosquitto(port: u16) -> Broker {
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("m.conf");
    std::fs::write(
        &conf,
        format!(
            "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nmax_inflight_messages 0\nmax_queued_messages 0\n"
        ),
    )
    .unwrap();
    let child = std::process::Command::new("mosquitto")
        .arg("-c")
        .arg(&conf)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("mosquitto on PATH");
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "mosquitto did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    Broker(child, dir)
}

fn transactions(n: usize) -> Vec<NewEvent> {
    let mut register = SimRegister::new("s042", "lane-1", Some("1"), 7);
    let start: jiff::Timestamp = "2026-11-23T08:00:00Z".parse().unwrap();
    (0..n)
        .map(|i| {
            let tx = register.next(start + jiff::SignedDuration::from_millis(i as i64 * 50));
            NewEvent {
                kind: EventKind::Transaction,
                id: tx.id.clone(),
                payload: events::encode(EventKind::Transaction, &tx.id, "s042", tx.ended_at, &tx),
            }
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

struct Running {
    outbox: Arc<Outbox>,
    store: Store,
    token: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
    _broker: Broker,
}

fn open(port: u16) -> (Arc<Outbox>, Store, tempfile::TempDir, SharedClock) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), &StoreOptions::default()).unwrap();
    let clock = storelink::clock::system();
    let outbox =
        Arc::new(Outbox::open(&store, Limits::with_max_bytes(8 << 30), clock.clone()).unwrap());
    let _ = port;
    (outbox, store, dir, clock)
}

fn start_uplink(
    port: u16,
    broker: Broker,
    outbox: Arc<Outbox>,
    store: Store,
    dir: tempfile::TempDir,
    clock: SharedClock,
) -> Running {
    let token = CancellationToken::new();
    let board = StatusBoard::new(clock.clone());
    let component = board.component("uplink.mqtt");
    let (o, t) = (outbox.clone(), token.clone());
    let task = tokio::spawn(async move {
        mqtt::run(
            settings(port),
            o,
            clock,
            Arc::new(PathState::default()),
            component,
            t,
        )
        .await
        .unwrap();
    });
    Running {
        outbox,
        store,
        token,
        task,
        _dir: dir,
        _broker: broker,
    }
}

/// A backlog of `n` transactions, then the broker appears: events/s until the outbox is empty.
async fn drain_once(n: usize) -> f64 {
    let port = free_port();
    let (outbox, store, dir, clock) = open(port);
    for chunk in transactions(n).chunks(1000) {
        outbox.append(chunk).unwrap();
    }
    store.flush().await.unwrap();
    let broker = mosquitto(port);
    let started = Instant::now();
    let running = start_uplink(port, broker, outbox, store, dir, clock);
    while running.outbox.depth() > 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let rate = n as f64 / started.elapsed().as_secs_f64();
    running.token.cancel();
    let _ = running.task.await;
    rate
}

/// One event at a time on an idle, connected uplink: append + flush → PUBACK → removed.
async fn latency(samples: usize) -> Vec<Duration> {
    let port = free_port();
    let (outbox, store, dir, clock) = open(port);
    let broker = mosquitto(port);
    let running = start_uplink(port, broker, outbox, store, dir, clock);
    // Warm up: the connection is up once the first event is acknowledged.
    let events = transactions(samples + 10);
    let mut out = Vec::with_capacity(samples);
    for (i, event) in events.iter().enumerate() {
        let t = Instant::now();
        running.outbox.append(std::slice::from_ref(event)).unwrap();
        running.store.flush().await.unwrap();
        running.outbox.notify();
        while running.outbox.depth() > 0 {
            tokio::task::yield_now().await;
        }
        if i >= 10 {
            out.push(t.elapsed());
        }
    }
    running.token.cancel();
    let _ = running.task.await;
    out.sort();
    out
}

fn bytes_per_transaction() {
    let events = transactions(500);
    let plain: usize = events.iter().map(|e| e.payload.len()).sum();
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), &StoreOptions::default()).unwrap();
    let outbox = Outbox::open(
        &store,
        Limits::with_max_bytes(1 << 30),
        storelink::clock::system(),
    )
    .unwrap();
    outbox.append(&events).unwrap();
    let batch = outbox.claim(Take::Front, 500, usize::MAX).unwrap();
    let body = storelink::uplink::https::batch_body(&batch);
    let gz = storelink::uplink::https::gzip(&body);
    // MQTT 3.1.1 PUBLISH at QoS 1: fixed header (1 + 2-3 length bytes), topic (2 + len),
    // packet id (2); PUBACK 4 bytes back.
    let topic = "storelink/v1/acme/s042/events/transaction".len();
    let mqtt_overhead = 1 + 3 + 2 + topic + 2;
    println!(
        "bytes/tx: CloudEvent {:.0} B; MQTT QoS 1 on the wire {:.0} B (+4 B PUBACK); HTTPS batch of 500 gzip {:.0} B ({:.1}x smaller)",
        plain as f64 / 500.0,
        plain as f64 / 500.0 + mqtt_overhead as f64,
        gz.len() as f64 / 500.0,
        body.len() as f64 / gz.len() as f64
    );
}

fn main() {
    let args = args();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut rates: Vec<f64> = (0..args.runs)
        .map(|_| rt.block_on(drain_once(args.backlog)))
        .collect();
    rates.sort_by(|a, b| a.partial_cmp(b).unwrap());
    println!(
        "drain: {} events backlog → mosquitto QoS 1, inflight 100: median {:.0} events/s (runs: {})",
        args.backlog,
        rates[rates.len() / 2],
        rates
            .iter()
            .map(|r| format!("{r:.0}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let lat = rt.block_on(latency(args.latency_samples));
    let pct = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)];
    println!(
        "publish latency (append+fsync → PUBACK → removed), {} samples: p50 {:?}, p90 {:?}, p99 {:?}",
        lat.len(),
        pct(0.5),
        pct(0.9),
        pct(0.99)
    );
    bytes_per_transaction();
}
