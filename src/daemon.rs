//! Assembles the running agent: opens the store, starts the core, the sinks and the sources
//! under one supervisor, and shuts them down in order.
//!
//! Invariants:
//! - The store is open and the outbox counted before any source accepts a byte.
//! - One [`CancellationToken`] stops everything; shutdown waits at most [`SHUTDOWN_DEADLINE`]
//!   for tasks to drain, then flushes the store.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::cashier::api::{self, AgentInfo, ApiState};
use crate::cashier::auth::{AdminAuth, LaneAuth};
use crate::cashier::lane::LaneState;
use crate::clock::SharedClock;
use crate::config::{
    Config, ConfigError, PresenceSource, Problem, RegisterFormat, TlsSection, parse_socket_addr,
};
use crate::deadletter::DeadLetters;
use crate::engine::Engine;
use crate::model::ingest::IngestHandle;
use crate::model::presence::PresenceEvent;
use crate::occasions::Occasions;
use crate::offers::attribution::Attribution;
use crate::offers::campaign::CampaignSet;
use crate::offers::ledger::OfferLedger;
use crate::offers::live::{self, Offers, Slot};
use crate::offers::sync::CampaignSync;
use crate::pos::receipt::ReceiptTemplate;
use crate::pos::{self, RegisterContext};
use crate::presence::history::History;
use crate::presence::pipeline::{self, Pipeline};
use crate::presence::source::{self, Source};
use crate::profiles::ProfileStore;
use crate::profiles::erasure::Eraser;
use crate::profiles::sync::{self, Syncer};
use crate::signals::Signals;
use crate::store::{Store, StoreError};
use crate::supervisor::{StatusBoard, Supervisor};
use crate::uplink::mqtt::{self, MqttSettings};
use crate::uplink::outbox::{Limits, Outbox};

/// How long start-up waits for the local API to bind its port.
const API_BIND_PATIENCE: Duration = Duration::from_secs(2);

/// Messages from central waiting for the core; beyond this the uplink drops (and counts) them
/// rather than stall, and sync catches up.
const DOWNLINK_CHANNEL: usize = 1024;

/// How often the profile cache is made durable, so the log's journal of work owed to it stays
/// short (what a power cut can leave to replay).
const CHECKPOINT_EVERY: Duration = Duration::from_secs(1);

/// How often expired events leave the outbox and its age gauges are refreshed.
const OUTBOX_EXPIRY_EVERY: Duration = Duration::from_secs(30);

/// Tasks get this long to drain after a stop signal; the final flush follows.
pub const SHUTDOWN_DEADLINE: Duration = Duration::from_secs(4);

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    Setup(String),
}

/// Loads `path` as the agent runs it: the config's own checks, then the files it names that
/// other modules parse (receipt templates, the campaign set). Every problem is reported under
/// its key and the file, as `check-config` prints them.
pub fn load_config(path: &Path) -> Result<Config, ConfigError> {
    let config = Config::load(path)?;
    let mut problems = Vec::new();
    for (i, register) in config.registers.iter().enumerate() {
        if let (RegisterFormat::Receipt, Some(template)) = (register.format, &register.template)
            && let Err(e) = ReceiptTemplate::load(template)
        {
            problems.push(Problem::at(format!("registers[{i}].template"), e));
        }
    }
    if let Some(file) = &config.offers.campaigns_file {
        let parsed = std::fs::read(file)
            .map_err(|e| format!("cannot read {}: {e}", file.display()))
            .and_then(|bytes| {
                CampaignSet::from_json(&bytes)
                    .map_err(|e| format!("{} is not a campaign set: {e}", file.display()))
            });
        if let Err(message) = parsed {
            problems.push(Problem::at("offers.campaigns_file", message));
        }
    }
    if problems.is_empty() {
        Ok(config)
    } else {
        Err(ConfigError::Invalid {
            file: path.display().to_string(),
            problems,
        })
    }
}

/// A started agent.
pub struct Agent {
    pub config: Config,
    pub store: Store,
    pub outbox: Arc<Outbox>,
    pub deadletters: Arc<DeadLetters>,
    pub board: StatusBoard,
    pub api: ApiState,
    pub profiles: ProfileStore,
    /// Presence changes for the core (offers, prompts); subscribe to follow them.
    pub presence: tokio::sync::broadcast::Sender<PresenceEvent>,
    pub offers: Offers,
    /// Customer signals; tests call its daily run directly.
    pub signals: Signals,
    supervisor: Supervisor,
}

/// Opens the store and starts every task. Returns once the sources have been started.
pub async fn start(
    config: Config,
    clock: SharedClock,
    token: CancellationToken,
) -> Result<Agent, DaemonError> {
    crate::install_crypto_provider();
    let api_bind = parse_socket_addr(&config.cashier.bind).map_err(DaemonError::Setup)?;
    // Installed before any task runs, so no early count is lost to the no-op recorder.
    let metrics = crate::telemetry::metrics_handle();
    let (store, salvaged, outbox, deadletters) = open_store(&config, &clock).await?;

    let board = StatusBoard::new(clock.clone());
    let supervisor = Supervisor::new(token.clone(), board.clone());
    if let Some(s) = &salvaged {
        report_salvage(s, &config, &board, &deadletters, &outbox, &store, &clock).await?;
    }

    let (ingest, profiles, offer_ledger, completed_rx, signals) = start_core(
        &config,
        &store,
        &outbox,
        &deadletters,
        &clock,
        &supervisor,
        &token,
    )
    .await?;
    let offers = open_offers(&config, &clock, &store, &profiles, &offer_ledger, &ingest)?;

    let eraser = Eraser {
        profiles: profiles.clone(),
        records: vec![
            Arc::new(History::open(&store, config.presence.retention_days)?),
            Arc::new(offer_ledger.clone()),
            Arc::new(Occasions::new(&store)),
            Arc::new(crate::uplink::outbox::HeldForCentral {
                outbox: outbox.clone(),
                deadletters: deadletters.clone(),
            }),
        ],
        store_id: config.store.id.clone(),
        clock: clock.clone(),
        ingest: Some(ingest.clone()),
    };
    start_syncs(&config, &supervisor, &store, &eraser, &offers, &token)?;
    spawn_rfm(&config, &supervisor, &profiles, &clock, &token);
    let paths = Arc::new(crate::uplink::PathState::default());
    if let Some(settings) =
        crate::uplink::https::HttpsSettings::from_config(&config).map_err(DaemonError::Setup)?
    {
        let uplink = Arc::new(crate::uplink::https::HttpsUplink {
            settings,
            outbox: outbox.clone(),
            deadletters: deadletters.clone(),
            store: store.clone(),
            clock: clock.clone(),
            paths: paths.clone(),
        });
        let token = token.clone();
        supervisor.spawn("uplink.https", move |component| {
            let (uplink, token) = (uplink.clone(), token.clone());
            async move { uplink.run(component, token).await }
        });
    }
    spawn_outbox_expiry(&supervisor, &outbox, &token);
    start_mqtt(
        &config,
        &supervisor,
        &store,
        &outbox,
        &eraser,
        &offers,
        &paths,
        &clock,
        &token,
    )?;

    let http_registers = start_registers(&config, &supervisor, &ingest, &offers, &clock, &token)?;
    let presence = start_presence(&config, &store, &profiles, &supervisor, &ingest, &clock)?;
    if let Some(period) = sd_notify::watchdog_enabled() {
        let (ingest, token) = (ingest.clone(), token.clone());
        supervisor.spawn("watchdog", move |component| {
            watchdog(ingest.clone(), period, component, token.clone())
        });
    }
    drop(ingest);
    {
        let (offers, token, presence) = (offers.clone(), token.clone(), presence.clone());
        supervisor.spawn("offers", move |component| {
            let (offers, token) = (offers.clone(), token.clone());
            let (presence, completed) = (presence.subscribe(), completed_rx.clone());
            async move { offers.run(presence, completed, component, token).await }
        });
    }

    let ready = Arc::new(AtomicBool::new(false));
    let api_state = api_state(
        &config,
        &board,
        &outbox,
        &deadletters,
        &ready,
        &clock,
        metrics,
        http_registers,
        &profiles,
        &offers,
        &store,
        &token,
    )?;
    let (listening_tx, listening) = tokio::sync::oneshot::channel();
    {
        let state = api_state.clone();
        let token = token.clone();
        let mut listening_tx = Some(listening_tx);
        supervisor.spawn("api", move |component| {
            api::serve(
                api_bind,
                state.clone(),
                component,
                token.clone(),
                listening_tx.take(),
            )
        });
    }
    // "Started" means the local API answers. If its port is taken, the agent still runs (the
    // registers matter more) and the supervisor keeps retrying; status says why.
    if tokio::time::timeout(API_BIND_PATIENCE, listening)
        .await
        .is_err()
    {
        tracing::error!(bind = %api_bind, "the local API is not listening yet; see status for why");
    }
    ready.store(true, Ordering::SeqCst);
    // No-op outside systemd (no NOTIFY_SOCKET).
    if let Err(e) = sd_notify::notify(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status(&format!("store {} open, sources started", config.store.id)),
    ]) {
        tracing::warn!(error = %e, "could not tell systemd the agent is ready");
    }

    Ok(Agent {
        config,
        store,
        outbox,
        deadletters,
        board,
        api: api_state,
        profiles,
        presence,
        offers,
        signals,
        supervisor,
    })
}

/// The core: the profile cache and offer ledger, the engine with its commit hooks (KPIs first,
/// then attribution), what a power cut left owed to the cache, and the engine's task. Returns
/// the ingest handle the sources send to, and the completed transactions attribution reports.
async fn start_core(
    config: &Config,
    store: &Store,
    outbox: &Arc<Outbox>,
    deadletters: &Arc<DeadLetters>,
    clock: &SharedClock,
    supervisor: &Supervisor,
    token: &CancellationToken,
) -> Result<
    (
        IngestHandle,
        ProfileStore,
        OfferLedger,
        Arc<tokio::sync::Mutex<tokio::sync::mpsc::Receiver<crate::offers::live::Completed>>>,
        Signals,
    ),
    DaemonError,
> {
    let (ingest, rx) = crate::model::ingest::channel();
    let rx = Arc::new(tokio::sync::Mutex::new(rx));
    let profiles = ProfileStore::open_with(store, config.profiles.cache_entries)?;
    profiles.configure_followups(&config.signals.followups)?;
    let offer_ledger = OfferLedger::open(store)?;
    let signals = Signals::new(
        crate::signals::Settings {
            store_id: config.store.id.clone(),
            tz: config.time_zone(),
            kpi: config.profiles.kpi.clone(),
            config: config.signals.clone(),
        },
        clock.clone(),
        profiles.clone(),
        Occasions::new(store),
        Some(ingest.clone()),
    )
    .with_retention(retention(
        config,
        store,
        &profiles,
        &offer_ledger,
        deadletters,
    ));
    let (completed_tx, completed_rx) = tokio::sync::mpsc::channel(live::COMPLETED_CHANNEL);
    let completed_rx = Arc::new(tokio::sync::Mutex::new(completed_rx));
    // The durable step's other work, in this order: a redemption is attributed after the KPIs
    // of its transaction are in.
    let core = Engine::new(
        store.clone(),
        outbox.clone(),
        deadletters.clone(),
        config.store.id.clone(),
    )
    .with_hook(Arc::new(profiles.clone()))
    .with_hook(Arc::new(Attribution {
        profiles: profiles.clone(),
        ledger: offer_ledger.clone(),
        store_id: config.store.id.clone(),
        completed: completed_tx,
    }))
    .with_hook(Arc::new(signals.clone()))
    .with_reserve(config.storage.min_free_bytes);
    // What a power cut left owed to the profile cache is finished before anything new comes in.
    core.recover().await?;
    spawn_checkpoint(supervisor, store, token);
    {
        let token = token.clone();
        supervisor.spawn("engine", move |component| {
            let core = core.clone();
            let rx = rx.clone();
            let token = token.clone();
            async move {
                let mut rx = rx.lock().await;
                core.run(&mut rx, &component, &token).await
            }
        });
    }
    {
        let (signals, token) = (signals.clone(), token.clone());
        supervisor.spawn("signals", move |component| {
            let (signals, token) = (signals.clone(), token.clone());
            async move { signals.run(component, token).await }
        });
    }
    Ok((ingest, profiles, offer_ledger, completed_rx, signals))
}

/// The retentions the daily signals run applies (`[retention]`), oldest first.
fn retention(
    config: &Config,
    store: &Store,
    profiles: &ProfileStore,
    offer_ledger: &OfferLedger,
    deadletters: &Arc<DeadLetters>,
) -> Vec<crate::signals::Retention> {
    use crate::signals::Retention;
    let r = &config.retention;
    let days = |n: u32| jiff::SignedDuration::from_hours(24 * i64::from(n));
    let tz = config.time_zone();
    let (ledger_days, offer_days, occasion_days, deadletter_days) = (
        days(r.ledger_days),
        days(r.offer_history_days),
        days(r.occasion_days),
        days(r.deadletter_days),
    );
    let (p, o, oc, dl) = (
        profiles.clone(),
        offer_ledger.clone(),
        Occasions::new(store),
        deadletters.clone(),
    );
    vec![
        Retention {
            name: "ledger",
            prune: Box::new(move |now| {
                let before = (now - ledger_days).to_zoned(tz.clone()).date();
                p.prune_ledger(before)
            }),
        },
        Retention {
            name: "offer_history",
            prune: Box::new(move |now| Ok(o.prune(now - offer_days)? as u64)),
        },
        Retention {
            name: "occasions",
            prune: Box::new(move |now| Ok(oc.prune(now - occasion_days)? as u64)),
        },
        Retention {
            name: "dead_letters",
            prune: Box::new(move |now| Ok(dl.prune(now - deadletter_days)? as u64)),
        },
    ]
}

/// One task per register; returns the contexts of HTTP registers, which the local API serves.
fn start_registers(
    config: &Config,
    supervisor: &Supervisor,
    ingest: &IngestHandle,
    offers: &Offers,
    clock: &SharedClock,
    token: &CancellationToken,
) -> Result<std::collections::BTreeMap<String, RegisterContext>, DaemonError> {
    let mut http_registers = std::collections::BTreeMap::new();
    for register in &config.registers {
        let mut ctx = RegisterContext::new(config, register, ingest.clone(), clock.clone())
            .map_err(DaemonError::Setup)?;
        ctx.live = Some(Arc::new(offers.clone()));
        if register.transport == crate::config::Transport::Http {
            http_registers.insert(register.name.clone(), ctx.clone());
        }
        let register = register.clone();
        let token = token.clone();
        supervisor.spawn(format!("register.{}", register.name), move |component| {
            pos::run(register.clone(), ctx.clone(), component, token.clone())
        });
    }
    Ok(http_registers)
}

/// The periodic RFM scoring of the profiles.
fn spawn_rfm(
    config: &Config,
    supervisor: &Supervisor,
    profiles: &ProfileStore,
    clock: &SharedClock,
    token: &CancellationToken,
) {
    let (profiles, clock, tz, token) = (
        profiles.clone(),
        clock.clone(),
        config.time_zone(),
        token.clone(),
    );
    let every = Duration::from_secs(config.profiles.rfm_interval_s);
    supervisor.spawn("profiles.rfm", move |component| {
        crate::profiles::run_rfm(
            profiles.clone(),
            clock.clone(),
            tz.clone(),
            every,
            component,
            token.clone(),
        )
    });
}

/// Opens (or salvages) the store, and the outbox and dead letters in it.
async fn open_store(
    config: &Config,
    clock: &SharedClock,
) -> Result<
    (
        Store,
        Option<crate::store::Salvaged>,
        Arc<Outbox>,
        Arc<DeadLetters>,
    ),
    DaemonError,
> {
    let store = {
        let path = config.storage.path.clone();
        let options = config.storage.store_options();
        let now = clock.now();
        tokio::task::spawn_blocking(move || Store::open_or_salvage(&path, &options, now))
            .await
            .map_err(|e| DaemonError::Setup(format!("opening the store: {e}")))??
    };
    let (store, salvaged) = store;
    if let Some(m) = store.migrated() {
        tracing::info!(
            events = m.entries,
            dead_letters = m.deadletters,
            "store upgraded: the outbox moved from sled to outbox.redb with everything it held"
        );
    }
    let outbox = Arc::new(Outbox::open(
        &store,
        Limits {
            max_bytes: config.storage.max_outbox_bytes,
            seen_retention: Duration::from_secs(config.storage.seen_retention_days * 86_400),
            max_seen: config.storage.max_seen_ids,
            ttl: stream_ttls(&config.storage.ttl_s),
        },
        clock.clone(),
    )?);
    let deadletters = Arc::new(DeadLetters::open(
        &store,
        config.storage.max_deadletter_bytes,
    )?);
    tracing::info!(
        path = %store.path().display(),
        outbox_depth = outbox.depth(),
        "store open"
    );
    Ok((store, salvaged, outbox, deadletters))
}

/// The cache's durable point, for what the log's journal holds until then.
fn spawn_checkpoint(supervisor: &Supervisor, store: &Store, token: &CancellationToken) {
    let (store, token) = (store.clone(), token.clone());
    supervisor.spawn("storage.checkpoint", move |component| {
        let (store, token) = (store.clone(), token.clone());
        async move {
            component.running(None);
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(CHECKPOINT_EVERY) => {}
                    _ = token.cancelled() => return Ok::<(), DaemonError>(()),
                }
                store.checkpoint().await?;
            }
        }
    });
}

/// The offers core, with the operator's campaign file installed when there is one.
fn open_offers(
    config: &Config,
    clock: &SharedClock,
    store: &Store,
    profiles: &ProfileStore,
    offer_ledger: &OfferLedger,
    ingest: &IngestHandle,
) -> Result<Offers, DaemonError> {
    let offers = Offers::open(
        live::Settings {
            store_id: config.store.id.clone(),
            tz: config.time_zone(),
            kpi: config.profiles.kpi.clone(),
            register_lanes: config
                .registers
                .iter()
                .filter_map(|r| Some((r.name.clone(), r.lane.clone()?)))
                .collect(),
            prompt_ttl: Duration::from_secs(config.offers.prompt_ttl_s),
            enabled: config.offers.enabled,
        },
        clock.clone(),
        profiles.clone(),
        offer_ledger.clone(),
        Occasions::new(store),
        Some(ingest.clone()),
    )?;
    if let Some(file) = &config.offers.campaigns_file {
        let bytes = std::fs::read(file).map_err(|e| {
            DaemonError::Setup(format!("offers.campaigns_file: {}: {e}", file.display()))
        })?;
        offers.install(Slot::File, &bytes).map_err(|e| {
            DaemonError::Setup(format!("offers.campaigns_file: {}: {e}", file.display()))
        })?;
    }
    Ok(offers)
}

/// Profile and campaign sync from central over HTTPS, when `[central.https]` is configured.
fn start_syncs(
    config: &Config,
    supervisor: &Supervisor,
    store: &Store,
    eraser: &Eraser,
    offers: &Offers,
    token: &CancellationToken,
) -> Result<(), DaemonError> {
    if let Some(https) = &config.central.https {
        let syncer = Syncer {
            client: sync::client(&https.tls_files())
                .map_err(|e| DaemonError::Setup(format!("central.https: {e}")))?,
            base_url: https.base_url.clone(),
            store_id: config.store.id.clone(),
            token: https.token.clone(),
            page_size: config.profiles.sync_page_size,
            store: store.clone(),
            eraser: eraser.clone(),
        };
        let campaign_sync = CampaignSync {
            client: syncer.client.clone(),
            base_url: https.base_url.clone(),
            store_id: config.store.id.clone(),
            token: https.token.clone(),
            offers: offers.clone(),
        };
        let interval = Duration::from_secs(config.profiles.sync_interval_s);
        {
            let token = token.clone();
            supervisor.spawn("profiles.sync", move |component| {
                sync::run(syncer.clone(), interval, component, token.clone())
            });
        }
        let interval = Duration::from_secs(config.offers.campaign_poll_s);
        let token = token.clone();
        supervisor.spawn("offers.sync", move |component| {
            crate::offers::sync::run(campaign_sync.clone(), interval, component, token.clone())
        });
    }
    Ok(())
}

/// TTLs and the oldest-age gauges move with time, not with traffic.
fn spawn_outbox_expiry(supervisor: &Supervisor, outbox: &Arc<Outbox>, token: &CancellationToken) {
    let (outbox, token) = (outbox.clone(), token.clone());
    supervisor.spawn("outbox.expiry", move |component| {
        let (outbox, token) = (outbox.clone(), token.clone());
        async move {
            component.running(None);
            loop {
                let outbox2 = outbox.clone();
                tokio::task::spawn_blocking(move || outbox2.expire())
                    .await
                    .map_err(|e| DaemonError::Setup(format!("outbox expiry: {e}")))??;
                tokio::select! {
                    _ = tokio::time::sleep(OUTBOX_EXPIRY_EVERY) => {}
                    _ = token.cancelled() => return Ok::<(), DaemonError>(()),
                }
            }
        }
    });
}

/// The MQTT uplink, and the downlink task that applies what central sends down it.
#[allow(clippy::too_many_arguments)]
fn start_mqtt(
    config: &Config,
    supervisor: &Supervisor,
    store: &Store,
    outbox: &Arc<Outbox>,
    eraser: &Eraser,
    offers: &Offers,
    paths: &Arc<crate::uplink::PathState>,
    clock: &SharedClock,
    token: &CancellationToken,
) -> Result<(), DaemonError> {
    let Some(mut settings) = MqttSettings::from_config(config).map_err(DaemonError::Setup)? else {
        return Ok(());
    };
    let (down_tx, down_rx) = tokio::sync::mpsc::channel(DOWNLINK_CHANNEL);
    settings.downlink = Some(down_tx);
    let down_rx = Arc::new(tokio::sync::Mutex::new(down_rx));
    {
        let (store, eraser, token) = (store.clone(), eraser.clone(), token.clone());
        let offers = offers.clone();
        supervisor.spawn("profiles.downlink", move |component| {
            let offers = offers.clone();
            crate::profiles::downlink::run(
                down_rx.clone(),
                store.clone(),
                eraser.clone(),
                move |tenant_wide, body| {
                    let slot = if tenant_wide { Slot::Tenant } else { Slot::Store };
                    if let Err(e) = offers.install(slot, body) {
                        metrics::counter!("storelink_downlink_malformed_total").increment(1);
                        tracing::warn!(?slot, error = %e, "campaign set from central not installed; the last good set stays in force");
                    }
                },
                component,
                token.clone(),
            )
        });
    }
    let outbox = outbox.clone();
    let clock = clock.clone();
    let token = token.clone();
    let paths = paths.clone();
    supervisor.spawn("uplink.mqtt", move |component| {
        mqtt::run(
            settings.clone(),
            outbox.clone(),
            clock.clone(),
            paths.clone(),
            component,
            token.clone(),
        )
    });
    Ok(())
}

/// What the local API serves from.
#[allow(clippy::too_many_arguments)]
fn api_state(
    config: &Config,
    board: &StatusBoard,
    outbox: &Arc<Outbox>,
    deadletters: &Arc<DeadLetters>,
    ready: &Arc<AtomicBool>,
    clock: &SharedClock,
    metrics: metrics_exporter_prometheus::PrometheusHandle,
    http_registers: std::collections::BTreeMap<String, RegisterContext>,
    profiles: &ProfileStore,
    offers: &Offers,
    store: &Store,
    token: &CancellationToken,
) -> Result<ApiState, DaemonError> {
    Ok(ApiState {
        info: AgentInfo {
            version: env!("CARGO_PKG_VERSION"),
            store: config.store.id.clone(),
            tenant: config.store.tenant.clone(),
            started_at: clock.now(),
            topic_prefix: config.topic_prefix(),
            central_mqtt: config
                .central
                .mqtt
                .as_ref()
                .map(|m| without_credentials(&m.url)),
            registers: config.registers.iter().map(api::RegisterInfo::of).collect(),
        },
        board: board.clone(),
        outbox: outbox.clone(),
        deadletters: deadletters.clone(),
        ready: ready.clone(),
        clock: clock.clone(),
        metrics,
        registers: Arc::new(http_registers),
        profiles: profiles.clone(),
        tz: config.time_zone(),
        kpi: config.profiles.kpi.clone(),
        offers: offers.clone(),
        admin: AdminAuth::new(config.cashier.admin_token.as_ref()),
        lanes: LaneState {
            offers: offers.clone(),
            auth: LaneAuth::open(config.cashier.lane_secret.as_ref(), store)?,
            store: config.store.id.clone(),
            texts: Arc::new(
                config
                    .cashier
                    .languages()
                    .into_iter()
                    .filter_map(|l| Some((l.clone(), config.cashier.texts_for(&l)?)))
                    .collect(),
            ),
            language: config.cashier.language.clone(),
            token: token.clone(),
        },
        known_lanes: Arc::new(known_lanes(config)),
    })
}

/// Pings systemd's watchdog at a third of its period, and only while the core loop answers a
/// probe: a wedged engine (a stuck disk, a deadlock) stops the pings and systemd restarts the
/// agent, where a timer alone would keep a dead agent looking alive.
async fn watchdog(
    ingest: crate::model::ingest::IngestHandle,
    period: Duration,
    component: crate::supervisor::Component,
    token: CancellationToken,
) -> Result<(), DaemonError> {
    let every = period / 3;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = token.cancelled() => return Ok(()),
        }
        match tokio::time::timeout(every, ingest.probe()).await {
            Ok(Ok(())) => {
                if component.state() != Some(crate::supervisor::ComponentState::Running) {
                    component.running(Some(format!(
                        "systemd watchdog every {}s",
                        period.as_secs()
                    )));
                }
                if let Err(e) = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]) {
                    tracing::warn!(error = %e, "could not ping the systemd watchdog");
                }
            }
            Ok(Err(_)) => return Ok(()),
            Err(_) => {
                component.degraded("the core loop did not answer; withholding the watchdog ping");
                tracing::error!(
                    waited_ms = every.as_millis() as u64,
                    "the core loop did not answer; systemd will restart the agent if this lasts"
                );
            }
        }
    }
}

/// Lanes the config names: registers' lanes and presence zones' lanes.
pub fn known_lanes(config: &Config) -> Vec<String> {
    let mut lanes: Vec<String> = config
        .registers
        .iter()
        .filter_map(|r| r.lane.clone())
        .chain(config.presence.zones.iter().filter_map(|z| z.lane.clone()))
        .collect();
    lanes.sort();
    lanes.dedup();
    lanes
}

/// Starts the presence pipeline and, when one is configured, its advertisement source.
fn start_presence(
    config: &Config,
    store: &Store,
    profiles: &ProfileStore,
    supervisor: &Supervisor,
    ingest: &crate::model::ingest::IngestHandle,
    clock: &SharedClock,
) -> Result<tokio::sync::broadcast::Sender<PresenceEvent>, DaemonError> {
    let section = &config.presence;
    let (events, _) = tokio::sync::broadcast::channel(pipeline::EVENT_BROADCAST);
    let (ads_tx, ads_rx) = tokio::sync::mpsc::channel(pipeline::ADVERT_CHANNEL);
    let ads_rx = Arc::new(tokio::sync::Mutex::new(ads_rx));
    let pipeline = Pipeline {
        store_id: config.store.id.clone(),
        section: section.clone(),
        profiles: profiles.clone(),
        history: History::open(store, section.retention_days)?,
        ingest: ingest.clone(),
        events: events.clone(),
        clock: clock.clone(),
    };
    // The pipeline runs even without a source: it expires history, which retention promises
    // whatever the source setting is today.
    let token = supervisor.token().clone();
    supervisor.spawn("presence", move |component| {
        let pipeline = pipeline.clone();
        let ads_rx = ads_rx.clone();
        let token = token.clone();
        async move { pipeline.run(ads_rx, component, token).await }
    });

    let settings = match section.source {
        PresenceSource::None => return Ok(events),
        PresenceSource::Replay => section.replay.clone().map(source::SourceSettings::Replay),
        PresenceSource::MqttScanners => Some(source::SourceSettings::Scanners(
            section.scanners.clone().unwrap_or_default(),
        )),
        PresenceSource::Btleplug => Some(source::SourceSettings::Btleplug(
            section.btleplug.clone().unwrap_or_default(),
        )),
    };
    let (Some(settings), Some(tenant)) = (settings, section.service) else {
        return Err(DaemonError::Setup(
            "presence source settings were not validated".into(),
        ));
    };
    let clock = clock.clone();
    let token = supervisor.token().clone();
    supervisor.spawn("presence.source", move |component| {
        let settings = settings.clone();
        let ads_tx = ads_tx.clone();
        let clock = clock.clone();
        let token = token.clone();
        async move {
            let feed = source::Feed {
                tenant,
                out: ads_tx,
                clock,
                component,
                token,
            };
            settings.run(feed).await
        }
    });
    Ok(events)
}

impl Agent {
    /// Stops every task (bounded by [`SHUTDOWN_DEADLINE`]) and flushes the store.
    pub async fn shutdown(self) -> Result<(), DaemonError> {
        self.api.ready.store(false, Ordering::SeqCst);
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
        let clean = self.supervisor.shutdown(SHUTDOWN_DEADLINE).await;
        if !clean {
            tracing::warn!(
                deadline_s = SHUTDOWN_DEADLINE.as_secs(),
                "some tasks had not stopped by the deadline; flushing anyway"
            );
        }
        self.store.flush().await?;
        self.store.checkpoint().await?;
        tracing::info!(outbox_depth = self.outbox.depth(), "stopped; store flushed");
        Ok(())
    }
}

/// Runs the agent until `token` is cancelled.
pub async fn run(
    config: Config,
    clock: SharedClock,
    token: CancellationToken,
) -> Result<(), DaemonError> {
    let agent = start(config, clock, token.clone()).await?;
    tracing::info!(
        store = %agent.config.store.id,
        registers = agent.config.registers.len(),
        "storelink running"
    );
    token.cancelled().await;
    agent.shutdown().await
}

/// Cancels `token` on SIGINT or SIGTERM.
pub async fn cancel_on_signal(token: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; stop with SIGKILL only");
        return;
    };
    let name = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
        _ = token.cancelled() => return,
    };
    tracing::info!(signal = name, "shutting down");
    token.cancel();
}

/// The configured TTLs by outbox stream; 0 means none.
fn stream_ttls(
    ttl: &crate::config::StreamTtls,
) -> [Option<Duration>; crate::uplink::outbox::Stream::ALL.len()] {
    use crate::uplink::outbox::Stream;
    let mut out = [None; Stream::ALL.len()];
    for (stream, secs) in [
        (Stream::Presence, ttl.presence),
        (Stream::Offer, ttl.offer),
        (Stream::Status, ttl.status),
        (Stream::DeadLetter, ttl.deadletter),
    ] {
        out[stream as usize] = secs.filter(|s| *s > 0).map(Duration::from_secs);
    }
    out
}

/// Says loudly that the store was damaged and what was saved: an error in the log, the
/// `storage` component degraded for as long as this process runs, metrics, and a dead letter
/// that reaches central with the counts and the first unreadable bytes. The salvaged events
/// themselves are already back in the outbox and go to central like any others.
async fn report_salvage(
    s: &crate::store::Salvaged,
    config: &Config,
    board: &StatusBoard,
    deadletters: &DeadLetters,
    outbox: &Outbox,
    store: &Store,
    clock: &SharedClock,
) -> Result<(), DaemonError> {
    let mut parts = Vec::new();
    if s.log_damaged {
        parts.push(format!(
            "salvaged {} records from the damaged log ({} events for central, sent as usual); {} damaged records could not be read",
            s.records, s.events, s.unreadable
        ));
    }
    if s.cache_lost {
        parts.push("the profile cache was unreadable: profiles come back with the next sync from central, the damaged cache's KPIs and offer history are lost".to_string());
    }
    let what = format!(
        "the store was damaged and its files were moved to {}; the agent started with a fresh one: {} ({})",
        s.moved_to.display(),
        parts.join("; "),
        s.reason
    );
    tracing::error!(
        moved_to = %s.moved_to.display(),
        salvaged = s.records,
        events = s.events,
        unreadable = s.unreadable,
        cache_lost = s.cache_lost,
        reason = %s.reason,
        "store quarantined: damaged files moved aside, readable records salvaged into a fresh store"
    );
    metrics::counter!("storelink_store_quarantined_total").increment(1);
    metrics::counter!("storelink_store_salvaged_records_total").increment(s.records);
    metrics::counter!("storelink_store_unreadable_records_total").increment(s.unreadable);
    board.component("storage").degraded(&what);
    let now = clock.now();
    let letter = crate::deadletter::DeadLetter::new(
        &config.store.id,
        "storage",
        &what,
        now,
        s.sample.clone(),
        s.sample.len() as u64,
        s.sample.len(),
    );
    deadletters.record(std::slice::from_ref(&letter))?;
    outbox.append(&[crate::model::ingest::NewEvent {
        kind: crate::events::EventKind::DeadLetter,
        id: letter.id.clone(),
        payload: crate::events::encode(
            crate::events::EventKind::DeadLetter,
            &letter.id,
            &config.store.id,
            now,
            &letter,
        ),
    }])?;
    store.flush().await?;
    Ok(())
}

/// A broker URL fit for the status report: any `user:password@` taken out.
fn without_credentials(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => {
            let (authority, path) = rest.split_once('/').map_or((rest, ""), |(a, p)| (a, p));
            let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
            let slash = if rest.contains('/') { "/" } else { "" };
            format!("{scheme}://{host}{slash}{path}")
        }
        None => url.to_string(),
    }
}

#[cfg(test)]
mod report_tests {
    use super::without_credentials;

    #[test]
    fn broker_urls_lose_their_credentials_for_the_status_report() {
        assert_eq!(
            without_credentials("mqtt://127.0.0.1:1883"),
            "mqtt://127.0.0.1:1883"
        );
        assert_eq!(
            without_credentials("mqtts://gw:s3cret@broker.example:8883"),
            "mqtts://broker.example:8883"
        );
        assert_eq!(
            without_credentials("wss://u:p@x.example:443/mqtt"),
            "wss://x.example:443/mqtt"
        );
    }
}

#[cfg(test)]
mod load_tests {
    use super::load_config;

    /// What config alone cannot judge (a template's rules, a campaign set's JSON) is still
    /// reported by key and file before the agent starts.
    #[test]
    fn bad_templates_and_campaign_sets_are_config_problems() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("t.toml"), "no_such_key = 1\n").unwrap();
        std::fs::write(
            dir.path().join("c.json"),
            "{\"version\": 1, \"campaigns\": [tru",
        )
        .unwrap();
        let file = dir.path().join("storelink.toml");
        std::fs::write(
            &file,
            "[store]\nid = \"s042\"\ntenant = \"acme\"\n\n[central.mqtt]\nurl = \"mqtt://127.0.0.1:1883\"\n\n\
             [offers]\ncampaigns_file = \"c.json\"\n\n\
             [[registers]]\nname = \"r\"\nformat = \"receipt\"\ntemplate = \"t.toml\"\ntransport = { kind = \"http\" }\n",
        )
        .unwrap();
        let e = load_config(&file).unwrap_err();
        let keys: Vec<_> = e.problems().iter().map(|p| p.key.as_str()).collect();
        assert_eq!(keys, ["registers[0].template", "offers.campaigns_file"]);
        let text = e.to_string();
        assert!(
            text.contains(&format!("{}: registers[0].template", file.display())),
            "{text}"
        );
        assert!(text.contains("is not a campaign set"), "{text}");

        // Good files load.
        std::fs::copy(
            concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/config/receipts/supermarket.toml"
            ),
            dir.path().join("t.toml"),
        )
        .unwrap();
        std::fs::write(
            dir.path().join("c.json"),
            "{\"version\": 1, \"campaigns\": []}",
        )
        .unwrap();
        load_config(&file).unwrap();
    }
}
