//! Fleet simulation for the central side (issue 9, item 5): one process runs N stores, each the
//! agent's real uplink (`uplink::mqtt::run`) with its own MQTT client id, its own sled database
//! and its own outbox, against ONE local mosquitto. "Central" lives in the same process on a
//! thread of its own: K consumers on the shared subscription
//! `$share/central/storelink/v1/+/+/events/#` (the way central scales out its readers), plus a
//! watcher of the retained `…/{store}/status` messages.
//!
//! Each store appends CloudEvents exactly as the agent makes them (`events::encode`, the
//! transaction from `SimRegister`, presence / offer / prompt data in the agent's field layout,
//! checked against `docs/schemas/`) at a Poisson rate, flushes its store (fsync) before
//! notifying the uplink, as the engine's group commit does, and the uplink publishes each one at
//! QoS 1 to `storelink/v1/acme/{store}/events/{type}` and removes it on PUBACK.
//!
//! Measured and printed: connect storm, events appended and delivered, loss (an appended id that
//! never arrived) and duplicates (an id that arrived twice), broker messages/s, end-to-end
//! latency (append → consumer), CPU of the simulated agents (process CPU minus the central
//! thread) per store and per event, CPU and RSS of mosquitto, RSS / threads / file descriptors
//! of this process, and the mean CloudEvent size per stream type.
//!
//! `cargo bench --bench fleet -- --stores 2000 --seconds 60 [--rate 1.0] [--consumers 2]
//!  [--outage S] [--dir /dev/shm] [--no-fsync] [--drain-timeout 60] [--report-every 5]`
//!
//! `--rate` is transactions per store per second; each brings 1.7 more events (see [`MIX`]).
//! `--outage S` adds a phase after the steady window: every uplink stops for S seconds while
//! the registers keep ringing, then all reconnect at once and drain into the one broker.
//!
//! Needs `mosquitto` (PATH or /usr/sbin). Results and the sizing arithmetic: docs/fleet.md.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use jiff::Timestamp;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use storelink::clock::SharedClock;
use storelink::config::Config;
use storelink::events::{self, EventKind};
use storelink::model::downlink::Downlink;
use storelink::offers::campaign::Channel;
use storelink::offers::decide::{Chosen, Control};
use storelink::profiles::Item;
use storelink::sim::SimRegister;
use storelink::store::{Store, StoreOptions};
use storelink::supervisor::StatusBoard;
use storelink::uplink::PathState;
use storelink::uplink::mqtt::{self, MqttSettings};
use storelink::uplink::outbox::{AppendOutcome, Limits, NewEvent, Outbox};
use tokio_util::sync::CancellationToken;

/// The allocator. The agent ships with mimalloc; the fleet figures in docs/fleet.md were
/// measured on the system allocator, because mimalloc then asked for transparent huge pages
/// and every sled database cost 5.3 MiB resident at open (0.29 MiB since mimalloc is built
/// with `no_thp`). The default stays the system allocator so those figures can be rerun;
/// `FLEET_MIMALLOC=1 cargo bench --bench fleet` builds it with the agent's allocator. The
/// choice is made at compile time, so no block is ever freed by the allocator that did not
/// allocate it.
struct FleetAlloc;

const MIMALLOC: bool = option_env!("FLEET_MIMALLOC").is_some();

unsafe impl std::alloc::GlobalAlloc for FleetAlloc {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        unsafe {
            if MIMALLOC {
                mimalloc::MiMalloc.alloc(layout)
            } else {
                std::alloc::System.alloc(layout)
            }
        }
    }
    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        unsafe {
            if MIMALLOC {
                mimalloc::MiMalloc.alloc_zeroed(layout)
            } else {
                std::alloc::System.alloc_zeroed(layout)
            }
        }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        unsafe {
            if MIMALLOC {
                mimalloc::MiMalloc.dealloc(ptr, layout)
            } else {
                std::alloc::System.dealloc(ptr, layout)
            }
        }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new: usize) -> *mut u8 {
        unsafe {
            if MIMALLOC {
                mimalloc::MiMalloc.realloc(ptr, layout, new)
            } else {
                std::alloc::System.realloc(ptr, layout, new)
            }
        }
    }
}

#[global_allocator]
static ALLOCATOR: FleetAlloc = FleetAlloc;

mod common;
use common::Broker;

/// The written contract: samples of what central receives are validated against docs/schemas.
#[allow(dead_code)]
#[path = "../tests/it/common/contract.rs"]
mod contract;

const TENANT: &str = "acme";

/// Every store keeps its own sled database (so "its own outbox" is literally true: its own
/// files, log, fsyncs and flusher thread, as on a gateway). sled's page cache is a cap, filled
/// lazily; an outbox that drains continuously touches only a few pages, so 1 MiB per store is
/// plenty and keeps 2,000 stores in a few GiB. What a sled database costs regardless of the
/// cache (its 512 KiB write buffer, one flusher thread, two or three file descriptors) is what
/// the RSS / thread / fd figures below report. One shared database with a tree per store would
/// be lighter, but `Outbox` owns the `outbox` tree of a `Store`, so it would no longer be the
/// agent's own code path.
const CACHE_BYTES: u64 = 1 << 20;

/// Events per transaction, by kind, at a busy store's peak. 40 % of baskets carry a loyalty
/// card (`SimRegister`'s share): a cashier prompt is shown and answered (2 prompt events), and
/// half of those till occasions choose an offer. A quarter of the loyalty customers carry an
/// opted-in phone: their visit makes about 5 presence changes (store and zone entered, dwelling,
/// left) and 2 offer decisions (store entry, zone dwelling).
/// 1 + 0.4 × 2 + (0.4 × 0.5 + 0.1 × 2) + 0.1 × 5 = 2.7 events per transaction.
const MIX: [(EventKind, f64); 4] = [
    (EventKind::Transaction, 1.0),
    (EventKind::Prompt, 0.8),
    (EventKind::Offer, 0.4),
    (EventKind::Presence, 0.5),
];

const SHARED_FILTER: &str = "$share/central/storelink/v1/+/+/events/#";
const STATUS_FILTER: &str = "storelink/v1/+/+/status";

/// `cargo bench --bench fleet -- [flags]`
#[derive(clap::Parser)]
struct Args {
    #[arg(long, default_value_t = 500)]
    stores: usize,
    /// Transactions per store per second.
    #[arg(long, default_value_t = 1.0)]
    rate: f64,
    /// The steady window.
    #[arg(long, default_value_t = 60)]
    seconds: u64,
    /// Central's consumers on the shared subscription.
    #[arg(long, default_value_t = 2)]
    consumers: usize,
    /// Do not fsync the stores' logs.
    #[arg(long)]
    no_fsync: bool,
    #[arg(long, default_value_t = 60)]
    drain_timeout: u64,
    #[arg(long, default_value_t = 5)]
    report_every: u64,
    /// Where the stores' databases go. tmpfs by default: 2,000 stores on one box share one
    /// (virtual) disk, which real gateways do not, and that disk's fsync latency is not
    /// central's concern. Each store still writes, flushes and syncs its own sled log; `--dir
    /// /tmp` puts them on disk.
    #[arg(long, default_value_os_t = default_dir())]
    dir: PathBuf,
    /// Seconds all uplinks are down after the steady window (0: no outage phase).
    #[arg(long, default_value_t = 0)]
    outage: u64,
}

fn default_dir() -> PathBuf {
    if Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    }
}

// ---------------------------------------------------------------------------------------------
// /proc: CPU, memory, threads, descriptors.

fn clk_tck() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// utime + stime in seconds from a `/proc/…/stat` file.
fn cpu_secs(stat: &Path, tck: f64) -> f64 {
    let (user, sys) = cpu_split(stat, tck);
    user + sys
}

/// (utime, stime) in seconds from a `/proc/…/stat` file.
fn cpu_split(stat: &Path, tck: f64) -> (f64, f64) {
    let Ok(text) = std::fs::read_to_string(stat) else {
        return (0.0, 0.0);
    };
    // The command name may hold spaces; fields resume after its closing parenthesis.
    let rest = &text[text.rfind(')').map(|i| i + 1).unwrap_or(0)..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // Field 3 (state) is f[0]; utime is field 14, stime field 15.
    (ticks(11) / tck, ticks(12) / tck)
}

/// A `kB` line of `/proc/…/status` (VmRSS, VmHWM) or a plain count (Threads).
fn status_value(status: &Path, key: &str) -> u64 {
    std::fs::read_to_string(status)
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn fd_count() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count())
        .unwrap_or(0)
}

fn nofile_limits() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
    let line = text
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap_or("");
    let v: Vec<u64> = line
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    (
        v.first().copied().unwrap_or(1024),
        v.get(1).copied().unwrap_or(1024),
    )
}

/// Each store holds its sled files and a socket, mosquitto a socket per store; both processes
/// share this limit (mosquitto inherits it). Raises the soft limit to the hard one with
/// `prlimit` (util-linux) when it is too low, since std has no setrlimit and this bench adds
/// no dependency for it.
fn ensure_nofile(stores: usize) {
    let need = (stores * 6 + 256) as u64;
    let (soft, hard) = nofile_limits();
    if soft >= need {
        return;
    }
    let _ = std::process::Command::new("prlimit")
        .arg(format!("--pid={}", std::process::id()))
        .arg(format!("--nofile={hard}:{hard}"))
        .status();
    let (soft, hard) = nofile_limits();
    if soft < need {
        eprintln!(
            "RLIMIT_NOFILE is {soft} (hard {hard}); {stores} stores need about {need}. Raise it (ulimit -n) and run again."
        );
        std::process::exit(2);
    }
    println!("raised RLIMIT_NOFILE to {soft}");
}

/// This thread's id, for its own CPU time in /proc/self/task/{tid}/stat.
fn thread_id() -> u32 {
    std::fs::read_link("/proc/thread-self")
        .ok()
        .and_then(|p| p.file_name()?.to_str()?.parse().ok())
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------------------------
// The broker.

/// One mosquitto on a free loopback port. 1,000 QoS 1 messages in flight per client (the
/// agents keep 100, so this only bounds what goes to the consumers), and up to 100,000 queued
/// per client, so a consumer that falls behind for a moment is not silently dropped messages
/// (mosquitto's default is 1,000): a loss this bench reports is then the agents' or the
/// broker's, not a queue cap. Nagle off, as production brokers run.
fn mosquitto() -> Broker {
    Broker::start(
        "max_inflight_messages 1000\nmax_queued_messages 100000\nset_tcp_nodelay true\nmax_keepalive 120\n",
    )
}

// ---------------------------------------------------------------------------------------------
// What was appended and what arrived.

struct Track {
    appended_at_us: u64,
    received: u32,
    /// Appended during the steady window (not during or after an outage).
    steady: bool,
}

#[derive(Default, Clone, Copy)]
struct KindStats {
    count: u64,
    payload_bytes: u64,
    topic_bytes: u64,
}

#[derive(Default)]
struct LedgerInner {
    pending: HashMap<Box<str>, Track>,
    latencies_us: Vec<u32>,
    /// Append → arrival of events appended after the steady window (outage phase).
    outage_latencies_us: Vec<u32>,
    duplicates: u64,
    unexpected: u64,
    appended_by_kind: BTreeMap<&'static str, KindStats>,
    received_by_kind: BTreeMap<String, KindStats>,
    per_consumer: Vec<u64>,
    checked_by_kind: HashMap<String, u32>,
    contract_errors: u64,
}

struct Ledger {
    t0: Instant,
    inner: Mutex<LedgerInner>,
    appended: AtomicU64,
    not_stored: AtomicU64,
    /// First arrivals of appended ids.
    delivered: AtomicU64,
    /// Every message the consumers got, duplicates included.
    messages: AtomicU64,
    steady: std::sync::atomic::AtomicBool,
    /// When the outage began (µs since `t0`); an event that was still on its way then is not
    /// a steady-state sample any more.
    outage_at_us: AtomicU64,
}

/// How many messages of each type are validated against docs/schemas at the consumer.
const CONTRACT_SAMPLES: u32 = 25;

impl Ledger {
    fn new(consumers: usize) -> Ledger {
        Ledger {
            t0: Instant::now(),
            inner: Mutex::new(LedgerInner {
                per_consumer: vec![0; consumers],
                ..Default::default()
            }),
            appended: AtomicU64::new(0),
            not_stored: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
            messages: AtomicU64::new(0),
            steady: std::sync::atomic::AtomicBool::new(true),
            outage_at_us: AtomicU64::new(u64::MAX),
        }
    }

    fn now_us(&self) -> u64 {
        self.t0.elapsed().as_micros() as u64
    }

    /// Called before the append, so a consumer can never see an id the ledger does not know.
    fn expect(&self, event: &NewEvent, topic_len: usize) {
        let at = self.now_us();
        let steady = self.steady.load(Ordering::Relaxed);
        let mut l = self.inner.lock().unwrap();
        l.pending.insert(
            event.id.as_str().into(),
            Track {
                appended_at_us: at,
                received: 0,
                steady,
            },
        );
        let k = l.appended_by_kind.entry(event.kind.name()).or_default();
        k.count += 1;
        k.payload_bytes += event.payload.len() as u64;
        k.topic_bytes += topic_len as u64;
    }

    fn forget(&self, id: &str) {
        self.inner.lock().unwrap().pending.remove(id);
    }

    fn on_message(&self, consumer: usize, topic: &str, payload: &[u8]) {
        let at = self.now_us();
        let kind = topic.rsplit('/').next().unwrap_or("?");
        let id = envelope_id(payload).unwrap_or("");
        self.messages.fetch_add(1, Ordering::Relaxed);
        let check = {
            let mut l = self.inner.lock().unwrap();
            l.per_consumer[consumer] += 1;
            let k = l.received_by_kind.entry(kind.to_string()).or_default();
            k.count += 1;
            k.payload_bytes += payload.len() as u64;
            k.topic_bytes += topic.len() as u64;
            let mut first = None;
            match l.pending.get_mut(id) {
                Some(t) => {
                    t.received += 1;
                    if t.received == 1 {
                        let steady = t.steady && at < self.outage_at_us.load(Ordering::Relaxed);
                        first = Some((at.saturating_sub(t.appended_at_us), steady));
                    }
                }
                None => l.unexpected += 1,
            }
            match first {
                Some((lat, steady)) => {
                    let lat = lat.min(u32::MAX as u64) as u32;
                    if steady {
                        l.latencies_us.push(lat);
                    } else {
                        l.outage_latencies_us.push(lat);
                    }
                    self.delivered.fetch_add(1, Ordering::Relaxed);
                }
                None => l.duplicates += u64::from(l.pending.contains_key(id)),
            }
            let n = l.checked_by_kind.entry(kind.to_string()).or_default();
            *n += 1;
            *n <= CONTRACT_SAMPLES
        };
        if check {
            let errors = match serde_json::from_slice::<serde_json::Value>(payload) {
                Ok(v) => contract::errors(&v),
                Err(e) => vec![format!("not JSON: {e}")],
            };
            if !errors.is_empty() {
                eprintln!("contract violation on {topic}: {}", errors.join("; "));
                self.inner.lock().unwrap().contract_errors += 1;
            }
        }
    }
}

/// The CloudEvent `id`: the envelope serialises `specversion` then `id`, so the first `"id":"`
/// is the envelope's, and ids hold no quotes. Saves a JSON parse per message at the consumer.
fn envelope_id(payload: &[u8]) -> Option<&str> {
    let start = payload.windows(6).position(|w| w == b"\"id\":\"")? + 6;
    let len = payload[start..].iter().position(|b| *b == b'"')?;
    std::str::from_utf8(&payload[start..start + len]).ok()
}

// ---------------------------------------------------------------------------------------------
// Central: consumers on the shared subscription, and the status watcher.

#[derive(Default)]
struct StatusSeen {
    online: AtomicU64,
    offline: AtomicU64,
    bytes: AtomicU64,
}

enum Role {
    Consumer(usize),
    Status,
}

async fn central_client(
    port: u16,
    role: Role,
    ledger: Arc<Ledger>,
    status: Arc<StatusSeen>,
    ready: Arc<AtomicUsize>,
    token: CancellationToken,
) {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
    let (id, filter) = match role {
        Role::Consumer(i) => (format!("central-{i}"), SHARED_FILTER),
        Role::Status => ("central-status".to_string(), STATUS_FILTER),
    };
    let mut options = MqttOptions::new(id.clone(), "127.0.0.1", port);
    options.set_keep_alive(Duration::from_secs(30));
    options.set_clean_session(true);
    options.set_max_packet_size(mqtt::MAX_PACKET, mqtt::MAX_PACKET);
    let (client, mut events) = AsyncClient::new(options, 64);
    let mut subscribed = false;
    loop {
        let event = tokio::select! {
            e = events.poll() => e,
            _ = token.cancelled() => break,
        };
        match event {
            // Clean session: subscribe again after every CONNACK.
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                client.try_subscribe(filter, QoS::AtLeastOnce).unwrap();
            }
            Ok(Event::Incoming(Packet::SubAck(_))) => {
                if !subscribed {
                    subscribed = true;
                    ready.fetch_add(1, Ordering::SeqCst);
                }
            }
            Ok(Event::Incoming(Packet::Publish(p))) => match role {
                Role::Consumer(i) => ledger.on_message(i, &p.topic, &p.payload),
                Role::Status => {
                    status
                        .bytes
                        .fetch_add(p.payload.len() as u64, Ordering::Relaxed);
                    const ONLINE: &[u8] = b"\"state\":\"online\"";
                    let online = p.payload.windows(ONLINE.len()).any(|w| w == ONLINE);
                    if online {
                        status.online.fetch_add(1, Ordering::Relaxed);
                    } else {
                        status.offline.fetch_add(1, Ordering::Relaxed);
                    }
                }
            },
            Ok(_) => {}
            Err(e) => {
                eprintln!("{id}: {e}; reconnecting");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    let _ = client.try_disconnect();
}

/// What the broker retains: a subscriber that arrives late gets one status message per store.
async fn retained_status(port: u16, expect: usize) -> (u64, u64) {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
    let mut options = MqttOptions::new("central-late", "127.0.0.1", port);
    options.set_max_packet_size(mqtt::MAX_PACKET, mqtt::MAX_PACKET);
    let (client, mut events) = AsyncClient::new(options, 16);
    client
        .subscribe(STATUS_FILTER, QoS::AtLeastOnce)
        .await
        .unwrap();
    let (mut count, mut bytes) = (0u64, 0u64);
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Packet::Publish(p))) if p.retain => {
                    count += 1;
                    bytes += p.payload.len() as u64;
                    if count as usize >= expect {
                        break;
                    }
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    })
    .await;
    let _ = client.try_disconnect();
    (count, bytes)
}

/// Runs central on a thread of its own (a current-thread runtime), so its CPU can be told
/// apart from the simulated agents'.
fn start_central(
    port: u16,
    consumers: usize,
    ledger: Arc<Ledger>,
    status: Arc<StatusSeen>,
    token: CancellationToken,
) -> (std::thread::JoinHandle<()>, u32) {
    let ready = Arc::new(AtomicUsize::new(0));
    let (tid_tx, tid_rx) = std::sync::mpsc::channel();
    let r = ready.clone();
    let handle = std::thread::Builder::new()
        .name("central".into())
        .spawn(move || {
            tid_tx.send(thread_id()).unwrap();
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let mut tasks = Vec::new();
                for i in 0..consumers {
                    tasks.push(tokio::spawn(central_client(
                        port,
                        Role::Consumer(i),
                        ledger.clone(),
                        status.clone(),
                        r.clone(),
                        token.clone(),
                    )));
                }
                tasks.push(tokio::spawn(central_client(
                    port,
                    Role::Status,
                    ledger,
                    status,
                    r,
                    token,
                )));
                for t in tasks {
                    let _ = t.await;
                }
            });
        })
        .unwrap();
    let tid = tid_rx.recv().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while ready.load(Ordering::SeqCst) < consumers + 1 {
        assert!(Instant::now() < deadline, "central did not subscribe");
        std::thread::sleep(Duration::from_millis(10));
    }
    (handle, tid)
}

// ---------------------------------------------------------------------------------------------
// The stores.

struct Sim {
    id: String,
    store: Store,
    outbox: Arc<Outbox>,
    paths: Arc<PathState>,
    settings: MqttSettings,
    _downlink: tokio::sync::mpsc::Receiver<Downlink>,
}

/// A store as the daemon opens it: its config (defaults for everything but identity, storage
/// path and broker url), its own sled database, its outbox with the configured limits, and the
/// MQTT settings the agent derives from the config, downlink subscriptions included.
fn open_sim(i: usize, root: &Path, port: u16, clock: &SharedClock) -> Sim {
    let id = format!("s{:04}", i + 1);
    let path = root.join(&id);
    let text = format!(
        "[store]\nid = \"{id}\"\ntenant = \"{TENANT}\"\ntimezone = \"Europe/Berlin\"\ncurrency = \"EUR\"\n\n[storage]\npath = \"{}\"\n\n[central.mqtt]\nurl = \"mqtt://127.0.0.1:{port}\"\n",
        path.display()
    );
    let config = Config::parse(&text, "fleet.toml", &HashMap::<String, String>::new())
        .unwrap_or_else(|e| panic!("fleet config: {e}"));
    let store = Store::open(
        &config.storage.path,
        &StoreOptions {
            cache_bytes: CACHE_BYTES,
            log_cache_bytes: CACHE_BYTES,
        },
    )
    .unwrap();
    let limits = Limits {
        seen_retention: Duration::from_secs(config.storage.seen_retention_days * 86_400),
        max_seen: config.storage.max_seen_ids,
        ..Limits::with_max_bytes(config.storage.max_outbox_bytes)
    };
    let outbox = Arc::new(Outbox::open(&store, limits, clock.clone()).unwrap());
    let mut settings = MqttSettings::from_config(&config)
        .unwrap()
        .expect("central.mqtt is configured");
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    settings.downlink = Some(tx);
    Sim {
        id,
        store,
        outbox,
        paths: Arc::new(PathState::default()),
        settings,
        _downlink: rx,
    }
}

fn open_fleet(n: usize, root: &Path, port: u16, clock: &SharedClock) -> Vec<Arc<Sim>> {
    let threads = 4.min(n);
    let mut all: Vec<(usize, Sim)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                s.spawn(move || {
                    (t..n)
                        .step_by(threads)
                        .map(|i| (i, open_sim(i, root, port, clock)))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    all.sort_by_key(|(i, _)| *i);
    all.into_iter().map(|(_, s)| Arc::new(s)).collect()
}

// --- Event payloads: the agent's own `data` types (src/presence/pipeline.rs, src/offers/live.rs).
use storelink::offers::live::{OfferData, PromptAction, PromptData, Recognised, short_hash};
use storelink::presence::pipeline::PresenceData;

fn round2(x: f32) -> f32 {
    (x * 100.0).round() / 100.0
}

struct OpenPrompt {
    id: String,
    lane: String,
    customer: String,
    offer: bool,
}

/// One store's event source: four lanes of `SimRegister`, customers, open prompts.
struct Gen {
    store: String,
    registers: Vec<SimRegister>,
    rng: StdRng,
    last_us: i64,
    prompts: VecDeque<OpenPrompt>,
}

impl Gen {
    fn new(store: &str, seed: u64) -> Gen {
        Gen {
            store: store.to_string(),
            registers: (1..=4)
                .map(|l| {
                    SimRegister::new(
                        store,
                        &format!("lane-{l}"),
                        Some(&l.to_string()),
                        seed * 8 + l,
                    )
                })
                .collect(),
            rng: StdRng::seed_from_u64(seed),
            last_us: 0,
            prompts: VecDeque::new(),
        }
    }

    fn customer(&mut self) -> String {
        format!("47{:08}", self.rng.random_range(0..50_000))
    }

    fn event(&mut self, kind: EventKind, now: Timestamp) -> NewEvent {
        // Distinct instants per store, as ids that embed the instant must be unique.
        let us = now.as_microsecond().max(self.last_us + 1);
        self.last_us = us;
        let at = Timestamp::from_microsecond(us).unwrap();
        let store = self.store.clone();
        let (id, payload) = match kind {
            EventKind::Transaction => {
                let r = self.rng.random_range(0..self.registers.len());
                let tx = self.registers[r].next(at);
                let payload = events::encode(kind, &tx.id, &store, tx.ended_at, &tx);
                (tx.id, payload)
            }
            EventKind::Presence => {
                const ZONES: [(&str, Option<&str>); 5] = [
                    ("store", None),
                    ("entrance", None),
                    ("electronics", None),
                    ("fresh", None),
                    ("lane-3", Some("3")),
                ];
                const CHANGES: [&str; 3] = ["entered", "dwelling", "left"];
                let customer = self.customer();
                let (zone, lane) = ZONES[self.rng.random_range(0..ZONES.len())];
                let event = CHANGES[self.rng.random_range(0..CHANGES.len())];
                let distance = (zone != "store" && event != "left")
                    .then(|| round2(self.rng.random_range(0.3..6.0)));
                let data = PresenceData {
                    store: &store,
                    customer_id: &customer,
                    event,
                    zone,
                    lane,
                    confidence: round2(self.rng.random_range(0.5..1.0)),
                    distance_m: distance,
                };
                let id = format!("presence:{store}:{customer}:{zone}:{event}:{us}");
                let payload = events::encode(kind, &id, &store, at, &data);
                (id, payload)
            }
            EventKind::Offer => {
                let customer = self.customer();
                let (triggers, zone, lane) = match self.rng.random_range(0..3) {
                    0 => (vec!["store_entered"], None, None),
                    1 => (vec!["zone_dwelling"], Some("electronics"), None),
                    _ => (vec!["transaction_started"], None, Some("2")),
                };
                let control = self.rng.random_bool(0.15);
                let chosen = [Chosen {
                    channel: if lane.is_some() {
                        Channel::Cashier
                    } else {
                        Channel::Push
                    },
                    campaign: "winter-gaming".into(),
                    variant: Some("b".into()),
                    offer: "controller-10".into(),
                    text: BTreeMap::from([
                        (
                            "de".to_string(),
                            "Anna, 10 % auf Controller bis Sonntag".to_string(),
                        ),
                        (
                            "en".to_string(),
                            "Anna, 10 % off controllers until Sunday".to_string(),
                        ),
                    ]),
                    code: Some("WG10-7F3K".into()),
                    barcode: Some("2912345678904".into()),
                    items: vec![Item::Category("gaming".into())],
                    score: 3.2,
                }];
                let controls = [Control {
                    campaign: "winter-gaming".into(),
                    variant: Some("b".into()),
                    offer: "controller-10".into(),
                }];
                let (offers, controls): (&[Chosen], &[Control]) = if control {
                    (&[], &controls)
                } else {
                    (&chosen, &[])
                };
                let id = format!(
                    "{store}:offer:{}",
                    short_hash(&[
                        customer.as_bytes(),
                        &us.to_be_bytes(),
                        triggers.join(",").as_bytes()
                    ])
                );
                let data = OfferData {
                    store: &store,
                    customer_id: &customer,
                    triggers,
                    zone,
                    lane,
                    offers,
                    controls,
                };
                let payload = events::encode(kind, &id, &store, at, &data);
                (id, payload)
            }
            EventKind::Prompt => {
                // About half the prompt events show a prompt, half answer one already shown.
                let answer = !self.prompts.is_empty() && self.rng.random_bool(0.5);
                let (p, action) = if answer {
                    let p = self.prompts.pop_front().unwrap();
                    let action = if self.rng.random_bool(0.6) {
                        PromptAction::Accepted
                    } else {
                        PromptAction::Dismissed
                    };
                    (p, action)
                } else {
                    let p = OpenPrompt {
                        id: format!(
                            "{store}:prompt:{}",
                            short_hash(&[store.as_bytes(), &us.to_be_bytes()])
                        ),
                        lane: self.rng.random_range(1..=4).to_string(),
                        customer: self.customer(),
                        offer: self.rng.random_bool(0.7),
                    };
                    self.prompts.push_back(OpenPrompt {
                        id: p.id.clone(),
                        lane: p.lane.clone(),
                        customer: p.customer.clone(),
                        offer: p.offer,
                    });
                    (p, PromptAction::Shown)
                };
                let by_presence = p.customer.ends_with('7');
                let data = PromptData {
                    store: &store,
                    prompt_id: &p.id,
                    lane: &p.lane,
                    customer_id: &p.customer,
                    action,
                    recognised: if by_presence {
                        Recognised::Presence
                    } else {
                        Recognised::Card
                    },
                    ask_for_card: by_presence,
                    campaign: p.offer.then_some("winter-gaming"),
                    variant: p.offer.then_some("b"),
                    offer: p.offer.then_some("controller-10"),
                };
                let id = format!("{}:{}", p.id, action.as_str());
                let payload = events::encode(kind, &id, &store, at, &data);
                (id, payload)
            }
            other => unreachable!("the fleet does not generate {other:?}"),
        };
        NewEvent { kind, id, payload }
    }
}

fn draw(rng: &mut StdRng) -> EventKind {
    let total: f64 = MIX.iter().map(|(_, w)| w).sum();
    let mut x = rng.random::<f64>() * total;
    for (kind, w) in MIX {
        if x < w {
            return kind;
        }
        x -= w;
    }
    EventKind::Transaction
}

/// One store's register side: a Poisson stream of events at `events_per_s`, each appended,
/// made durable (fsync, like the engine's group commit before it acknowledges anything), then
/// handed to the uplink with `notify`.
#[allow(clippy::too_many_arguments)]
async fn produce(
    sim: Arc<Sim>,
    seed: u64,
    events_per_s: f64,
    fsync: bool,
    ledger: Arc<Ledger>,
    clock: SharedClock,
    stop: CancellationToken,
) {
    let mut generator = Gen::new(&sim.id, seed);
    let mut rng = StdRng::seed_from_u64(seed ^ 0x9e37_79b9_7f4a_7c15);
    let mut next = tokio::time::Instant::now();
    loop {
        let u: f64 = rng.random();
        next += Duration::from_secs_f64(-(1.0 - u).ln() / events_per_s);
        tokio::select! {
            _ = tokio::time::sleep_until(next) => {}
            _ = stop.cancelled() => return,
        }
        let kind = draw(&mut rng);
        let event = generator.event(kind, clock.now());
        let topic_len = sim.settings.events_topic(kind).len();
        ledger.expect(&event, topic_len);
        match sim.outbox.append(std::slice::from_ref(&event)) {
            Ok(outcomes) if outcomes[0] == AppendOutcome::Stored => {}
            other => {
                eprintln!("{}: append of {} gave {other:?}", sim.id, event.id);
                ledger.forget(&event.id);
                ledger.not_stored.fetch_add(1, Ordering::Relaxed);
                continue;
            }
        }
        if fsync {
            sim.store.flush().await.unwrap();
        }
        sim.outbox.notify();
        ledger.appended.fetch_add(1, Ordering::Relaxed);
    }
}

// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy)]
struct Cpu {
    at: Instant,
    process: f64,
    /// Kernel share of `process`.
    process_sys: f64,
    central: f64,
    broker: f64,
}

struct Probe {
    tck: f64,
    central_stat: PathBuf,
    broker_stat: PathBuf,
}

impl Probe {
    fn sample(&self) -> Cpu {
        Cpu {
            at: Instant::now(),
            process: cpu_secs(Path::new("/proc/self/stat"), self.tck),
            process_sys: cpu_split(Path::new("/proc/self/stat"), self.tck).1,
            central: cpu_secs(&self.central_stat, self.tck),
            broker: cpu_secs(&self.broker_stat, self.tck),
        }
    }
}

type Uplinks = Vec<tokio::task::JoinHandle<Result<(), mqtt::UplinkError>>>;

/// Every store's uplink, as the daemon runs it.
fn spawn_uplinks(
    rt: &tokio::runtime::Runtime,
    sims: &[Arc<Sim>],
    board: &StatusBoard,
    clock: &SharedClock,
    token: &CancellationToken,
) -> Uplinks {
    rt.block_on(async {
        sims.iter()
            .map(|sim| {
                let component = board.component(format!("uplink.mqtt.{}", sim.id));
                tokio::spawn(mqtt::run(
                    sim.settings.clone(),
                    sim.outbox.clone(),
                    clock.clone(),
                    sim.paths.clone(),
                    component,
                    token.clone(),
                ))
            })
            .collect()
    })
}

/// Stops the uplinks (each says goodbye: a retained "offline", then DISCONNECT).
fn stop_uplinks(rt: &tokio::runtime::Runtime, token: &CancellationToken, uplinks: Uplinks) {
    token.cancel();
    rt.block_on(async {
        let _ = tokio::time::timeout(Duration::from_secs(30), async {
            for u in uplinks {
                if let Ok(Err(e)) = u.await {
                    eprintln!("uplink ended with an error: {e}");
                }
            }
        })
        .await;
    });
}

/// Seconds until every store is connected; exits the bench after 180 s.
fn wait_connected(sims: &[Arc<Sim>], broker: &Broker) -> f64 {
    let t = Instant::now();
    loop {
        let up = sims.iter().filter(|s| s.paths.mqtt_connected()).count();
        if up == sims.len() {
            return t.elapsed().as_secs_f64();
        }
        if t.elapsed() > Duration::from_secs(180) {
            eprintln!(
                "only {up} of {} stores connected after 180 s; mosquitto log:\n{}",
                sims.len(),
                broker.log_tail()
            );
            std::process::exit(1);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The per-interval lines: rates, backlog, CPU of agents, central and broker.
struct Timeline {
    origin: Instant,
    prev: Cpu,
    prev_app: u64,
    prev_del: u64,
}

impl Timeline {
    fn header() {
        println!(
            "{:>5} {:>10} {:>11} {:>8} {:>11} {:>11} {:>11}",
            "t s",
            "appended/s",
            "delivered/s",
            "backlog",
            "agents %cpu",
            "central %",
            "mosquitto %"
        );
    }

    fn new(probe: &Probe, ledger: &Ledger) -> Timeline {
        let prev = probe.sample();
        Timeline {
            origin: prev.at,
            prev,
            prev_app: ledger.appended.load(Ordering::Relaxed),
            prev_del: ledger.delivered.load(Ordering::Relaxed),
        }
    }

    /// Prints one line; returns the backlog.
    fn tick(&mut self, probe: &Probe, ledger: &Ledger, sims: &[Arc<Sim>], note: &str) -> u64 {
        let now = probe.sample();
        let dt = now.at.duration_since(self.prev.at).as_secs_f64().max(1e-9);
        let app = ledger.appended.load(Ordering::Relaxed);
        let del = ledger.delivered.load(Ordering::Relaxed);
        let b = backlog(sims);
        let prev = self.prev;
        println!(
            "{:>5.0} {:>10.0} {:>11.0} {:>8} {:>11.1} {:>11.1} {:>11.1} {note}",
            now.at.duration_since(self.origin).as_secs_f64(),
            (app - self.prev_app) as f64 / dt,
            (del - self.prev_del) as f64 / dt,
            b,
            ((now.process - now.central) - (prev.process - prev.central)) / dt * 100.0,
            (now.central - prev.central) / dt * 100.0,
            (now.broker - prev.broker) / dt * 100.0,
        );
        (self.prev, self.prev_app, self.prev_del) = (now, app, del);
        b
    }
}

fn backlog(sims: &[Arc<Sim>]) -> u64 {
    sims.iter().map(|s| s.outbox.depth()).sum()
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn main() {
    let args: Args = common::args();
    assert!(
        args.stores > 0 && args.rate > 0.0 && args.consumers > 0 && args.report_every > 0,
        "--stores, --rate, --consumers and --report-every must be positive"
    );
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    ensure_nofile(args.stores);
    let per_tx: f64 = MIX.iter().map(|(_, w)| w).sum();
    let events_per_store = args.rate * per_tx;
    println!(
        "fleet: {} stores × {:.2} tx/s ({:.2} events/s each; {:.0} events/s offered), {} s, {} consumers on {SHARED_FILTER}, fsync per append: {}",
        args.stores,
        args.rate,
        events_per_store,
        events_per_store * args.stores as f64,
        args.seconds,
        args.consumers,
        if args.no_fsync { "no" } else { "yes" }
    );

    // The payloads are the agent's contract: check one of each kind before measuring anything.
    {
        let mut g = Gen::new("s0000", 1);
        for (kind, _) in MIX {
            for _ in 0..3 {
                let e = g.event(kind, Timestamp::now());
                let v: serde_json::Value = serde_json::from_slice(&e.payload).unwrap();
                contract::check(&v);
            }
        }
    }

    let tck = clk_tck();
    let base_rss = status_value(Path::new("/proc/self/status"), "VmRSS:");
    let broker = mosquitto();
    let port = broker.port;
    let ledger = Arc::new(Ledger::new(args.consumers));
    let status = Arc::new(StatusSeen::default());
    let central_token = CancellationToken::new();
    let (central, central_tid) = start_central(
        port,
        args.consumers,
        ledger.clone(),
        status.clone(),
        central_token.clone(),
    );
    let probe = Probe {
        tck,
        central_stat: PathBuf::from(format!("/proc/self/task/{central_tid}/stat")),
        broker_stat: broker.proc("stat"),
    };

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let clock = storelink::clock::system();
    let root = tempfile::Builder::new()
        .prefix("fleet-")
        .tempdir_in(&args.dir)
        .unwrap();
    println!("stores' databases under {}", root.path().display());

    let t = Instant::now();
    let sims = open_fleet(args.stores, root.path(), port, &clock);
    let open_s = t.elapsed().as_secs_f64();
    let rss_open = status_value(Path::new("/proc/self/status"), "VmRSS:");
    println!(
        "opened {} stores (own sled db + outbox each) in {open_s:.1} s: RSS {:.0} MiB (+{:.2} MiB/store), {} threads, {} fds",
        sims.len(),
        mib(rss_open),
        mib(rss_open.saturating_sub(base_rss)) / sims.len() as f64,
        status_value(Path::new("/proc/self/status"), "Threads:"),
        fd_count()
    );

    let mut uplink_token = CancellationToken::new();
    let board = StatusBoard::new(clock.clone());
    let broker_rss_idle = status_value(&broker.proc("status"), "VmRSS:");
    // Connect storm: every store at once, as after a regional outage.
    let mut uplinks = spawn_uplinks(&rt, &sims, &board, &clock, &uplink_token);
    let connect_s = wait_connected(&sims, &broker);
    // Let the birth messages and downlink SUBSCRIBEs settle.
    std::thread::sleep(Duration::from_secs(2));
    let broker_rss_connected = status_value(&broker.proc("status"), "VmRSS:");
    println!(
        "connect storm: {} stores connected in {connect_s:.2} s; mosquitto RSS {:.1} → {:.1} MiB ({:.1} KiB/connection idle)",
        sims.len(),
        mib(broker_rss_idle),
        mib(broker_rss_connected),
        broker_rss_connected.saturating_sub(broker_rss_idle) as f64 / sims.len() as f64
    );

    // The measured window.
    let stop = CancellationToken::new();
    let start = probe.sample();
    let appended0 = ledger.appended.load(Ordering::Relaxed);
    let producers: Vec<_> = rt.block_on(async {
        sims.iter()
            .enumerate()
            .map(|(i, sim)| {
                tokio::spawn(produce(
                    sim.clone(),
                    1000 + i as u64,
                    events_per_store,
                    !args.no_fsync,
                    ledger.clone(),
                    clock.clone(),
                    stop.clone(),
                ))
            })
            .collect()
    });
    Timeline::header();
    let mut timeline = Timeline::new(&probe, &ledger);
    let mut max_backlog = 0;
    let window = Duration::from_secs(args.seconds);
    let t_window = Instant::now();
    while t_window.elapsed() < window {
        let left = window.saturating_sub(t_window.elapsed());
        std::thread::sleep(left.min(Duration::from_secs(args.report_every)));
        max_backlog = max_backlog.max(timeline.tick(&probe, &ledger, &sims, ""));
    }
    let end = probe.sample();
    let backlog_end = backlog(&sims);
    let appended_window = ledger.appended.load(Ordering::Relaxed) - appended0;
    let delivered_window = ledger.delivered.load(Ordering::Relaxed);
    let messages_window = ledger.messages.load(Ordering::Relaxed);
    let rss_window = status_value(Path::new("/proc/self/status"), "VmRSS:");
    let threads_window = status_value(Path::new("/proc/self/status"), "Threads:");
    let fds_window = fd_count();
    let broker_rss_window = status_value(&broker.proc("status"), "VmRSS:");
    let outage_report = (args.outage > 0).then(|| {
        // A regional outage: every store loses central at once while its registers keep
        // ringing, then all reconnect together and drain their backlogs into one broker.
        ledger.steady.store(false, Ordering::Relaxed);
        ledger
            .outage_at_us
            .store(ledger.now_us(), Ordering::Relaxed);
        stop_uplinks(&rt, &uplink_token, std::mem::take(&mut uplinks));
        let t_out = Instant::now();
        let outage = Duration::from_secs(args.outage);
        while t_out.elapsed() < outage {
            let left = outage.saturating_sub(t_out.elapsed());
            std::thread::sleep(left.min(Duration::from_secs(args.report_every)));
            timeline.tick(&probe, &ledger, &sims, "outage");
        }
        let held = backlog(&sims);
        let before = probe.sample();
        let (del0, msg0) = (
            ledger.delivered.load(Ordering::Relaxed),
            ledger.messages.load(Ordering::Relaxed),
        );
        uplink_token = CancellationToken::new();
        let t = Instant::now();
        uplinks = spawn_uplinks(&rt, &sims, &board, &clock, &uplink_token);
        let reconnect_s = wait_connected(&sims, &broker);
        // Drained once the backlog is back to what live traffic keeps in flight.
        let live = (max_backlog * 2).max(sims.len() as u64 / 10).max(10);
        let mut next_tick = Instant::now() + Duration::from_secs(args.report_every);
        let mut drained = false;
        while t.elapsed() < Duration::from_secs(args.drain_timeout.max(args.outage * 4)) {
            std::thread::sleep(Duration::from_millis(50));
            if Instant::now() >= next_tick {
                timeline.tick(&probe, &ledger, &sims, "draining");
                next_tick += Duration::from_secs(args.report_every);
            }
            if backlog(&sims) <= live {
                drained = true;
                break;
            }
        }
        let drain_s = t.elapsed().as_secs_f64();
        let after = probe.sample();
        let dt = after.at.duration_since(before.at).as_secs_f64();
        let delivered = ledger.delivered.load(Ordering::Relaxed) - del0;
        let messages = ledger.messages.load(Ordering::Relaxed) - msg0;
        let agents = (after.process - after.central) - (before.process - before.central);
        format!(
            "outage {} s: {held} events held by {} stores ({:.0} per store); all reconnected in {reconnect_s:.2} s; backlog {} in {drain_s:.1} s ({}): {:.0} messages/s through the broker ({:.0} first deliveries/s, live traffic included); agents {:.0} % of a core ({:.0} µs/event), mosquitto {:.0} % of a core",
            args.outage,
            sims.len(),
            held as f64 / sims.len() as f64,
            if drained { "drained" } else { "NOT drained" },
            if drained { "back to the live level" } else { "timed out" },
            messages as f64 / dt,
            delivered as f64 / dt,
            agents / dt * 100.0,
            agents / delivered.max(1) as f64 * 1e6,
            (after.broker - before.broker) / dt * 100.0,
        )
    });
    stop.cancel();
    rt.block_on(async {
        for p in producers {
            let _ = p.await;
        }
    });

    // Drain: whatever is still in an outbox or on its way must arrive.
    let t = Instant::now();
    let drain_deadline = t + Duration::from_secs(args.drain_timeout);
    loop {
        let appended = ledger.appended.load(Ordering::Relaxed);
        if ledger.delivered.load(Ordering::Relaxed) >= appended && backlog(&sims) == 0 {
            break;
        }
        if Instant::now() > drain_deadline {
            eprintln!("drain timed out after {} s", args.drain_timeout);
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let drain_s = t.elapsed().as_secs_f64();
    // Late duplicates would show up within a moment.
    std::thread::sleep(Duration::from_secs(1));

    let dt = end.at.duration_since(start.at).as_secs_f64();
    let agents_cpu = (end.process - end.central) - (start.process - start.central);
    let central_cpu = end.central - start.central;
    let broker_cpu = end.broker - start.broker;
    let appended = ledger.appended.load(Ordering::Relaxed);
    let backlog_final = backlog(&sims);

    let (retained, retained_bytes) = rt.block_on(retained_status(port, sims.len()));
    let disk: u64 = sims
        .iter()
        .filter_map(|s| s.store.size_on_disk().ok())
        .sum();
    let l = ledger.inner.lock().unwrap();
    let lost: Vec<&str> = l
        .pending
        .iter()
        .filter(|(_, t)| t.received == 0)
        .map(|(id, _)| &**id)
        .collect();
    let mut lat = l.latencies_us.clone();
    lat.sort_unstable();
    let pct = |p: f64| -> f64 {
        if lat.is_empty() {
            return f64::NAN;
        }
        lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)] as f64 / 1000.0
    };

    println!();
    println!("== fleet result ==");
    println!(
        "stores {} | window {dt:.1} s | target {:.0} events/s",
        sims.len(),
        events_per_store * sims.len() as f64
    );
    println!(
        "appended {appended} events ({:.0}/s in the window), not stored {}; backlog at window end {backlog_end} (max sampled {max_backlog}), after drain {backlog_final}; drain took {drain_s:.2} s",
        appended_window as f64 / dt,
        ledger.not_stored.load(Ordering::Relaxed)
    );
    println!(
        "published and acked (PUBACK) by the broker: {}; delivered to central: {} unique of {} messages (in the window: {delivered_window} unique, {:.0}/s; {messages_window} messages, {:.0}/s)",
        appended - backlog_final,
        ledger.delivered.load(Ordering::Relaxed),
        ledger.messages.load(Ordering::Relaxed),
        delivered_window as f64 / dt,
        messages_window as f64 / dt,
    );
    println!(
        "LOST {} | DUPLICATES {} | unexpected ids {} | contract violations {} (first {CONTRACT_SAMPLES} of each type checked)",
        lost.len(),
        l.duplicates,
        l.unexpected,
        l.contract_errors
    );
    if !lost.is_empty() {
        println!(
            "  lost, first few: {:?}",
            lost.iter().take(5).collect::<Vec<_>>()
        );
    }
    println!(
        "shared subscription split over {} consumers: {:?}",
        args.consumers, l.per_consumer
    );
    println!(
        "latency append(+fsync) → PUBLISH → broker → consumer: p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms, max {:.1} ms ({} samples)",
        pct(0.5),
        pct(0.9),
        pct(0.99),
        lat.last().copied().unwrap_or(0) as f64 / 1000.0,
        lat.len()
    );
    if let Some(report) = &outage_report {
        println!("{report}");
        let mut o = l.outage_latencies_us.clone();
        o.sort_unstable();
        if !o.is_empty() {
            let q = |p: f64| o[((o.len() as f64 * p) as usize).min(o.len() - 1)] as f64 / 1000.0;
            println!(
                "  age at delivery of events appended or still undelivered from the outage on: p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms ({} events)",
                q(0.5),
                q(0.99),
                q(1.0),
                o.len()
            );
        }
    }
    println!(
        "agents CPU: {agents_cpu:.2} s over {dt:.1} s = {:.1} % of a core for {} stores → {:.3} % of a core per store, {:.0} µs per event",
        agents_cpu / dt * 100.0,
        sims.len(),
        agents_cpu / dt * 100.0 / sims.len() as f64,
        agents_cpu / appended_window.max(1) as f64 * 1e6
    );
    println!(
        "  of which kernel (process-wide, central included): {:.0} %",
        (end.process_sys - start.process_sys) / (end.process - start.process).max(1e-9) * 100.0
    );
    println!(
        "central consumers CPU: {:.1} % of a core ({:.0} µs/message); mosquitto CPU: {:.1} % of a core ({:.0} µs per message in+out)",
        central_cpu / dt * 100.0,
        central_cpu / messages_window.max(1) as f64 * 1e6,
        broker_cpu / dt * 100.0,
        broker_cpu / (appended_window + messages_window).max(1) as f64 * 1e6
    );
    println!(
        "bench process: RSS {:.0} MiB ({:.2} MiB/store), peak {:.0} MiB, {threads_window} threads, {fds_window} fds; mosquitto RSS {:.1} MiB",
        mib(rss_window),
        mib(rss_window.saturating_sub(base_rss)) / sims.len() as f64,
        mib(status_value(Path::new("/proc/self/status"), "VmHWM:")),
        mib(broker_rss_window),
    );
    println!(
        "sled on disk: {:.1} MiB in all, {:.2} MiB per store",
        disk as f64 / 1048576.0,
        disk as f64 / 1048576.0 / sims.len() as f64
    );
    println!(
        "status: {} online births seen live (mean {:.0} B); a late subscriber got {retained} retained status messages ({:.0} B each)",
        status.online.load(Ordering::Relaxed),
        status.bytes.load(Ordering::Relaxed) as f64
            / (status.online.load(Ordering::Relaxed) + status.offline.load(Ordering::Relaxed))
                .max(1) as f64,
        retained_bytes as f64 / retained.max(1) as f64
    );
    println!(
        "mean size per stream type (received at central; MQTT 3.1.1 QoS 1 PUBLISH on the wire):"
    );
    let mut all = KindStats::default();
    for (kind, k) in &l.received_by_kind {
        all.count += k.count;
        all.payload_bytes += k.payload_bytes;
        all.topic_bytes += k.topic_bytes;
        let payload = k.payload_bytes as f64 / k.count as f64;
        let topic = k.topic_bytes as f64 / k.count as f64;
        println!(
            "  {kind:<12} {:>6.1} % of events, CloudEvent {payload:>6.0} B, PUBLISH {:>6.0} B",
            k.count as f64 * 100.0 / ledger.messages.load(Ordering::Relaxed).max(1) as f64,
            // fixed header 1 + remaining length 2, topic length 2 + topic, packet id 2
            1.0 + 2.0 + 2.0 + topic + 2.0 + payload
        );
    }
    if all.count > 0 {
        let payload = all.payload_bytes as f64 / all.count as f64;
        let topic = all.topic_bytes as f64 / all.count as f64;
        println!(
            "  {:<12} {:>6.1} %          CloudEvent {payload:>6.0} B, PUBLISH {:>6.0} B (+4 B PUBACK each way)",
            "all",
            100.0,
            7.0 + topic + payload
        );
    }
    println!(
        "row: | {} | {:.2} | {:.0} | {:.0} | {:.0} | {} | {} | {:.1} / {:.1} | {:.3} % | {:.0} | {:.1} % | {:.0} | {:.1} | {:.0} |",
        sims.len(),
        args.rate,
        appended_window as f64 / dt,
        delivered_window as f64 / dt,
        max_backlog,
        lost.len(),
        l.duplicates,
        pct(0.5),
        pct(0.99),
        agents_cpu / dt * 100.0 / sims.len() as f64,
        agents_cpu / appended_window.max(1) as f64 * 1e6,
        broker_cpu / dt * 100.0,
        mib(rss_window),
        mib(broker_rss_window),
        connect_s * 1000.0,
    );
    drop(l);

    // Shut down: uplinks say goodbye (retained "offline"), central and the broker stop.
    stop_uplinks(&rt, &uplink_token, uplinks);
    std::thread::sleep(Duration::from_millis(500));
    println!(
        "shutdown: {} offline status messages seen",
        status.offline.load(Ordering::Relaxed)
    );
    central_token.cancel();
    let _ = central.join();
    drop(broker);
    drop(sims);
    drop(rt);
    drop(root);
}
