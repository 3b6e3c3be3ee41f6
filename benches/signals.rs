//! The daily customer-signals run over many customers, and what it costs the registers:
//!
//! - a running agent (`daemon::start`, its broker away, so everything it queues stays in the
//!   outbox) holds `--customers` loyalty customers with marketing consent and 2-6 purchase
//!   days each in two categories, spread so that a share of them is overdue, passive or new;
//! - one register sends transactions one at a time (each waits for its `ok`) at `--rate`;
//! - after `--warmup` seconds of that, the daily run starts (`Signals::daily_run` on a
//!   blocking thread, as the agent runs it) and the register keeps going; then, after as long
//!   again, the run a second time: the first is a fresh gateway's (every trigger and snapshot
//!   is new), the second finds everything remembered and sends nothing, which is what a
//!   day's run costs in reading.
//!
//! Prints each run's duration and counts, and the register's round-trip p50/p99/max before
//! and during each run.
//!
//! `cargo bench --bench signals [-- --customers N --rate R --warmup S]`

mod common;

use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use storelink::model::transaction::Transaction;
use storelink::profiles::Profile;
use storelink::sim::{JsonlClient, SimRegister};
use tokio_util::sync::CancellationToken;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `cargo bench --bench signals -- [flags]`
#[derive(clap::Parser)]
struct Args {
    /// Loyalty customers with KPIs.
    #[arg(long, default_value_t = 100_000)]
    customers: usize,
    /// Register transactions per second while measuring.
    #[arg(long, default_value_t = 100.0)]
    rate: f64,
    /// Seconds of register traffic before the run starts.
    #[arg(long, default_value_t = 10)]
    warmup: u64,
}

fn main() {
    let args: Args = common::args();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run(args));
}

fn history(reg: &mut SimRegister, customer: &str, rng: &mut StdRng) -> Vec<Transaction> {
    let today: jiff::civil::Date = jiff::Timestamp::now()
        .to_zoned(jiff::tz::TimeZone::get("Europe/Berlin").unwrap())
        .date();
    let categories = [
        "shoes",
        "outerwear",
        "trousers",
        "games",
        "consoles",
        "toys",
    ];
    let (a, b) = (rng.random_range(0..6), rng.random_range(0..6));
    let days = rng.random_range(2..=6);
    let rhythm = rng.random_range(7..60);
    // The last purchase 1-300 days ago: some New, most Loyal, some overdue or Passive.
    let last_ago = rng.random_range(1..300);
    (0..days)
        .map(|d| {
            let ago = last_ago + (days - 1 - d) * rhythm;
            let day = today - jiff::Span::new().days(ago);
            let mut tx = reg.purchase(jiff::Timestamp::now(), customer, None);
            tx.id = format!("hist:{customer}:{d}");
            tx.business_day = day;
            tx.lines.truncate(2);
            tx.lines[0].category = Some(categories[a].into());
            if let Some(l) = tx.lines.get_mut(1) {
                l.category = Some(categories[b].into());
            }
            tx.total = tx.lines.iter().map(|l| l.net()).sum();
            tx
        })
        .collect()
}

async fn run(args: Args) {
    let dir = tempfile::tempdir().unwrap();
    let (register_port, api_port, broker_port) = (
        common::free_port(),
        common::free_port(),
        common::free_port(),
    );
    let text = format!(
        r#"
[store]
id = "s1"
tenant = "bench"
timezone = "Europe/Berlin"
currency = "EUR"

[storage]
path = "{}"

[central.mqtt]
url = "mqtt://127.0.0.1:{broker_port}"

[cashier]
bind = "127.0.0.1:{api_port}"

[[registers]]
name = "lane-1"
lane = "1"
format = "jsonl"
transport = {{ kind = "tcp-listen", bind = "127.0.0.1:{register_port}" }}
"#,
        dir.path().display()
    );
    let config =
        storelink::config::Config::parse(&text, "bench.toml", &std::collections::HashMap::new())
            .unwrap_or_else(|e| panic!("{e}"));
    let token = CancellationToken::new();
    let agent = storelink::daemon::start(config, storelink::clock::system(), token.clone())
        .await
        .unwrap();

    // The customers, loaded as a sync and the engine's KPI step would load them.
    let started = Instant::now();
    let mut rng = StdRng::seed_from_u64(19);
    let mut reg = SimRegister::new("s1", "lane-1", Some("1"), 4);
    for start in (0..args.customers).step_by(1000) {
        let ids: Vec<String> = (start..(start + 1000).min(args.customers))
            .map(|i| format!("m{i:07}"))
            .collect();
        let page: Vec<Profile> = ids
            .iter()
            .map(|id| {
                let mut p = Profile::new(id.as_str());
                p.consents.marketing = true;
                p.consents.personalised_offers = true;
                p.version = 1;
                p
            })
            .collect();
        agent.profiles.upsert_many(page, &[]).unwrap();
        let txs: Vec<Transaction> = ids
            .iter()
            .flat_map(|id| history(&mut reg, id, &mut rng))
            .collect();
        agent.profiles.record_transactions(&txs).unwrap();
    }
    agent.store.flush_blocking().unwrap();
    println!(
        "{} customers loaded in {:.0} s",
        args.customers,
        started.elapsed().as_secs_f64()
    );

    // The register: one transaction at a time, paced.
    let stop = CancellationToken::new();
    let register = {
        let stop = stop.clone();
        let addr = common_addr(register_port);
        let period = Duration::from_secs_f64(1.0 / args.rate);
        tokio::spawn(async move {
            let mut client = JsonlClient::connect_patiently(addr, Duration::from_secs(10))
                .await
                .unwrap();
            let mut reg = SimRegister::new("s1", "lane-1", Some("1"), 8);
            let mut samples: Vec<(Instant, Duration)> = Vec::new();
            let mut tick = tokio::time::interval(period);
            while !stop.is_cancelled() {
                tick.tick().await;
                let tx = reg.next(jiff::Timestamp::now());
                let t = Instant::now();
                let reply = client.submit(&tx).await.unwrap();
                assert!(reply.starts_with("ok"), "{reply}");
                samples.push((t, t.elapsed()));
            }
            samples
        })
    };
    let mut runs = Vec::new();
    for _ in 0..2 {
        tokio::time::sleep(Duration::from_secs(args.warmup)).await;
        let signals = agent.signals.clone();
        let started = Instant::now();
        let report = tokio::task::spawn_blocking(move || signals.daily_run().unwrap())
            .await
            .unwrap();
        let ran = started.elapsed();
        // What the run queued is committed by the engine; a probe through it says when.
        agent.signals.probe().await;
        runs.push((started, started + ran, started.elapsed(), report));
    }
    stop.cancel();
    let samples = register.await.unwrap();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let print = |name: &str, mut s: Vec<Duration>| {
        if s.is_empty() {
            println!("  register round trip {name}: no transactions");
            return;
        }
        let n = s.len();
        let (p50, p99) = (
            common::quantile(&mut s, 0.5),
            common::quantile(&mut s, 0.99),
        );
        let max = *s.iter().max().unwrap();
        println!(
            "  register round trip {name}: {n} transactions, p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            ms(p50),
            ms(p99),
            ms(max)
        );
    };
    let first = runs[0].0;
    print(
        "before the runs",
        samples
            .iter()
            .filter(|(at, _)| *at < first)
            .map(|(_, d)| *d)
            .collect(),
    );
    for (i, (from, to, committed, report)) in runs.iter().enumerate() {
        println!(
            "run {}: {:.2} s over {} customers ({} consenting): {} triggers, {} snapshots, {} follow-up pairs; all committed after {:.2} s",
            i + 1,
            (*to - *from).as_secs_f64(),
            report.customers,
            report.consenting,
            report.triggers,
            report.snapshots,
            report.followup_pairs,
            committed.as_secs_f64()
        );
        print(
            "during it",
            samples
                .iter()
                .filter(|(at, _)| at >= from && at <= to)
                .map(|(_, d)| *d)
                .collect(),
        );
    }
    token.cancel();
    agent.shutdown().await.unwrap();
}

fn common_addr(port: u16) -> std::net::SocketAddr {
    std::net::SocketAddr::from(([127, 0, 0, 1], port))
}
