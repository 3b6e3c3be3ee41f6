//! Customer signals: what the store learns about its customers, sent to central for the BI and
//! email tools. `storelink.customer.v1` is a KPI snapshot of one customer; `storelink.trigger.v1`
//! a lifecycle trigger (`winback_due` per product group, `next_purchase_due`, `became_passive`,
//! `birthday`, `first_purchase`, `points_expiring`).
//!
//! When they are evaluated:
//! - after a loyalty transaction is durable (the [`CommitHook`] marks its customer), within a
//!   few seconds: `first_purchase`, and a snapshot when what a marketer segments on changed;
//! - daily at `signals.daily_at` in the store's time zone, over every customer with KPIs, and
//!   at start when that run was missed while the agent was down: every trigger, and a snapshot
//!   where the day alone changed the class (New → Loyal → Passive).
//!
//! Invariants:
//! - Only for customers whose profile carries `marketing` consent: no snapshot and no trigger
//!   for anyone else, who still counts in the store's anonymous aggregates (RFM breakpoints,
//!   the follow-up model).
//! - A trigger fires once per customer and occasion: its event and its occasion are written in
//!   one transaction ([`crate::occasions`], `Ingest::Once`), so neither a restart, a replayed
//!   transaction nor a power cut sends one twice. The event id is derived from the occasion.
//! - A snapshot is sent only when its segment digest changed, and at most once per customer per
//!   `signals.snapshot_every_s`; a change inside that window waits for its end. The digest
//!   leaves out what moves every day by itself (days since the last purchase, P(alive), CLV).
//! - Time is the injected clock's; "today" is the store's business day.
//! - The daily run reads on a blocking thread and queues through the bounded ingest channel,
//!   keeping at most [`BACKLOG`] items waiting there, so a register's transaction never
//!   queues behind a day's worth of signals.
//! - Customer ids appear in logs at debug level only.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use jiff::Timestamp;
use jiff::civil::Date;
use jiff::tz::TimeZone;
use serde::Serialize;
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use crate::clock::SharedClock;
use crate::config::SignalsConfig;
use crate::events::{self, EventKind, short_hash};
use crate::model::ingest::{CommitHook, Committed, IngestHandle, NewEvent, StepOutput};
use crate::occasions::{OccasionKey, Occasions, Scope};
use crate::profiles::kpi::{Activity, KpiConfig, KpiView, Kpis, Rfm};
use crate::profiles::{Profile, ProfileStore};
use crate::store::StoreError;
use crate::supervisor::Component;

/// Most items the run lets wait in the ingest channel before it waits itself: a register's
/// transaction then never queues behind more than this many signals (plus one group commit).
const BACKLOG: usize = 64;

/// How often customers marked by a transaction are looked at.
const FLUSH_EVERY: Duration = Duration::from_secs(5);

/// The fact holding the business day of the last daily run.
const DAILY_FACT: &str = "signals.daily";

/// The occasion key's trigger name for the snapshot record (one per customer).
const SNAPSHOT: &str = "customer.v1";

/// What the service needs to know about the store.
#[derive(Debug, Clone)]
pub struct Settings {
    pub store_id: String,
    pub tz: TimeZone,
    pub kpi: KpiConfig,
    pub config: SignalsConfig,
}

/// Where a trigger was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Detected {
    /// The daily run (or the catch-up run at start).
    Schedule,
    /// Right after one of the customer's transactions.
    Transaction,
}

/// One lifecycle trigger that is due.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Due {
    pub trigger: &'static str,
    /// What makes it new: the trigger fires once per customer and occasion.
    pub occasion: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// The day it was due (next purchase, group rhythm, birthday, expiry).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub due: Option<Date>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub days_overdue: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub interval_days: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub points: Option<i64>,
}

impl Due {
    fn new(trigger: &'static str, occasion: String) -> Due {
        Due {
            trigger,
            occasion,
            group: None,
            due: None,
            days_overdue: None,
            interval_days: None,
            points: None,
        }
    }
}

/// The `data` of `storelink.trigger.v1`.
#[derive(Debug, Clone, Serialize)]
pub struct TriggerData<'a> {
    pub store: &'a str,
    pub customer_id: &'a str,
    #[serde(flatten)]
    pub due: &'a Due,
    pub activity: Option<Activity>,
    pub as_of: Date,
    pub detected: Detected,
}

/// A product group's rhythm in a snapshot.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GroupRhythm {
    pub purchase_days: u32,
    pub last: Option<Date>,
    /// Median days between purchase days in the group.
    pub interval_days: Option<f64>,
    pub next_due: Option<Date>,
    pub overdue: bool,
}

/// The `data` of `storelink.customer.v1`.
#[derive(Debug, Clone, Serialize)]
pub struct Snapshot<'a> {
    pub store: &'a str,
    pub customer_id: &'a str,
    pub as_of: Date,
    #[serde(flatten)]
    pub segment: Segment,
    pub days_since_last: Option<i32>,
    pub p_alive: Option<f64>,
    /// Minor units.
    pub clv: Option<i64>,
}

/// What a marketer segments on: the part of a snapshot whose change sends a new one.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Segment {
    pub activity: Option<Activity>,
    pub activity_since: Option<Date>,
    pub purchases: u32,
    pub first_purchase: Option<Date>,
    pub last_purchase: Option<Date>,
    /// Median days between purchase days.
    pub purchase_interval_days: Option<f64>,
    pub next_purchase_due: Option<Date>,
    pub overdue: bool,
    pub groups: BTreeMap<String, GroupRhythm>,
    pub overdue_groups: Vec<String>,
    pub rfm: Option<Rfm>,
    /// Minor units: the last 365 days and the 365 before them.
    pub revenue_12m: i64,
    pub revenue_prev_12m: i64,
    pub mean_basket: Option<i64>,
}

impl Segment {
    pub fn of(kpis: &Kpis, view: &KpiView, today: Date, config: &KpiConfig) -> Segment {
        Segment {
            activity: view.activity,
            activity_since: kpis.activity_since(today, config),
            purchases: kpis.purchases,
            first_purchase: kpis.rhythm.first,
            last_purchase: kpis.rhythm.last,
            purchase_interval_days: kpis.rhythm.median_interval_days,
            next_purchase_due: view.next_purchase_due,
            overdue: view.overdue,
            groups: kpis
                .groups
                .iter()
                .map(|(g, r)| {
                    (
                        g.clone(),
                        GroupRhythm {
                            purchase_days: r.purchase_days,
                            last: r.last,
                            interval_days: r.median_interval_days,
                            next_due: r.next_due(),
                            overdue: r.overdue(today, config.overdue_factor),
                        },
                    )
                })
                .collect(),
            overdue_groups: view.overdue_groups.clone(),
            rfm: view.rfm,
            revenue_12m: view.revenue_12m,
            revenue_prev_12m: view.revenue_prev_12m,
            mean_basket: kpis.mean_basket,
        }
    }

    /// The token of the snapshot record: a digest of everything here.
    pub fn digest(&self) -> u64 {
        let bytes = serde_json::to_vec(self).expect("segments serialise");
        let d = Sha256::digest(&bytes);
        u64::from_be_bytes(d[..8].try_into().expect("SHA-256 is 32 bytes"))
    }
}

/// The lifecycle triggers due for a customer on `today`. Pure: the caller decides which are
/// new (the occasion memory) and whether the customer consents.
///
/// A trigger whose moment (the day a rhythm became overdue, the day the next purchase was
/// due, the day the customer turned Passive, the first purchase) lies before `horizon` is
/// history, not news: it shows in the customer's snapshot and is not sent (see
/// `signals.catch_up_days`). The birthday and the points expiry look ahead instead.
pub fn due_triggers(
    profile: &Profile,
    kpis: &Kpis,
    view: &KpiView,
    today: Date,
    horizon: Date,
    kpi: &KpiConfig,
    config: &SignalsConfig,
) -> Vec<Due> {
    let mut out = Vec::new();
    let days = |a: Date, b: Date| (a - b).get_days();
    let news = |moment: Option<Date>| moment.is_some_and(|m| m >= horizon);
    for (group, rhythm) in &kpis.groups {
        if !rhythm.overdue(today, kpi.overdue_factor)
            || !news(rhythm.overdue_from(kpi.overdue_factor))
        {
            continue;
        }
        let (Some(last), Some(due)) = (rhythm.last, rhythm.next_due()) else {
            continue;
        };
        let mut d = Due::new("winback_due", format!("{group}:{last}"));
        d.group = Some(group.clone());
        d.due = Some(due);
        d.days_overdue = Some(days(today, due));
        d.interval_days = rhythm.median_interval_days;
        out.push(d);
    }
    if let Some(due) = kpis.rhythm.next_due()
        && due <= today
        && due >= horizon
    {
        let mut d = Due::new("next_purchase_due", due.to_string());
        d.due = Some(due);
        d.days_overdue = Some(days(today, due));
        d.interval_days = kpis.rhythm.median_interval_days;
        out.push(d);
    }
    if view.activity == Some(Activity::Passive)
        && let Some(last) = kpis.rhythm.last
        && let since = kpis.activity_since(today, kpi)
        && news(since)
    {
        let mut d = Due::new("became_passive", last.to_string());
        d.due = since;
        out.push(d);
    }
    if let Some(first) = kpis.rhythm.first
        && first >= horizon
    {
        let mut d = Due::new("first_purchase", String::new());
        d.due = Some(first);
        out.push(d);
    }
    if let Some(next) = profile.birthday.and_then(|b| b.next_from(today))
        && days(next, today) <= i32::try_from(config.birthday_days_ahead).unwrap_or(0)
    {
        let mut d = Due::new("birthday", next.year().to_string());
        d.due = Some(next);
        out.push(d);
    }
    if let Some(e) = profile.points_expiring
        && e.points > 0
        && e.on >= today
        && days(e.on, today) <= i32::try_from(config.points_expiry_days_ahead).unwrap_or(0)
    {
        let mut d = Due::new("points_expiring", e.on.to_string());
        d.due = Some(e.on);
        d.points = Some(e.points);
        out.push(d);
    }
    out
}

/// What every customer's view shares in one run: central's model and the RFM breakpoints.
struct StoreWide {
    model: Option<crate::profiles::kpi::ModelParams>,
    rfm: Option<crate::profiles::kpi::RfmBreakpoints>,
}

impl StoreWide {
    fn read(p: &ProfileStore) -> Result<StoreWide, StoreError> {
        Ok(StoreWide {
            model: p.model()?,
            rfm: p.rfm_breakpoints()?,
        })
    }
}

/// One look at customers: when, why, and what they all share.
struct Look {
    today: Date,
    /// The earliest moment a trigger is still news on ([`due_triggers`]).
    horizon: Date,
    now: Timestamp,
    detected: Detected,
    wide: StoreWide,
}

/// What one daily run did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RunReport {
    pub customers: u64,
    /// Of those, with `marketing` consent.
    pub consenting: u64,
    pub triggers: u64,
    pub snapshots: u64,
    /// Follow-up pairs sent in `storelink.followups.v1`.
    pub followup_pairs: u64,
    /// Records each retention removed, by keeper.
    pub pruned: Vec<(&'static str, u64)>,
}

/// The `data` of `storelink.followups.v1`.
#[derive(Debug, Clone, Serialize)]
pub struct FollowUpsData<'a> {
    pub store: &'a str,
    pub as_of: Date,
    pub window_days: u32,
    pub customers: u64,
    pub pairs: Vec<crate::profiles::followups::Pair>,
}

/// One keeper's retention, run by the daily run: forgets what is older than its limit as of
/// the given time, and says how many records went.
pub struct Retention {
    pub name: &'static str,
    pub prune: Box<dyn Fn(Timestamp) -> Result<u64, StoreError> + Send + Sync>,
}

#[derive(Debug, thiserror::Error)]
pub enum SignalsError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the agent is stopping")]
    Stopping,
}

/// The signals service.
#[derive(Clone)]
pub struct Signals {
    inner: Arc<Inner>,
}

struct Inner {
    settings: Settings,
    clock: SharedClock,
    profiles: ProfileStore,
    occasions: Occasions,
    ingest: Option<IngestHandle>,
    /// Loyalty ids (or cards) of customers whose transactions committed since the last look.
    dirty: Mutex<HashSet<String>>,
    retention: Vec<Retention>,
}

impl std::fmt::Debug for Signals {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signals").finish_non_exhaustive()
    }
}

impl Signals {
    pub fn new(
        settings: Settings,
        clock: SharedClock,
        profiles: ProfileStore,
        occasions: Occasions,
        ingest: Option<IngestHandle>,
    ) -> Signals {
        Signals {
            inner: Arc::new(Inner {
                settings,
                clock,
                profiles,
                occasions,
                ingest,
                dirty: Mutex::new(HashSet::new()),
                retention: Vec::new(),
            }),
        }
    }

    /// Adds the retentions the daily run applies (before the service is shared).
    pub fn with_retention(mut self, retention: Vec<Retention>) -> Signals {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.retention = retention;
        }
        self
    }

    fn today(&self, at: Timestamp) -> Date {
        at.to_zoned(self.inner.settings.tz.clone()).date()
    }

    /// `signals.catch_up_days` before `today`.
    fn catch_up_from(&self, today: Date) -> Date {
        let back = i64::from(self.inner.settings.config.catch_up_days);
        today
            .checked_sub(jiff::Span::new().days(back))
            .unwrap_or(Date::MIN)
    }

    fn dirty(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.inner
            .dirty
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Looks at one customer: queues the triggers due that are new, and a snapshot when its
    /// segment changed and the coalescing window allows. Returns false when the snapshot has
    /// to wait for the end of its window.
    fn consider(
        &self,
        customer: &str,
        kpis: &Kpis,
        look: &Look,
        report: &mut RunReport,
    ) -> Result<bool, SignalsError> {
        let Look {
            today,
            horizon,
            now,
            detected,
            wide: store_wide,
        } = look;
        let (today, horizon, now, detected) = (*today, *horizon, *now, *detected);
        let s = &self.inner.settings;
        let p = &self.inner.profiles;
        report.customers += 1;
        let Some(profile) = p.peek(customer)? else {
            return Ok(true);
        };
        if !profile.consents.marketing {
            return Ok(true);
        }
        report.consenting += 1;
        let view = kpis.view(
            today,
            &s.kpi,
            store_wide.model.as_ref(),
            store_wide.rfm.as_ref(),
        );
        let Some(ingest) = &self.inner.ingest else {
            return Ok(true);
        };
        let mut due = due_triggers(&profile, kpis, &view, today, horizon, &s.kpi, &s.config);
        if detected == Detected::Transaction {
            // Right after a purchase only the welcome is news; the rest waits for the day's run.
            due.retain(|d| d.trigger == "first_purchase");
        }
        for d in &due {
            let key = OccasionKey::new(customer, Scope::Signal, d.trigger, &d.occasion);
            if self.inner.occasions.fired(&key)? {
                continue;
            }
            let id = format!(
                "{}:trigger:{}",
                s.store_id,
                short_hash(&[
                    customer.as_bytes(),
                    d.trigger.as_bytes(),
                    d.occasion.as_bytes()
                ])
            );
            let data = TriggerData {
                store: &s.store_id,
                customer_id: customer,
                due: d,
                activity: view.activity,
                as_of: today,
                detected,
            };
            let payload = events::encode(EventKind::Trigger, &id, &s.store_id, now, &data);
            let event = NewEvent {
                kind: EventKind::Trigger,
                id,
                payload,
            };
            pace(ingest);
            ingest
                .once_blocking(event, key, 0, now)
                .map_err(|_| SignalsError::Stopping)?;
            metrics::counter!("storelink_triggers_total", "trigger" => d.trigger).increment(1);
            report.triggers += 1;
        }
        let segment = Segment::of(kpis, &view, today, &s.kpi);
        let digest = segment.digest();
        let key = OccasionKey::new(customer, Scope::Signal, SNAPSHOT, "");
        if let Some(last) = self.inner.occasions.get(&key)? {
            if last.token == digest {
                return Ok(true);
            }
            let window = jiff::SignedDuration::from_secs(
                i64::try_from(s.config.snapshot_every_s).unwrap_or(i64::MAX),
            );
            if now.duration_since(last.at) < window {
                return Ok(false);
            }
        }
        // The time is part of the id: a customer can come back to a segment they left, and
        // that snapshot must not look like a resend of the old one.
        let id = format!(
            "{}:customer:{}",
            s.store_id,
            short_hash(&[
                customer.as_bytes(),
                &digest.to_be_bytes(),
                &now.as_microsecond().to_be_bytes()
            ])
        );
        let data = Snapshot {
            store: &s.store_id,
            customer_id: customer,
            as_of: today,
            segment,
            days_since_last: view.days_since_last,
            p_alive: view.p_alive,
            clv: view.clv,
        };
        let payload = events::encode(EventKind::Customer, &id, &s.store_id, now, &data);
        let event = NewEvent {
            kind: EventKind::Customer,
            id,
            payload,
        };
        pace(ingest);
        ingest
            .once_blocking(event, key, digest, now)
            .map_err(|_| SignalsError::Stopping)?;
        report.snapshots += 1;
        Ok(true)
    }

    /// The daily run over every customer with KPIs, as of the clock's now. Blocking: call it
    /// on a blocking thread.
    pub fn daily_run(&self) -> Result<RunReport, SignalsError> {
        let now = self.inner.clock.now();
        let today = self.today(now);
        let mut report = RunReport::default();
        if self.inner.settings.config.enabled {
            // What happened while the agent was down is still news; so is the last week's
            // (`catch_up_days`), never what a gateway's first run finds years back.
            let horizon = match self.last_daily()? {
                Some(last) => last.min(self.catch_up_from(today)),
                None => self.catch_up_from(today),
            };
            let look_schedule = Look {
                today,
                horizon,
                now,
                detected: Detected::Schedule,
                wide: StoreWide::read(&self.inner.profiles)?,
            };
            for item in self.inner.profiles.all_kpis() {
                let (customer, kpis) = item?;
                if !self.consider(&customer, &kpis, &look_schedule, &mut report)? {
                    // Inside its window: the next look after a transaction, or tomorrow.
                    self.dirty().insert(customer);
                }
            }
        }
        if self.inner.settings.config.enabled {
            report.followup_pairs = self.send_followups(today, now)?;
        }
        for r in &self.inner.retention {
            let n = (r.prune)(now)?;
            if n > 0 {
                tracing::info!(
                    records = n,
                    keeper = r.name,
                    "retention removed old records"
                );
            }
            report.pruned.push((r.name, n));
        }
        self.inner
            .profiles
            .set_fact(DAILY_FACT, today.to_string().as_bytes())?;
        Ok(report)
    }

    /// Queues the day's `storelink.followups.v1`: the top pairs of the learned model. One per
    /// store and day (its id is the day's), nothing before the model counts a customer.
    fn send_followups(&self, today: Date, now: Timestamp) -> Result<u64, SignalsError> {
        let s = &self.inner.settings;
        let (customers, window_days) = self.inner.profiles.followup_basis();
        let Some(ingest) = &self.inner.ingest else {
            return Ok(0);
        };
        if customers == 0 {
            return Ok(0);
        }
        let data = FollowUpsData {
            store: &s.store_id,
            as_of: today,
            window_days,
            customers,
            pairs: self.inner.profiles.top_followups(s.config.followups.top),
        };
        let n = data.pairs.len() as u64;
        let id = format!("{}:followups:{today}", s.store_id);
        let payload = events::encode(EventKind::FollowUps, &id, &s.store_id, now, &data);
        ingest
            .event_blocking(NewEvent {
                kind: EventKind::FollowUps,
                id,
                payload,
            })
            .map_err(|_| SignalsError::Stopping)?;
        Ok(n)
    }

    /// Looks at the customers whose transactions committed since the last look. Blocking.
    pub fn flush(&self) -> Result<RunReport, SignalsError> {
        let marked: Vec<String> = self.dirty().drain().collect();
        let mut report = RunReport::default();
        if marked.is_empty() || !self.inner.settings.config.enabled {
            return Ok(report);
        }
        let now = self.inner.clock.now();
        let today = self.today(now);
        let look_transaction = Look {
            today,
            horizon: self.catch_up_from(today),
            now,
            detected: Detected::Transaction,
            wide: StoreWide::read(&self.inner.profiles)?,
        };
        let mut waiting = Vec::new();
        for card in marked {
            let customer = self.inner.profiles.resolve_card(&card)?;
            let Some(kpis) = self.inner.profiles.kpis(&customer)? else {
                continue;
            };
            if !self.consider(&customer, &kpis, &look_transaction, &mut report)? {
                waiting.push(customer);
            }
        }
        self.dirty().extend(waiting);
        Ok(report)
    }

    /// Resolves once the engine has committed everything this service queued before the call.
    pub async fn probe(&self) {
        if let Some(ingest) = &self.inner.ingest {
            let _ = ingest.probe().await;
        }
    }

    /// The business day of the last daily run, if there was one.
    pub fn last_daily(&self) -> Result<Option<Date>, StoreError> {
        Ok(self
            .inner
            .profiles
            .fact(DAILY_FACT)?
            .and_then(|v| String::from_utf8(v).ok())
            .and_then(|s| s.parse().ok()))
    }

    /// When the next daily run is due: at start, at once if today's (or an earlier day's) run
    /// was missed; otherwise at `daily_at` on the next day that has not had its run.
    pub fn next_daily(&self, now: Timestamp) -> Result<Timestamp, StoreError> {
        let s = &self.inner.settings;
        let time = s
            .config
            .daily_time()
            .unwrap_or(jiff::civil::Time::midnight());
        let today = self.today(now);
        let at = |day: Date| {
            day.to_datetime(time)
                .to_zoned(s.tz.clone())
                .map(|z| z.timestamp())
                .unwrap_or(now)
        };
        let yesterday = today.yesterday().unwrap_or(today);
        Ok(match self.last_daily()? {
            Some(last) if last >= today => at(today.tomorrow().unwrap_or(today)),
            // Yesterday's run happened; today's is still to come.
            Some(last) if last >= yesterday && now < at(today) => at(today),
            // Never run, or a run was missed while the agent was down: now.
            _ => now,
        })
    }

    /// Runs until cancelled: looks at marked customers every few seconds, and does the daily
    /// run on its schedule (and at start when one was missed).
    pub async fn run(
        &self,
        component: Component,
        token: CancellationToken,
    ) -> Result<(), SignalsError> {
        component.running(Some("waiting for the daily run".into()));
        let mut tick = tokio::time::interval(FLUSH_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let now = self.inner.clock.now();
            let next = self.next_daily(now)?;
            let wait = next.duration_since(now).unsigned_abs();
            let daily = now >= next;
            if daily {
                let me = self.clone();
                let started = std::time::Instant::now();
                let report = tokio::task::spawn_blocking(move || me.daily_run())
                    .await
                    .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
                match report {
                    Ok(r) => {
                        tracing::info!(
                            customers = r.customers,
                            consenting = r.consenting,
                            triggers = r.triggers,
                            snapshots = r.snapshots,
                            elapsed_ms = started.elapsed().as_millis() as u64,
                            "daily customer signals run"
                        );
                        component.running(Some(format!(
                            "daily run: {} customers, {} triggers, {} snapshots",
                            r.customers, r.triggers, r.snapshots
                        )));
                    }
                    Err(SignalsError::Stopping) => return Ok(()),
                    Err(e) => return Err(e),
                }
                continue;
            }
            tokio::select! {
                _ = token.cancelled() => return Ok(()),
                // The clock may be a test's: look again at least every tick.
                _ = tokio::time::sleep(wait.min(FLUSH_EVERY)) => {}
                _ = tick.tick() => {}
            }
            let me = self.clone();
            match tokio::task::spawn_blocking(move || me.flush())
                .await
                .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
            {
                Ok(_) => {}
                Err(SignalsError::Stopping) => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    }
}

/// Waits (on the blocking thread) while the ingest channel holds more than [`BACKLOG`] items,
/// so registers' transactions keep their place near the front.
fn pace(ingest: &IngestHandle) {
    while ingest.queued() > BACKLOG {
        std::thread::sleep(Duration::from_micros(500));
    }
}

/// Marks the customers of a durable step for a look; only new transactions (a replay or a
/// resend changes no KPI, so it is no news).
impl CommitHook for Signals {
    fn committed(&self, group: &[Committed<'_>], out: &mut StepOutput) -> Result<(), StoreError> {
        let ids: Vec<String> = group
            .iter()
            .filter(|c| c.new)
            .filter_map(|c| c.tx.loyalty_id.clone())
            .collect();
        if !ids.is_empty() {
            let me = self.clone();
            out.after.push(Box::new(move || me.dirty().extend(ids)));
        }
        Ok(())
    }
}

/// The occasion memory is customer-linked: an erasure forgets it.
impl crate::model::customer::CustomerRecords for Occasions {
    fn erase_customer(&self, ids: &[String]) -> Result<Vec<(&'static str, u64)>, StoreError> {
        let n = match ids.first() {
            Some(id) => Occasions::erase_customer(self, id)?,
            None => 0,
        };
        Ok(vec![("trigger_records", n as u64)])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profiles::kpi::LedgerEntry;

    fn shoes_every_14_days(last: Date) -> Kpis {
        let mut k = Kpis::default();
        for back in [28, 14, 0] {
            k.add(&LedgerEntry {
                day: last - jiff::Span::new().days(back),
                amount: 5_000,
                groups: vec!["shoes".into()],
                anchors: Vec::new(),
                main: Some("shoes".into()),
            });
        }
        k
    }

    fn due_on(kpis: &Kpis, today: Date, horizon: Date) -> Vec<&'static str> {
        let kpi = KpiConfig::default();
        let view = kpis.view(today, &kpi, None, None);
        due_triggers(
            &Profile::new("c1"),
            kpis,
            &view,
            today,
            horizon,
            &kpi,
            &SignalsConfig::default(),
        )
        .iter()
        .map(|d| d.trigger)
        .collect()
    }

    #[test]
    fn a_trigger_is_news_from_its_moment_until_the_horizon_passes_it() {
        let today: Date = "2026-03-04".parse().unwrap();
        let week = today - jiff::Span::new().days(7);
        // Overdue in shoes since yesterday (last + 14 × factor, plus a day): news.
        let kpi = KpiConfig::default();
        let fresh_last = today - jiff::Span::new().days((14.0 * kpi.overdue_factor) as i64 + 2);
        let fresh = shoes_every_14_days(fresh_last);
        let moment = fresh.groups["shoes"]
            .overdue_from(kpi.overdue_factor)
            .unwrap();
        assert!(moment <= today && moment >= week, "{moment}");
        assert!(due_on(&fresh, today, week).contains(&"winback_due"));
        // Overdue for half a year: history on a first run, news again after an outage that
        // began before it.
        let old = shoes_every_14_days("2025-08-01".parse().unwrap());
        let due = due_on(&old, today, week);
        assert!(!due.contains(&"winback_due"), "{due:?}");
        assert!(!due.contains(&"next_purchase_due"), "{due:?}");
        assert!(!due.contains(&"became_passive"), "{due:?}");
        assert!(!due.contains(&"first_purchase"), "{due:?}");
        let down_since: Date = "2025-08-10".parse().unwrap();
        let due = due_on(&old, today, down_since);
        assert!(due.contains(&"winback_due"), "{due:?}");
        assert!(due.contains(&"next_purchase_due"), "{due:?}");
        // Passive after the default 180 days, counted from Aug 1: Jan 29, after the outage began.
        assert!(due.contains(&"became_passive"), "{due:?}");
        assert!(!due.contains(&"first_purchase"), "{due:?}");
    }
}
