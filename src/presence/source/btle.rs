//! The gateway's own Bluetooth adapter, through btleplug and BlueZ over D-Bus.
//!
//! What BlueZ does and does not let us choose, and what follows:
//! - **Active scanning only.** BlueZ's D-Bus discovery has no passive mode (only the
//!   experimental advertisement-monitor API scans passively, and btleplug does not use it), so
//!   the adapter sends scan requests. Harmless for us: a scan response only adds data.
//! - **Filters are merged across clients.** BlueZ ORs the discovery filters of every D-Bus
//!   client on the adapter, so a service-UUID filter would not keep other devices out. The scan
//!   runs unfiltered and the agent filters: [`advert::from_service_data`] and
//!   [`advert::from_manufacturer_data`] decide what is ours.
//! - **Duplicates.** btleplug's BlueZ backend starts discovery with `DuplicateData = true`
//!   (btleplug PR #290, "Devices sending multiple advertisements get filtered on bluez/linux",
//!   issue #289), so BlueZ signals ServiceData / ManufacturerData for every advertisement, not
//!   only when the bytes change. Those signals become `ServiceDataAdvertisement` /
//!   `ManufacturerDataAdvertisement` events, one sighting each. They carry no RSSI: it is read
//!   from the peripheral's properties, and only for peripherals whose payload is ours.
//! - **Peripherals.** On BlueZ btleplug caches nothing and has no call to remove a device
//!   (`clear_peripherals` is a no-op); BlueZ itself keeps a temporary device object for every
//!   random address it hears until discovery stops or its temporary timeout passes. The agent
//!   keeps its own last-seen map of peripherals whose payload was ours, keyed by a salted hash
//!   of the peripheral id (which on BlueZ is a D-Bus path containing the address), bounded in
//!   size and aged out after `age_out_s`. The scan is restarted now and then when no customer
//!   is tracked, so that BlueZ forgets the crowd of devices it has heard.
//! - **Watchdog.** Adapters and BlueZ sometimes stop reporting without an error. If no event of
//!   any kind arrives for `watchdog_s` while customers were seen in the last minutes, the scan
//!   is stopped and started again (`storelink_presence_btle_scan_restarts_total`).
//!
//! Invariants:
//! - The event stream is never blocked by the pipeline: sightings are offered with `try_send`
//!   and, when the channel is full, dropped and counted.
//! - No device address or peripheral id is logged, stored or put in a metric. Errors of
//!   per-peripheral D-Bus calls are counted, never logged: their text names the device path.
//! - No D-Bus or no adapter is an error for the supervisor (which retries with backoff), after
//!   the component was marked degraded with the reason. Nothing here panics on a machine
//!   without Bluetooth.
//! - One D-Bus connection per process: btleplug's connection task lives as long as its
//!   connection, so each restart would otherwise leak one. It is dropped and made anew only
//!   when D-Bus itself failed.

use std::collections::{BTreeMap, HashMap};
use std::hash::BuildHasher;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use btleplug::api::{
    Central as _, CentralEvent, CentralState, Manager as _, Peripheral as _, PeripheralProperties,
    ScanFilter,
};
use btleplug::platform::{Adapter, Manager, PeripheralId};
use futures_util::StreamExt;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::replay::{Hex, RecordedAdvert, write_line};
use super::{Feed, Source, SourceError, count_received};
use crate::clock::SharedClock;
use crate::config::BtleSettings;
use crate::presence::advert::{self, Advertisement, Payload};
use crate::supervisor::Component;

/// The scanner id of sightings heard by the gateway's own adapter.
pub const SCANNER: &str = "local";

/// How long a single D-Bus exchange may take before BlueZ counts as unreachable.
const DBUS_PATIENCE: Duration = Duration::from_secs(10);
/// Reading one peripheral's properties; a slow answer is a lost sighting, not an outage.
const PROPERTIES_PATIENCE: Duration = Duration::from_secs(2);
/// Most peripherals tracked at once; a store holds far fewer phones running the app.
const MAX_TRACKED: usize = 1024;
/// "Customers were seen in the last minutes", for the watchdog.
const RECENT_CUSTOMERS: Duration = Duration::from_secs(5 * 60);
/// Restart the scan after this long when no customer is tracked, so BlueZ drops old devices.
const REFRESH_WHEN_IDLE: Duration = Duration::from_secs(10 * 60);
/// …and after this long regardless; the gap is about a second.
const REFRESH_ALWAYS: Duration = Duration::from_secs(60 * 60);

/// The process's one D-Bus connection to BlueZ.
static MANAGER: Mutex<Option<Manager>> = Mutex::new(None);

async fn manager() -> Result<Manager, SourceError> {
    if let Some(m) = MANAGER.lock().expect("manager lock").clone() {
        return Ok(m);
    }
    // Manager::new connects to the system bus synchronously; keep that off the async workers
    // and bounded in time.
    let runtime = tokio::runtime::Handle::current();
    let connect = tokio::task::spawn_blocking(move || runtime.block_on(Manager::new()));
    let manager = match tokio::time::timeout(DBUS_PATIENCE, connect).await {
        Ok(Ok(Ok(m))) => m,
        Ok(Ok(Err(e))) => return Err(SourceError::DbusUnavailable(e.to_string())),
        Ok(Err(join)) => {
            return Err(SourceError::DbusUnavailable(format!(
                "connecting to the system bus failed: {join}"
            )));
        }
        Err(_) => {
            return Err(SourceError::DbusUnavailable(format!(
                "the system bus did not answer within {}s",
                DBUS_PATIENCE.as_secs()
            )));
        }
    };
    *MANAGER.lock().expect("manager lock") = Some(manager.clone());
    Ok(manager)
}

/// Drops the shared connection after D-Bus failed, so the next attempt connects anew.
fn forget_manager() {
    MANAGER.lock().expect("manager lock").take();
}

/// The configured adapter, or the first; errors are D-Bus or no-adapter errors.
async fn open_adapter(settings: &BtleSettings) -> Result<(Adapter, String), SourceError> {
    let manager = manager().await?;
    let adapters = match tokio::time::timeout(DBUS_PATIENCE, manager.adapters()).await {
        Ok(Ok(adapters)) => adapters,
        Ok(Err(e)) => {
            forget_manager();
            return Err(SourceError::DbusUnavailable(format!(
                "listing Bluetooth adapters: {e}"
            )));
        }
        Err(_) => {
            forget_manager();
            return Err(SourceError::DbusUnavailable(format!(
                "BlueZ did not list its adapters within {}s (is bluetoothd running?)",
                DBUS_PATIENCE.as_secs()
            )));
        }
    };
    let mut names = Vec::new();
    for adapter in adapters {
        // adapter_info is "hci0 (usb:v1D6Bp0246d0540)".
        let info = adapter.adapter_info().await.unwrap_or_default();
        let name = info
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_string();
        match &settings.adapter {
            Some(wanted) if *wanted != name => names.push(name),
            _ => return Ok((adapter, name)),
        }
    }
    Err(SourceError::NoAdapter(match &settings.adapter {
        Some(wanted) if names.is_empty() => {
            format!(
                "{wanted} not found: BlueZ reports no adapters (is one plugged in and not blocked by rfkill?)"
            )
        }
        Some(wanted) => format!(
            "{wanted} not found; BlueZ has {} (presence.btleplug.adapter)",
            names.join(", ")
        ),
        None => "BlueZ reports none (is one plugged in and not blocked by rfkill?)".into(),
    }))
}

fn adapter_error(adapter: &str, what: &str, e: btleplug::Error) -> SourceError {
    SourceError::Adapter {
        adapter: adapter.to_string(),
        reason: format!("{what}: {e}"),
    }
}

/// A presence payload in one advertisement event, with the iBeacon's calibrated power.
fn payload_of(event: &CentralEvent, tenant: &uuid::Uuid) -> Option<(Payload, Option<i16>)> {
    match event {
        CentralEvent::ServiceDataAdvertisement { service_data, .. } => service_data
            .iter()
            .find_map(|(service, data)| advert::from_service_data(service, data, tenant))
            .map(|payload| (payload, None)),
        CentralEvent::ManufacturerDataAdvertisement {
            manufacturer_data, ..
        } => manufacturer_data
            .iter()
            .find_map(|(company, data)| advert::from_manufacturer_data(*company, data, tenant)),
        _ => None,
    }
}

fn advertised_id(event: &CentralEvent) -> Option<&PeripheralId> {
    match event {
        CentralEvent::ServiceDataAdvertisement { id, .. }
        | CentralEvent::ManufacturerDataAdvertisement { id, .. } => Some(id),
        _ => None,
    }
}

/// The peripheral's current properties (RSSI above all), or `None` when BlueZ did not say in
/// time. Failures are counted only: their text names the device.
async fn properties(adapter: &Adapter, id: &PeripheralId) -> Option<PeripheralProperties> {
    let fetch = async { adapter.peripheral(id).await?.properties().await };
    match tokio::time::timeout(PROPERTIES_PATIENCE, fetch).await {
        Ok(Ok(Some(p))) => Some(p),
        _ => {
            metrics::counter!("storelink_presence_btle_property_errors_total").increment(1);
            None
        }
    }
}

/// Last-seen times of peripherals whose payload was ours, under an opaque key.
struct Tracked {
    /// Keyed SipHash with keys random per run: the key cannot be turned back into an id.
    hasher: std::collections::hash_map::RandomState,
    last_seen: HashMap<u64, Instant>,
    age_out: Duration,
    last_customer: Option<Instant>,
}

impl Tracked {
    fn new(age_out: Duration) -> Tracked {
        Tracked {
            hasher: Default::default(),
            last_seen: HashMap::new(),
            age_out,
            last_customer: None,
        }
    }

    fn touch(&mut self, id: &impl std::hash::Hash, now: Instant) {
        let key = self.hasher.hash_one(id);
        if self.last_seen.len() >= MAX_TRACKED && !self.last_seen.contains_key(&key) {
            self.age_out(now);
            if self.last_seen.len() >= MAX_TRACKED
                && let Some(oldest) = self
                    .last_seen
                    .iter()
                    .min_by_key(|(_, seen)| **seen)
                    .map(|(k, _)| *k)
            {
                self.last_seen.remove(&oldest);
            }
        }
        self.last_seen.insert(key, now);
        self.last_customer = Some(now);
    }

    fn age_out(&mut self, now: Instant) {
        let age_out = self.age_out;
        self.last_seen
            .retain(|_, seen| now.saturating_duration_since(*seen) < age_out);
        metrics::gauge!("storelink_presence_btle_tracked").set(self.last_seen.len() as f64);
    }

    fn customers_recently(&self, now: Instant) -> bool {
        self.last_customer
            .is_some_and(|at| now.saturating_duration_since(at) <= RECENT_CUSTOMERS)
    }
}

/// Why the scan should be restarted now, if it should: the watchdog (silence for `watchdog`
/// while customers were about, at most once per `watchdog`), or a refresh that lets BlueZ forget
/// the devices it heard (when no customer is tracked, or after a long time regardless).
fn restart_reason(
    now: Instant,
    last_event: Instant,
    last_restart: Instant,
    watchdog: Duration,
    tracked: &Tracked,
) -> Option<&'static str> {
    let silent = now.saturating_duration_since(last_event) >= watchdog;
    let since_restart = now.saturating_duration_since(last_restart);
    if silent && tracked.customers_recently(now) && since_restart >= watchdog {
        Some("watchdog")
    } else if (tracked.last_seen.is_empty() && since_restart >= REFRESH_WHEN_IDLE)
        || since_restart >= REFRESH_ALWAYS
    {
        Some("refresh")
    } else {
        None
    }
}

/// Stops and starts discovery; BlueZ keeps scanning meanwhile if another client also scans.
async fn restart_scan(
    adapter: &Adapter,
    name: &str,
    reason: &'static str,
) -> Result<(), SourceError> {
    metrics::counter!("storelink_presence_btle_scan_restarts_total", "reason" => reason)
        .increment(1);
    let _ = tokio::time::timeout(DBUS_PATIENCE, adapter.stop_scan()).await;
    start_scan(adapter, name).await
}

async fn start_scan(adapter: &Adapter, name: &str) -> Result<(), SourceError> {
    match tokio::time::timeout(DBUS_PATIENCE, adapter.start_scan(ScanFilter::default())).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(adapter_error(name, "starting the scan", e)),
        Err(_) => Err(SourceError::Adapter {
            adapter: name.to_string(),
            reason: format!(
                "BlueZ did not start the scan within {}s",
                DBUS_PATIENCE.as_secs()
            ),
        }),
    }
}

/// Opens the adapter, subscribes to its events and starts scanning; marks the component
/// degraded with the reason when any of that fails.
async fn open_and_scan(
    settings: &BtleSettings,
    component: Option<&Component>,
) -> Result<
    (
        Adapter,
        String,
        std::pin::Pin<Box<dyn futures_util::Stream<Item = CentralEvent> + Send>>,
    ),
    SourceError,
> {
    let opened = async {
        let (adapter, name) = open_adapter(settings).await?;
        let events = match tokio::time::timeout(DBUS_PATIENCE, adapter.events()).await {
            Ok(Ok(events)) => events,
            Ok(Err(e)) => return Err(adapter_error(&name, "subscribing to events", e)),
            Err(_) => {
                forget_manager();
                return Err(SourceError::DbusUnavailable(
                    "BlueZ did not answer the event subscription".into(),
                ));
            }
        };
        start_scan(&adapter, &name).await?;
        Ok((adapter, name, events))
    }
    .await;
    if let (Err(e), Some(component)) = (&opened, component) {
        component.degraded(e);
    }
    opened
}

impl Source for BtleSettings {
    /// Scans with the local adapter and hands on the tenant's sightings until cancelled.
    async fn run(&self, feed: Feed) -> Result<(), SourceError> {
        // A gateway without an adapter (or without BlueZ) stays degraded, not failed: the rest of
        // the agent runs, status says why, and the adapter is looked for again with backoff, so a
        // dongle plugged in later is picked up without a restart.
        let mut backoff =
            crate::supervisor::Backoff::new(Duration::from_secs(2), Duration::from_secs(60));
        let mut warned = false;
        let (adapter, name, mut events) = loop {
            match open_and_scan(self, Some(&feed.component)).await {
                Ok(opened) => break opened,
                Err(e) => {
                    let delay = backoff.next_delay();
                    if warned {
                        tracing::debug!(error = %e, retry_in_s = delay.as_secs(), "BLE adapter still unavailable");
                    } else {
                        tracing::warn!(error = %e, retry_in_s = delay.as_secs(), "BLE presence degraded: no usable adapter; retrying");
                        warned = true;
                    }
                    tokio::select! {
                        _ = feed.token.cancelled() => return Ok(()),
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        };
        feed.component.running(Some(format!("scanning on {name}")));
        tracing::info!(adapter = %name, "BLE presence scan started");

        let scanner: Arc<str> = Arc::from(SCANNER);
        let watchdog = Duration::from_secs(u64::from(self.watchdog_s.max(1)));
        let mut tracked = Tracked::new(Duration::from_secs(u64::from(self.age_out_s.max(1))));
        let mut last_event = Instant::now();
        let mut last_restart = Instant::now();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

        loop {
            let event = tokio::select! {
                _ = feed.token.cancelled() => break,
                _ = tick.tick() => {
                    let now = Instant::now();
                    tracked.age_out(now);
                    let Some(reason) =
                        restart_reason(now, last_event, last_restart, watchdog, &tracked)
                    else {
                        continue;
                    };
                    if reason == "watchdog" {
                        tracing::warn!(adapter = %name, silent_s = watchdog.as_secs(), "no BLE events while customers were about; restarting the scan");
                    }
                    if let Err(e) = restart_scan(&adapter, &name, reason).await {
                        feed.component.degraded(&e);
                        return Err(e);
                    }
                    last_restart = now;
                    last_event = now;
                    continue;
                }
                event = events.next() => event,
            };
            let Some(event) = event else {
                forget_manager();
                let e = SourceError::DbusUnavailable("the BlueZ event stream ended".into());
                feed.component.degraded(&e);
                return Err(e);
            };
            last_event = Instant::now();
            match &event {
                CentralEvent::StateUpdate(CentralState::PoweredOff) => {
                    feed.component.degraded(format!("{name} is powered off"));
                    continue;
                }
                CentralEvent::StateUpdate(CentralState::PoweredOn) => {
                    // Discovery does not survive a power cycle.
                    if let Err(e) = restart_scan(&adapter, &name, "powered_on").await {
                        feed.component.degraded(&e);
                        return Err(e);
                    }
                    last_restart = Instant::now();
                    feed.component.running(Some(format!("scanning on {name}")));
                    continue;
                }
                _ => {}
            }
            let (Some((payload, calibrated)), Some(id)) =
                (payload_of(&event, &feed.tenant), advertised_id(&event))
            else {
                continue;
            };
            tracked.touch(id, last_event);
            let Some(props) = properties(&adapter, id).await else {
                continue;
            };
            // No RSSI means BlueZ no longer hears the device; not a sighting.
            let Some(rssi) = props.rssi else {
                continue;
            };
            count_received("btleplug");
            feed.component.success();
            let advert = Advertisement {
                at: feed.clock.now(),
                scanner: scanner.clone(),
                rssi,
                // BlueZ's TxPower is power at the antenna, some 40 dB above what a phone reads at
                // 1 m; only an iBeacon's calibrated byte means "RSSI at 1 m".
                tx_power: calibrated,
                distance_m: None,
                payload,
            };
            match feed.out.try_send(advert) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(_)) => {
                    metrics::counter!("storelink_presence_adverts_dropped_total", "source" => "btleplug")
                    .increment(1);
                }
                Err(mpsc::error::TrySendError::Closed(_)) => return Err(SourceError::Closed),
            }
        }
        let _ = tokio::time::timeout(DBUS_PATIENCE, adapter.stop_scan()).await;
        Ok(())
    }
}

/// `device` of a recorded line: the first 8 bytes of SHA-256(salt ‖ address), in hex.
pub fn device_hash(salt: &[u8; 32], address: &[u8; 6]) -> String {
    let digest = Sha256::new()
        .chain_update(salt)
        .chain_update(address)
        .finalize();
    super::replay::to_hex(&digest[..8])
}

/// `storelink ble record`: writes every advertisement the adapter hears, ours or not, to `out`
/// in the replay format, until `duration` passes or the token is cancelled. Returns how many
/// lines were written.
///
/// Devices are told apart by [`device_hash`] with a salt drawn for this recording and never
/// written anywhere, so lines from two recordings cannot be linked and no address is written.
pub async fn record(
    settings: &BtleSettings,
    out: PathBuf,
    duration: Option<Duration>,
    clock: SharedClock,
    token: CancellationToken,
) -> Result<u64, SourceError> {
    let write_error = |source| SourceError::Record {
        path: out.clone(),
        source,
    };
    // The adapter first: a machine without Bluetooth leaves no empty recording behind.
    let (adapter, name, mut events) = open_and_scan(settings, None).await?;
    let file = match tokio::fs::File::create(&out).await {
        Ok(file) => file,
        Err(e) => {
            let _ = tokio::time::timeout(DBUS_PATIENCE, adapter.stop_scan()).await;
            return Err(write_error(e));
        }
    };
    let mut file = tokio::io::BufWriter::new(file);
    tracing::info!(adapter = %name, file = %out.display(), "recording advertisements");
    let salt: [u8; 32] = rand::random();
    let deadline = duration.and_then(|d| Instant::now().checked_add(d));
    let mut written = 0u64;
    loop {
        let event = tokio::select! {
            _ = token.cancelled() => break,
            _ = until(deadline) => break,
            event = events.next() => event,
        };
        let Some(event) = event else {
            forget_manager();
            return Err(SourceError::DbusUnavailable(
                "the BlueZ event stream ended".into(),
            ));
        };
        let (service_data, manufacturer_data) = match &event {
            CentralEvent::ServiceDataAdvertisement { service_data, .. } => (
                service_data
                    .iter()
                    .map(|(k, v)| (*k, Hex(v.clone())))
                    .collect(),
                BTreeMap::new(),
            ),
            CentralEvent::ManufacturerDataAdvertisement {
                manufacturer_data, ..
            } => (
                BTreeMap::new(),
                manufacturer_data
                    .iter()
                    .map(|(k, v)| (*k, Hex(v.clone())))
                    .collect(),
            ),
            _ => continue,
        };
        let Some(id) = advertised_id(&event) else {
            continue;
        };
        let Some(props) = properties(&adapter, id).await else {
            continue;
        };
        let Some(rssi) = props.rssi else {
            continue;
        };
        let line = write_line(&RecordedAdvert {
            t: clock.now(),
            scanner: SCANNER.to_string(),
            rssi,
            // The replay format's tx_power is RSSI at 1 m; BlueZ's TxPower is not (see run).
            tx_power: None,
            distance: None,
            service_data,
            manufacturer_data,
            device: Some(device_hash(&salt, &props.address.into_inner())),
        });
        file.write_all(line.as_bytes()).await.map_err(write_error)?;
        written += 1;
    }
    let _ = tokio::time::timeout(DBUS_PATIENCE, adapter.stop_scan()).await;
    file.flush().await.map_err(write_error)?;
    Ok(written)
}

async fn until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_defaults() {
        let s: BtleSettings = toml::from_str("").unwrap();
        assert_eq!(s, BtleSettings::default());
        assert_eq!((s.age_out_s, s.watchdog_s), (30, 120));
        assert!(toml::from_str::<BtleSettings>("service_uuid = \"feaa\"").is_err());
    }

    #[test]
    fn device_hashes_depend_on_the_salt_and_hide_the_address() {
        let address = [0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0xff];
        let a = device_hash(&[1; 32], &address);
        assert_eq!(a.len(), 16);
        assert_eq!(a, device_hash(&[1; 32], &address));
        assert_ne!(a, device_hash(&[2; 32], &address));
        assert!(!a.contains("aabb"));
    }

    #[tokio::test(start_paused = true)]
    async fn the_watchdog_fires_on_silence_only_while_customers_were_about() {
        let watchdog = Duration::from_secs(120);
        let start = Instant::now();
        let mut tracked = Tracked::new(Duration::from_secs(30));
        let at = |s: u64| start + Duration::from_secs(s);
        // Silence in an empty store is not a fault, and a refresh waits for ten minutes.
        assert_eq!(
            restart_reason(at(300), start, start, watchdog, &tracked),
            None
        );
        assert_eq!(
            restart_reason(at(601), start, start, watchdog, &tracked),
            Some("refresh")
        );
        // A customer at 10 s, then nothing at all for two minutes.
        tracked.touch(&"phone", at(10));
        assert_eq!(
            restart_reason(at(100), at(10), start, watchdog, &tracked),
            None
        );
        assert_eq!(
            restart_reason(at(130), at(10), start, watchdog, &tracked),
            Some("watchdog")
        );
        // Not again before another watchdog period has passed since that restart.
        assert_eq!(
            restart_reason(at(200), at(10), at(130), watchdog, &tracked),
            None
        );
        // Customers long gone: silence is normal again; a tracked customer holds off a refresh
        // until the hour is up.
        tracked.touch(&"phone", at(3000));
        let later = at(3000) + RECENT_CUSTOMERS + Duration::from_secs(1);
        assert_eq!(
            restart_reason(later, at(3000), at(3000), watchdog, &tracked),
            None
        );
        assert_eq!(
            restart_reason(
                at(3000) + REFRESH_ALWAYS,
                at(3000),
                at(3000),
                watchdog,
                &tracked
            ),
            Some("refresh")
        );
    }

    #[tokio::test(start_paused = true)]
    async fn tracked_peripherals_age_out_and_stay_bounded() {
        let mut t = Tracked::new(Duration::from_secs(30));
        let now = Instant::now();
        // Stand-ins for BlueZ device paths; the map only ever sees their salted hash.
        let ids: Vec<String> = (0..MAX_TRACKED + 10)
            .map(|i| {
                format!(
                    "/org/bluez/hci0/dev_00_00_00_00_{:02X}_{:02X}",
                    i / 256,
                    i % 256
                )
            })
            .collect();
        for id in &ids {
            t.touch(id, now);
        }
        assert_eq!(t.last_seen.len(), MAX_TRACKED);
        assert!(t.customers_recently(now));
        t.age_out(now + Duration::from_secs(31));
        assert!(t.last_seen.is_empty());
        assert!(t.customers_recently(now + Duration::from_secs(31)));
        assert!(!t.customers_recently(now + RECENT_CUSTOMERS + Duration::from_secs(1)));
    }
}
