//! `storelink demo`: the whole pipeline on embedded defaults, on one machine, with nothing
//! installed but the binary.
//!
//! It starts a real MQTT broker in-process (rumqttd) on 127.0.0.1, runs the real agent from
//! `config/demo.toml` with its data in a temporary directory, drives simulated registers
//! through the real TCP register source, and plays "central": it publishes the campaign set
//! (`config/campaigns.example.json`) retained on the broker, subscribes to the broker and
//! prints what arrives. Customers whose phones reach a lane get the cashier prompt, and most
//! of them then buy at that lane's register, so offers, prompts and redemptions flow.

use std::net::{SocketAddr, TcpListener};
use std::time::Duration;

use rand::Rng;
use tokio_util::sync::CancellationToken;

use crate::clock::{SharedClock, system};
use crate::config::{Config, PresenceSource, ProcessEnv, Transport};
use crate::daemon;
use crate::presence::phones::{self, Phone};
use crate::presence::source::ReplaySettings;
use crate::presence::walk::{self, SimConfig, Walk};
use crate::profiles::Profile;
use crate::sim::central::{self, Observer};
use crate::sim::{JsonlClient, SimRegister, format_money};

/// The demo's configuration, compiled in.
pub const DEMO_CONFIG: &str = include_str!("../config/demo.toml");

/// The campaign set the demo's "central" publishes.
pub const DEMO_CAMPAIGNS: &str = include_str!("../config/campaigns.example.json");

/// The service UUID of the demo's loyalty app (also in config/demo.toml).
const DEMO_SERVICE_UUID: &str = "6f3c1a52-8d1e-4c1b-9a7e-5b2d0c4e8f11";

#[derive(Debug, Clone, Default)]
pub struct DemoOptions {
    /// Broker port; default 1883, or the next free one.
    pub mqtt_port: Option<u16>,
    /// Local API port; default 8080, or the next free one.
    pub http_port: Option<u16>,
}

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("{0}")]
    Port(String),
    #[error("the embedded broker did not start: {0}")]
    Broker(String),
    #[error("embedded demo config: {0}")]
    Config(#[from] crate::config::ConfigError),
    #[error("temporary storage: {0}")]
    Storage(std::io::Error),
    #[error(transparent)]
    Agent(#[from] daemon::DaemonError),
}

/// Picks `explicit` if it is free (or fails), otherwise the first free port from `preferred`.
pub fn pick_port(explicit: Option<u16>, preferred: u16) -> Result<u16, String> {
    let free = |port: u16| TcpListener::bind(("127.0.0.1", port)).is_ok();
    match explicit {
        Some(port) if free(port) => Ok(port),
        Some(port) => Err(format!(
            "port {port} is in use; pick another or leave the flag out"
        )),
        None => (preferred..preferred.saturating_add(200))
            .find(|&p| free(p))
            .ok_or_else(|| format!("no free port in {preferred}..{}", preferred + 200)),
    }
}

/// A port the OS says is free right now.
pub fn ephemeral_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Starts rumqttd on `addr` in its own threads. The broker runs until the process exits.
pub fn start_broker(addr: SocketAddr) -> Result<(), DemoError> {
    let config = format!(
        r#"
id = 0
[router]
id = 0
max_connections = 1000
max_outgoing_packet_count = 1000
max_segment_size = 16777216
max_segment_count = 4

[v4.1]
name = "v4-1"
listen = "{addr}"
next_connection_delay_ms = 1
    [v4.1.connections]
    connection_timeout_ms = 60000
    max_payload_size = 8388608
    max_inflight_count = 1000
    dynamic_filters = true
"#
    );
    let config: rumqttd::Config =
        toml::from_str(&config).map_err(|e| DemoError::Broker(e.to_string()))?;
    let mut broker = rumqttd::Broker::new(config);
    std::thread::Builder::new()
        .name(format!("rumqttd-{}", addr.port()))
        .spawn(move || {
            if let Err(e) = broker.start() {
                tracing::error!(error = %e, "embedded broker stopped");
            }
        })
        .map_err(|e| DemoError::Broker(e.to_string()))?;
    // Wait until it accepts connections, so the agent's first attempt succeeds.
    for _ in 0..200 {
        if std::net::TcpStream::connect(addr).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    Err(DemoError::Broker(format!("nothing listens on {addr}")))
}

/// Runs the demo until `token` is cancelled.
pub async fn run(options: DemoOptions, token: CancellationToken) -> Result<(), DemoError> {
    let mqtt_port = pick_port(options.mqtt_port, 1883).map_err(DemoError::Port)?;
    let http_port = pick_port(options.http_port, 8080).map_err(DemoError::Port)?;
    let broker = SocketAddr::from(([127, 0, 0, 1], mqtt_port));
    start_broker(broker)?;

    let data = tempfile::Builder::new()
        .prefix("storelink-demo-")
        .tempdir()
        .map_err(DemoError::Storage)?;
    let mut config = Config::parse(DEMO_CONFIG, "config/demo.toml", &ProcessEnv)?;
    config.storage.path = data.path().to_path_buf();
    let clock: SharedClock = system();
    let phones = demo_presence(&mut config, data.path(), clock.now())?;
    config.cashier.bind = format!("127.0.0.1:{http_port}");
    if let Some(mqtt) = &mut config.central.mqtt {
        mqtt.url = format!("mqtt://{broker}");
    }
    let mut registers = Vec::new();
    for register in &mut config.registers {
        let port = ephemeral_port().map_err(|e| DemoError::Port(e.to_string()))?;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        register.transport = Transport::TcpListen {
            bind: addr.to_string(),
        };
        registers.push((register.name.clone(), register.lane.clone(), addr));
    }
    let prefix = config.topic_prefix();
    let store = config.store.id.clone();
    let tz = config.time_zone();

    println!("storelink demo");
    println!(
        "  broker     mqtt://{broker}   (try: mosquitto_sub -h 127.0.0.1 -p {mqtt_port} -t '{prefix}/#' -v)"
    );
    println!("  status     http://127.0.0.1:{http_port}/api/v1/status");
    println!("  metrics    http://127.0.0.1:{http_port}/metrics");
    println!("  data       {} (removed on exit)", data.path().display());
    println!(
        "  registers  {}",
        registers
            .iter()
            .map(|(n, _, a)| format!("{n}@{a}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!("Press Ctrl-C to stop.\n");

    println!(
        "  phones     {} customers with the app walk entrance -> aisle -> lane -> exit",
        phones.len()
    );
    let agent = daemon::start(config, clock.clone(), token.clone()).await?;
    for lane in daemon::known_lanes(&agent.config) {
        println!(
            "  cashier    http://127.0.0.1:{http_port}{}&lang=en   (lane {lane}; open it in a browser)",
            crate::cashier::lane::display_path(&agent.api.lanes.auth, &lane)
        );
    }
    println!();
    for (i, phone) in phones.iter().enumerate() {
        agent
            .profiles
            .upsert(demo_profile(i, phone))
            .map_err(|e| DemoError::Storage(std::io::Error::other(e.to_string())))?;
    }

    let central = start_central(broker, &prefix, token.clone()).await?;
    let mut sims = Vec::new();
    let mut shoppers = std::collections::HashMap::new();
    for (i, (name, lane, addr)) in registers.into_iter().enumerate() {
        let mut register = SimRegister::new(&store, &name, lane.as_deref(), 0x5eed + i as u64);
        register.tz = tz.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        if let Some(lane) = lane {
            shoppers.insert(lane, tx);
        }
        sims.push(tokio::spawn(drive_register(
            register,
            addr,
            rx,
            clock.clone(),
            token.clone(),
        )));
    }
    sims.push(tokio::spawn(watch_lanes(
        agent.offers.clone(),
        shoppers,
        token.clone(),
    )));

    token.cancelled().await;
    for sim in sims {
        let _ = sim.await;
    }
    central.stop();
    agent.shutdown().await?;
    drop(data);
    Ok(())
}

/// The demo's customer `i`: a name, a tier, points; every other one a gamer who bought a
/// console (so central's follow-up rule suggests games).
fn demo_profile(i: usize, phone: &Phone) -> Profile {
    const NAMES: [&str; 8] = [
        "Ada", "Ben", "Clara", "Deniz", "Emil", "Frieda", "Goran", "Hanna",
    ];
    let mut profile = Profile::new(phone.customer_id.clone());
    profile.first_name = Some(NAMES[i % NAMES.len()].to_string());
    profile.tier = Some(["bronze", "silver", "gold"][i % 3].to_string());
    profile.points = (i as i64 * 137) % 2500;
    profile.consents.presence = true;
    profile.consents.personalised_offers = true;
    if i.is_multiple_of(2) {
        profile.segments = vec!["gamers".into()];
        profile.follow_ups = vec![crate::profiles::FollowUp {
            if_bought: crate::profiles::Item::Category("consoles".into()),
            suggest: crate::profiles::Item::Category("Spiele".into()),
            confidence: 0.6,
            lift: 3.2,
        }];
    }
    profile.presence_key = Some(phone.key);
    profile.version = 1;
    profile
}

/// A customer at a lane who is about to pay: their card, and the category they will buy
/// (the offer's, when they take it up).
struct Shopper {
    customer: String,
    category: Option<String>,
}

/// Prints each lane's prompt as the cashier sees it, and sends most prompted customers to pay
/// at that lane, three quarters of them buying what the offer was about.
async fn watch_lanes(
    offers: crate::offers::live::Offers,
    shoppers: std::collections::HashMap<String, tokio::sync::mpsc::Sender<Shopper>>,
    token: CancellationToken,
) {
    let mut lanes = offers.subscribe_lanes();
    loop {
        let update = tokio::select! {
            u = lanes.recv() => u,
            _ = token.cancelled() => return,
        };
        let Ok(update) = update else { continue };
        let Some(prompt) = update.prompt else {
            continue;
        };
        let text = prompt
            .offer
            .as_ref()
            .and_then(|o| o.text.get("de").or_else(|| o.text.values().next()).cloned())
            .unwrap_or_else(|| "(kein Angebot)".into());
        println!(
            "lane {:<3} prompt: {}  ({}, {} P.){}",
            update.lane,
            text,
            prompt.tier.as_deref().unwrap_or("-"),
            prompt.points,
            if prompt.ask_for_card {
                "  [nach der Kundenkarte fragen]"
            } else {
                ""
            }
        );
        if prompt.recognised != crate::offers::live::Recognised::Presence {
            continue;
        }
        let set = offers.campaigns();
        let category = prompt.offer.as_ref().and_then(|o| {
            let c = set.get(&o.campaign)?;
            let offer = c.campaign.offers.iter().find(|x| x.id == o.offer)?;
            offer.items.iter().find_map(|item| match item {
                crate::profiles::Item::Category(c) => Some(c.clone()),
                crate::profiles::Item::Sku(_) => None,
            })
        });
        let takes_it = rand::rng().random_bool(0.75);
        if let Some(tx) = shoppers.get(&update.lane) {
            let _ = tx.try_send(Shopper {
                customer: prompt.customer_id.clone(),
                category: category.filter(|_| takes_it),
            });
        }
    }
}

/// One simulated register: a transaction every one to four seconds, and a prompted customer's
/// purchase a few seconds after the prompt; each printed as it is acknowledged.
async fn drive_register(
    mut register: SimRegister,
    addr: SocketAddr,
    mut shoppers: tokio::sync::mpsc::Receiver<Shopper>,
    clock: SharedClock,
    token: CancellationToken,
) {
    let mut client = None;
    let mut first = true;
    let mut waiting: Option<Shopper> = None;
    loop {
        let pause = if first {
            Duration::from_millis(300)
        } else if waiting.is_some() {
            Duration::from_millis(rand::rng().random_range(2000..5000))
        } else {
            Duration::from_millis(rand::rng().random_range(1000..4000))
        };
        first = false;
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            s = shoppers.recv(), if waiting.is_none() => {
                waiting = s;
                continue;
            }
            _ = token.cancelled() => return,
        }
        if client.is_none() {
            client = JsonlClient::connect_patiently(addr, Duration::from_secs(5))
                .await
                .ok();
        }
        let Some(c) = client.as_mut() else { continue };
        let tx = match waiting.take() {
            Some(shopper) => {
                register.purchase(clock.now(), &shopper.customer, shopper.category.as_deref())
            }
            None => register.next(clock.now()),
        };
        match c.submit(&tx).await {
            Ok(reply) => println!(
                "register {:<7} #{:<4} {:<6} {:>2} lines {:>9} {}{}  -> {reply}",
                register.register,
                tx.sequence.unwrap_or(0),
                format!("{:?}", tx.kind).to_lowercase(),
                tx.lines.len(),
                format_money(tx.total),
                tx.currency,
                if tx.loyalty_id.is_some() {
                    "  loyalty"
                } else {
                    ""
                },
            ),
            Err(e) => {
                println!("register {:<7} connection lost: {e}", register.register);
                client = None;
            }
        }
    }
}

/// Plays central: subscribes to everything under the prefix and prints it, and publishes the
/// demo's campaign set, retained, as central would.
async fn start_central(
    broker: SocketAddr,
    prefix: &str,
    token: CancellationToken,
) -> Result<Observer, DemoError> {
    let observer = Observer::start(
        &format!("mqtt://{broker}"),
        format!("{prefix}/#"),
        Duration::from_secs(10),
        |p: &rumqttc::Publish| println!("{}", central::describe(&p.topic, &p.payload)),
        token,
    )
    .await
    .map_err(|e| DemoError::Broker(e.to_string()))?;
    observer
        .publish(
            format!("{prefix}/campaigns"),
            DEMO_CAMPAIGNS.as_bytes().to_vec(),
            true,
        )
        .await
        .map_err(|e| DemoError::Broker(e.to_string()))?;
    Ok(observer)
}

/// How long the demo's phones keep walking; one walk takes a few minutes.
const DEMO_PHONE_HOURS: u32 = 1;

/// Turns presence on for the demo: the demo store's zones, and simulated phones whose walks
/// are written as a replay file the real replay source plays. The file covers
/// [`DEMO_PHONE_HOURS`] with the scenario repeated, each phone's EIDs computed for the time
/// it is played, so recognition works exactly as with real phones.
fn demo_presence(
    config: &mut Config,
    dir: &std::path::Path,
    start: jiff::Timestamp,
) -> Result<Vec<Phone>, DemoError> {
    let tenant = config.presence.service.unwrap_or_else(|| {
        crate::presence::advert::parse_service_uuid(DEMO_SERVICE_UUID).expect("a valid UUID")
    });
    let (layout, zones) = walk::demo_store();
    let scenario = walk::demo_walks();
    let period = scenario
        .iter()
        .flat_map(|w| w.waypoints.last().map(|(t, _)| *t))
        .fold(0.0, f64::max)
        + 20.0;
    let rounds = (f64::from(DEMO_PHONE_HOURS) * 3600.0 / period).ceil() as usize;
    let per_round = scenario.iter().map(|w| w.phone).max().unwrap_or(0) + 1;
    // Each round brings other customers, so central sees a stream of visits, not one phone
    // looping; phone i of round r is customer r * per_round + i.
    let walks: Vec<Walk> = (0..rounds)
        .flat_map(|round| {
            scenario.iter().map(move |w| Walk {
                phone: round * per_round + w.phone,
                waypoints: w
                    .waypoints
                    .iter()
                    .map(|(t, p)| (t + round as f64 * period, *p))
                    .collect(),
            })
        })
        .collect();
    let samples = walk::simulate(
        &layout,
        &walks,
        &SimConfig {
            sigma_db: 4.0,
            loss: 0.3,
            interval_ms: 200,
            seed: 0x5eed,
            ..SimConfig::default()
        },
        start,
    );
    let phones = phones::phones("demo", rounds * per_round);
    let file = dir.join("demo-phones.jsonl");
    phones::write_replay(
        &file,
        &phones::adverts(&samples, &phones, &tenant, config.presence.rotation_s),
    )
    .map_err(DemoError::Storage)?;
    config.presence.source = PresenceSource::Replay;
    config.presence.service = Some(tenant);
    config.presence.zones = zones;
    config.presence.replay = Some(ReplaySettings {
        // The file's times are already those of this run.
        rebase_to_now: false,
        ..ReplaySettings::new(file)
    });
    Ok(phones)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_demo_config_is_valid() {
        let c = Config::parse(DEMO_CONFIG, "config/demo.toml", &ProcessEnv).unwrap();
        assert!(c.registers.len() >= 3, "several lanes");
        assert!(c.central.mqtt.is_some());
    }

    #[test]
    fn explicit_port_in_use_is_refused_and_default_moves_on() {
        let held = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = held.local_addr().unwrap().port();
        assert!(pick_port(Some(port), 1883).unwrap_err().contains("in use"));
        let next = pick_port(None, port).unwrap();
        assert_ne!(next, port);
    }

    #[test]
    fn demo_campaigns_all_go_live() {
        let set = serde_json::from_str(DEMO_CAMPAIGNS).unwrap();
        let compiled = crate::offers::campaign::CompiledSet::compile(set);
        assert!(compiled.rejected.is_empty(), "{:?}", compiled.rejected);
        assert!(compiled.live.len() >= 4);
    }

    #[test]
    fn money_formatting() {
        assert_eq!(format_money(12345), "123.45");
        assert_eq!(format_money(-5), "-0.05");
    }
}
