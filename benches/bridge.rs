//! `storelink bridge` from broker to PostgreSQL: sustained events/s, end-to-end latency, and
//! the bridge's CPU and peak RSS.
//!
//! - mosquitto (the bench's own) and a PostgreSQL cluster in a temp dir (Debian's package, as
//!   `postgres` when root), both on loopback;
//! - the release `storelink bridge` binary as a child process (one instance, or `--instances`
//!   in one group sharing the feed);
//! - one publisher sends `--events` schema-valid transactions (with 3 lines each) from
//!   `--stores` stores at QoS 1, as fast as the broker takes them;
//! - measured: first publish to the last event committed in `storelink.events`; latency per
//!   event is its row's commit transaction start (`received_at`) minus its publish time, both
//!   on this machine's clock; then `events` must hold each id exactly once.
//!
//! `cargo bench --bench bridge [-- --events N --stores S --instances I --rate R --writers W]`

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use storelink::events::{self, EventKind};
use storelink::sim::SimRegister;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `cargo bench --bench bridge -- [flags]`
#[derive(clap::Parser)]
struct Args {
    #[arg(long, default_value_t = 100_000)]
    events: usize,
    #[arg(long, default_value_t = 200)]
    stores: usize,
    #[arg(long, default_value_t = 1)]
    instances: usize,
    /// Publish at this many events/s (paced in 10 ms steps), as a fleet at its peak would,
    /// instead of as fast as the broker takes them.
    #[arg(long)]
    rate: Option<f64>,
    /// `postgres.writers` of each bridge (its default when absent).
    #[arg(long)]
    writers: Option<usize>,
}

fn micros_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros() as i64
}

/// utime + stime of a process, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = fields.get(11..13).map_or(0.0, |f| {
        f.iter().map(|v| v.parse::<f64>().unwrap_or(0.0)).sum()
    });
    ticks / 100.0
}

fn peak_rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

/// CPU seconds of every PostgreSQL process (the server and its backends).
fn postgres_cpu_seconds() -> f64 {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0.0;
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|c| c.trim() == "postgres")
        })
        .map(cpu_seconds)
        .sum()
}

/// The bridge processes: stopped (SIGTERM, then waited for) when this goes, also when the
/// bench fails, so no bridge outlives it.
struct Bridges(Vec<std::process::Child>);

impl Drop for Bridges {
    fn drop(&mut self) {
        for b in &mut self.0 {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(b.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let _ = b.wait();
        }
    }
}

fn main() {
    let args: Args = common::args();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run(args));
}

async fn run(args: Args) {
    let pg = common::postgres::Postgres::start();
    let broker = common::Broker::start("max_inflight_messages 0\nmax_queued_messages 0\n");
    let dir = tempfile::tempdir().unwrap();
    let mut bridges = Bridges(Vec::new());
    for i in 0..args.instances {
        let config = dir.path().join(format!("bridge-{i}.toml"));
        std::fs::write(
            &config,
            format!(
                "[broker]\nurl = \"mqtt://127.0.0.1:{}\"\nclient_id = \"bench-{i}\"\ngroup = \"bench\"\n\n[http]\nbind = \"127.0.0.1:0\"\n\n[postgres]\nurl = \"{}\"\n{}",
                broker.port,
                pg.url(),
                args.writers.map(|w| format!("writers = {w}\n")).unwrap_or_default()
            ),
        )
        .unwrap();
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_storelink"))
            .args(["bridge", "--config"])
            .arg(&config)
            .env("RUST_LOG", "warn")
            .spawn()
            .expect("the bridge starts");
        bridges.0.push(child);
    }
    let db = pg.client().await;
    // Ready when the schema exists and the broker has the subscriptions: give the bridges a
    // moment after the schema appears (the subscription follows the connection).
    let deadline = Instant::now() + Duration::from_secs(60);
    while db
        .query_one("SELECT to_regclass('storelink.events') IS NOT NULL", &[])
        .await
        .map(|r| !r.get::<_, bool>(0))
        .unwrap_or(true)
    {
        assert!(
            Instant::now() < deadline,
            "the bridge did not create its schema"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;

    // The events, encoded before the clock starts.
    let mut regs: Vec<SimRegister> = (0..args.stores)
        .map(|s| SimRegister::new(&format!("s{s:04}"), "r1", Some("1"), s as u64))
        .collect();
    let now = jiff::Timestamp::now();
    let payloads: Vec<(String, String, Vec<u8>)> = (0..args.events)
        .map(|i| {
            let s = i % args.stores;
            let mut tx = regs[s].next(now);
            tx.lines.truncate(3);
            tx.total = tx.lines.iter().map(|l| l.net()).sum();
            tx.tenders = vec![storelink::model::transaction::Tender {
                kind: "card".into(),
                amount: tx.total,
            }];
            let store = format!("s{s:04}");
            let payload = events::encode(EventKind::Transaction, &tx.id, &store, tx.ended_at, &tx);
            (
                tx.id.clone(),
                format!("storelink/v1/bench/{store}/events/transaction"),
                payload,
            )
        })
        .collect();
    let bytes: usize = payloads.iter().map(|p| p.2.len()).sum();

    let mut options = rumqttc::MqttOptions::new("bench-publisher", "127.0.0.1", broker.port);
    options
        .set_keep_alive(Duration::from_secs(30))
        .set_inflight(1000)
        .set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut eventloop) = rumqttc::AsyncClient::new(options, 2000);
    let acked = tokio::spawn(async move {
        let mut acks = 0usize;
        while let Ok(e) = eventloop.poll().await {
            if let rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_)) = e {
                acks += 1;
            }
        }
        acks
    });
    let cpu_before: Vec<f64> = bridges.0.iter().map(|b| cpu_seconds(b.id())).collect();
    let pg_before = postgres_cpu_seconds();
    let started = Instant::now();
    let first = micros_now();
    let mut sent_at: HashMap<String, i64> = HashMap::with_capacity(args.events);
    for (i, (id, topic, payload)) in payloads.into_iter().enumerate() {
        if let Some(rate) = args.rate {
            // Paced: event i goes at i / rate seconds, in 10 ms steps.
            let due = Duration::from_secs_f64(i as f64 / rate);
            let step = Duration::from_millis(10);
            if due > started.elapsed() + step {
                tokio::time::sleep_until((started + due).into()).await;
            }
        }
        sent_at.insert(id, micros_now());
        client
            .publish(topic, rumqttc::QoS::AtLeastOnce, false, payload)
            .await
            .unwrap();
    }
    let published = started.elapsed();
    let want = args.events as i64;
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let have: i64 = db
            .query_one("SELECT count(*) FROM storelink.events", &[])
            .await
            .unwrap()
            .get(0);
        if have >= want {
            break;
        }
        assert!(Instant::now() < deadline, "{have} of {want} events arrived");
        // Not often: each count scans the table (with parallel workers, each a process), and
        // at 20 ms this poll took a good part of PostgreSQL's CPU from the bridge. The span
        // is measured from the commits' own times, not from when this poll sees them.
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let cpu: f64 = bridges
        .0
        .iter()
        .zip(&cpu_before)
        .map(|(b, before)| cpu_seconds(b.id()) - before)
        .sum();
    let pg_cpu = postgres_cpu_seconds() - pg_before;
    let rss: Vec<f64> = bridges.0.iter().map(|b| peak_rss_mib(b.id())).collect();
    let rows = db
        .query(
            "SELECT id, (extract(epoch FROM received_at) * 1e6)::bigint,
                    (SELECT count(*) FROM storelink.sales)
             FROM storelink.events",
            &[],
        )
        .await
        .unwrap();
    let mut last = first;
    let mut latency: Vec<f64> = Vec::with_capacity(rows.len());
    for r in &rows {
        let id: String = r.get(0);
        let at: i64 = r.get(1);
        last = last.max(at);
        if let Some(sent) = sent_at.get(&id) {
            latency.push((at - sent) as f64 / 1000.0);
        }
    }
    let sales: i64 = rows.first().map_or(0, |r| r.get(2));
    assert_eq!(
        rows.len() as i64,
        want,
        "each event once in storelink.events"
    );
    assert_eq!(sales, want, "each transaction once in sales");
    let span = (last - first) as f64 / 1e6;
    let p50 = common::quantile(&mut latency, 0.5);
    let p99 = common::quantile(&mut latency, 0.99);
    println!(
        "{} events ({:.0} bytes each) from {} stores, {} bridge instance(s): published in {:.2} s; \
         first publish to last commit {:.2} s = {:.0} events/s into PostgreSQL; \
         latency p50 {p50:.1} ms, p99 {p99:.1} ms; 0 lost, 0 duplicates",
        args.events,
        bytes as f64 / args.events as f64,
        args.stores,
        args.instances,
        published.as_secs_f64(),
        span,
        args.events as f64 / span,
    );
    println!(
        "bridge CPU {:.2} s ({:.0} % of one core over the span), PostgreSQL CPU {:.2} s ({:.0} %), peak RSS {} MiB",
        cpu,
        100.0 * cpu / span,
        pg_cpu,
        100.0 * pg_cpu / span,
        rss.iter()
            .map(|r| format!("{r:.1}"))
            .collect::<Vec<_>>()
            .join(" / ")
    );
    let size: i64 = db
        .query_one(
            "SELECT sum(pg_total_relation_size(c.oid))::bigint FROM pg_class c
             JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE n.nspname = 'storelink' AND c.relkind = 'r'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    println!(
        "storelink schema on disk: {:.1} MiB, {:.0} bytes per event (tables, indexes, TOAST)",
        size as f64 / 1048576.0,
        size as f64 / args.events as f64
    );
    drop(client);
    // The publisher's loop would keep pinging; it has done its part.
    acked.abort();
    drop(bridges);
}
