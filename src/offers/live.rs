//! The offers service: turns presence changes, register events and completed transactions
//! into decisions, records them, sends `storelink.offer.v1` and `storelink.prompt.v1` to
//! central, and keeps each lane's current cashier prompt.
//!
//! Invariants:
//! - Decisions use local state only (cached profiles, the last good campaign set, the ledger),
//!   so they work with the WAN down.
//! - The campaign set in force is the last good one: a message that does not parse, or whose
//!   version is not newer than the one held for its slot, changes nothing. The set is
//!   persisted before it goes live, so a restart offline starts with it.
//! - A decision is recorded (caps, budget, history) before anything is shown or sent.
//! - A lifecycle occasion (`birthday_visit`, `winback_due`) is claimed durably, once, by the
//!   decision that fires on it, before that decision is recorded; one no campaign answers
//!   costs no write and stays free.
//! - Customer ids and names appear in logs at debug level only; campaign ids are not personal.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use jiff::Timestamp;
use jiff::civil::Date;
use jiff::tz::TimeZone;
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;

use super::campaign::{Campaign, CampaignSet, Channel, CompiledSet, Rejected, Trigger};
use super::decide::{Basket, Chosen, Control, Decision, Explained, Occasion, decide, fired_on};
use super::ledger::OfferLedger;
use super::stats::CampaignStats;
use crate::clock::SharedClock;
use crate::events::{self, EventKind};
use crate::model::ingest::{IngestHandle, NewEvent};
use crate::model::presence::PresenceEvent;
use crate::model::presence::PresenceKind;
use crate::model::register::LiveEvents;
pub use crate::model::register::RegisterEvent;
use crate::occasions::{OccasionKey, Occasions, Scope};
use crate::profiles::kpi::{Activity, KpiConfig, KpiView, Kpis};
use crate::profiles::{Profile, ProfileStore};
use crate::store::StoreError;
use crate::supervisor::Component;
use futures_util::future::BoxFuture;

/// Completed loyalty transactions waiting for the `transaction_completed` trigger. A full
/// channel drops (and counts) the trigger: the transaction and its attribution are already
/// durable, only a follow-up offer is missed.
pub const COMPLETED_CHANNEL: usize = 4096;

/// Lane updates for the displays; a display that lags reloads the lane's current prompt.
const LANE_BROADCAST: usize = 256;

/// What the store knows of a customer's purchases at a decision: their KPIs and the view of
/// them on the day (with the learned follow-up).
struct Known {
    kpis: Arc<Kpis>,
    view: KpiView,
}

/// Where a campaign set came from. Each slot keeps its own version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Slot {
    /// `…/campaigns`: every store of the tenant.
    Tenant,
    /// `…/{store}/campaigns` over MQTT, or `GET /v1/stores/{store}/campaigns`.
    Store,
    /// `offers.campaigns_file`: used when central has sent nothing newer.
    File,
}

impl Slot {
    fn fact(self) -> &'static str {
        match self {
            Slot::Tenant => "campaigns.tenant",
            Slot::Store => "campaigns.store",
            Slot::File => "campaigns.file",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum OffersError {
    #[error("not a campaign set: {0}")]
    Malformed(serde_json::Error),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    BadRequest(String),
}

/// What installing a campaign set did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Installed {
    Live {
        version: u64,
        live: usize,
        rejected: Vec<Rejected>,
    },
    /// Not newer than the version held for its slot.
    Stale { version: u64, held: u64 },
}

/// How the customer at a lane was recognised.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Recognised {
    /// Their phone, by presence: the cashier should ask for the loyalty card.
    Presence,
    /// A loyalty card (or phone number) at the register.
    Card,
}

/// An offer as the cashier and a POS see it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PromptOffer {
    pub campaign: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
    pub offer: String,
    /// Language → text.
    pub text: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub barcode: Option<String>,
}

impl From<&Chosen> for PromptOffer {
    fn from(c: &Chosen) -> Self {
        PromptOffer {
            campaign: c.campaign.clone(),
            variant: c.variant.clone(),
            offer: c.offer.clone(),
            text: c.text.clone(),
            code: c.code.clone(),
            barcode: c.barcode.clone(),
        }
    }
}

/// The loyalty prompt for a lane's display (and a POS's effects).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Prompt {
    /// Stable per prompt; actions on it (accepted, dismissed, redeemed) name it.
    pub id: String,
    pub lane: String,
    /// Not shown on the display; lets actions be attributed.
    pub customer_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tier: Option<String>,
    pub points: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offer: Option<PromptOffer>,
    /// Recognised by presence and no card scanned yet.
    pub ask_for_card: bool,
    pub recognised: Recognised,
    pub at: Timestamp,
    /// What the cashier may mention; absent when the store knows nothing of the customer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub insight: Option<Insight>,
}

/// What the store knows about a recognised customer that a cashier can use in a sentence.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Insight {
    pub activity: Option<Activity>,
    pub days_since_last: Option<i32>,
    /// The main category of the last purchase.
    pub last_category: Option<String>,
    /// "Bought consoles three weeks ago: ask about games." Absent when nothing is relevant,
    /// so the display asks no question.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub suggestion: Option<PromptSuggestion>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PromptSuggestion {
    pub if_bought: String,
    pub suggest: String,
    /// Absent for central's shipped follow-ups, which carry no purchase day.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub days_ago: Option<i32>,
}

/// A lane's prompt changed (`None`: the lane is idle).
#[derive(Debug, Clone, PartialEq)]
pub struct LaneUpdate {
    pub lane: String,
    pub prompt: Option<Prompt>,
}

/// A loyalty transaction the engine made durable.
#[derive(Debug, Clone)]
pub struct Completed {
    pub customer_id: String,
    pub lane: Option<String>,
    pub at: Timestamp,
    /// What was bought, for the CEL `event.basket`.
    pub basket: Basket,
}

/// The `data` of `storelink.offer.v1`.
#[derive(Debug, Serialize)]
pub struct OfferData<'a> {
    pub store: &'a str,
    pub customer_id: &'a str,
    pub triggers: Vec<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub zone: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lane: Option<&'a str>,
    pub offers: &'a [Chosen],
    /// Control-group decisions: the offer that would have been shown, and was not.
    pub controls: &'a [Control],
}

/// What `storelink.prompt.v1` says happened to a prompt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PromptAction {
    Shown,
    Accepted,
    Dismissed,
    Redeemed,
}

impl PromptAction {
    /// What a cashier or a POS may report: accepted, dismissed or redeemed (not `shown`,
    /// which only the agent records).
    pub fn reported(name: &str) -> Option<PromptAction> {
        match name {
            "accepted" => Some(PromptAction::Accepted),
            "dismissed" => Some(PromptAction::Dismissed),
            "redeemed" => Some(PromptAction::Redeemed),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            PromptAction::Shown => "shown",
            PromptAction::Accepted => "accepted",
            PromptAction::Dismissed => "dismissed",
            PromptAction::Redeemed => "redeemed",
        }
    }
}

/// The `data` of `storelink.prompt.v1`.
#[derive(Debug, Serialize)]
pub struct PromptData<'a> {
    pub store: &'a str,
    pub prompt_id: &'a str,
    pub lane: &'a str,
    pub customer_id: &'a str,
    pub action: PromptAction,
    pub recognised: Recognised,
    pub ask_for_card: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub campaign: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub variant: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub offer: Option<&'a str>,
}

/// The answer to a register event: what a POS with its own UI should show.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Effects {
    pub lane: String,
    /// The lane's prompt after this event; `None` when the lane is idle or the customer is
    /// not known here.
    pub prompt: Option<Prompt>,
    /// The offers to show, per channel (`cashier` for the till).
    pub offers: Vec<PromptOffer>,
    /// Whether the loyalty card was found in this store's profiles.
    pub customer_known: bool,
}

/// The result of [`Offers::explain`].
#[derive(Debug, Clone, Serialize)]
pub struct Explanation {
    pub customer_found: bool,
    pub campaign_version: u64,
    pub occasion: Occasion,
    pub chosen: Vec<Chosen>,
    pub controls: Vec<Control>,
    pub explained: Vec<Explained>,
}

/// Settings the service needs from the config.
#[derive(Clone)]
pub struct Settings {
    pub store_id: String,
    pub tz: TimeZone,
    pub kpi: KpiConfig,
    /// Register name → its lane, for register events that name only the register.
    pub register_lanes: HashMap<String, String>,
    pub prompt_ttl: Duration,
    /// Off: no campaign is evaluated; prompts still show who is at the lane.
    pub enabled: bool,
}

#[derive(Default)]
struct Sets {
    slots: HashMap<Slot, CampaignSet>,
}

impl Sets {
    /// Tenant campaigns, overridden by store campaigns of the same id; the file's campaigns
    /// only when central has sent nothing.
    fn merged(&self) -> CampaignSet {
        let central =
            self.slots.contains_key(&Slot::Tenant) || self.slots.contains_key(&Slot::Store);
        let order: &[Slot] = if central {
            &[Slot::Tenant, Slot::Store]
        } else {
            &[Slot::File]
        };
        let mut campaigns: Vec<Campaign> = Vec::new();
        let mut version = 0;
        for slot in order {
            let Some(set) = self.slots.get(slot) else {
                continue;
            };
            version = version.max(set.version);
            // A later slot's campaign replaces an earlier one of the same id; duplicates within
            // one slot stay, and compile rejects them by name.
            let ids: HashSet<&str> = set.campaigns.iter().map(|c| c.id.as_str()).collect();
            campaigns.retain(|c| !ids.contains(c.id.as_str()));
            campaigns.extend(set.campaigns.iter().cloned());
        }
        CampaignSet { version, campaigns }
    }
}

#[derive(Default)]
struct LaneState {
    prompt: Option<Prompt>,
    /// The customer whose card was scanned in the current transaction.
    card: Option<String>,
    touched: Option<Timestamp>,
}

struct Inner {
    settings: Settings,
    clock: SharedClock,
    profiles: ProfileStore,
    ledger: OfferLedger,
    ingest: Option<IngestHandle>,
    sets: Mutex<Sets>,
    live: RwLock<Arc<CompiledSet>>,
    lanes: Mutex<HashMap<String, LaneState>>,
    lane_tx: broadcast::Sender<LaneUpdate>,
    /// Which in-store lifecycle triggers fired for whom (durable; see [`crate::occasions`]).
    occasions: Occasions,
}

/// The offers service; cheap to clone.
#[derive(Clone)]
pub struct Offers {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Offers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Offers").finish_non_exhaustive()
    }
}

pub use crate::events::short_hash;

impl LiveEvents for Offers {
    fn answer(&self, event: RegisterEvent) -> BoxFuture<'_, Result<String, String>> {
        Box::pin(async move {
            let effects = self
                .on_register_event(event)
                .await
                .map_err(|e| e.to_string())?;
            serde_json::to_string(&effects).map_err(|e| e.to_string())
        })
    }
}

impl Offers {
    /// Opens the service on the store's ledger and loads the persisted campaign sets.
    /// `ingest` is where offer and prompt events go; `None` (tools, tests) sends nothing.
    pub fn open(
        settings: Settings,
        clock: SharedClock,
        profiles: ProfileStore,
        ledger: OfferLedger,
        occasions: Occasions,
        ingest: Option<IngestHandle>,
    ) -> Result<Offers, StoreError> {
        let mut sets = Sets::default();
        for slot in [Slot::Tenant, Slot::Store, Slot::File] {
            if let Some(bytes) = ledger.fact(slot.fact())? {
                match serde_json::from_slice::<CampaignSet>(&bytes) {
                    Ok(set) => {
                        sets.slots.insert(slot, set);
                    }
                    Err(e) => {
                        tracing::error!(?slot, error = %e, "the persisted campaign set no longer parses; waiting for central to send it again")
                    }
                }
            }
        }
        let compiled = CompiledSet::compile(sets.merged());
        let (lane_tx, _) = broadcast::channel(LANE_BROADCAST);
        let offers = Offers {
            inner: Arc::new(Inner {
                settings,
                clock,
                profiles,
                ledger,
                ingest,
                sets: Mutex::new(sets),
                live: RwLock::new(Arc::new(CompiledSet::default())),
                lanes: Mutex::new(HashMap::new()),
                lane_tx,
                occasions,
            }),
        };
        offers.go_live(compiled);
        Ok(offers)
    }

    fn go_live(&self, compiled: CompiledSet) {
        for r in &compiled.rejected {
            tracing::error!(campaign = %r.campaign, field = %r.field, reason = %r.message, "campaign rejected; the others are live");
        }
        metrics::gauge!("storelink_campaigns_live").set(compiled.live.len() as f64);
        metrics::gauge!("storelink_campaigns_rejected").set(compiled.rejected.len() as f64);
        metrics::gauge!("storelink_campaigns_version").set(compiled.version as f64);
        *self.inner.live.write().expect("campaign lock") = Arc::new(compiled);
    }

    /// The compiled set in force.
    pub fn campaigns(&self) -> Arc<CompiledSet> {
        self.inner.live.read().expect("campaign lock").clone()
    }

    /// Installs a campaign set from `slot` if it parses and is newer than the one held there.
    pub fn install(&self, slot: Slot, bytes: &[u8]) -> Result<Installed, OffersError> {
        let set = CampaignSet::from_json(bytes).map_err(OffersError::Malformed)?;
        let mut sets = self.inner.sets.lock().expect("sets lock");
        if let Some(held) = sets.slots.get(&slot)
            && set.version <= held.version
            // The file is the operator's: a changed file with the same version still counts.
            && slot != Slot::File
        {
            return Ok(Installed::Stale {
                version: set.version,
                held: held.version,
            });
        }
        self.inner.ledger.set_fact(
            slot.fact(),
            &serde_json::to_vec(&set).expect("campaign set serialises"),
        )?;
        let version = set.version;
        sets.slots.insert(slot, set);
        let compiled = CompiledSet::compile(sets.merged());
        let installed = Installed::Live {
            version,
            live: compiled.live.len(),
            rejected: compiled.rejected.clone(),
        };
        tracing::info!(
            ?slot,
            version,
            live = compiled.live.len(),
            rejected = compiled.rejected.len(),
            "campaign set installed"
        );
        self.go_live(compiled);
        Ok(installed)
    }

    /// A value kept in the offers tree (the campaign sync's ETag).
    pub fn fact(&self, name: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner.ledger.fact(name)
    }

    pub fn set_fact(&self, name: &str, value: &[u8]) -> Result<(), StoreError> {
        self.inner.ledger.set_fact(name, value)
    }

    /// The versions held per slot.
    pub fn versions(&self) -> BTreeMap<String, u64> {
        let sets = self.inner.sets.lock().expect("sets lock");
        sets.slots
            .iter()
            .map(|(slot, set)| {
                (
                    slot.fact().trim_start_matches("campaigns.").to_string(),
                    set.version,
                )
            })
            .collect()
    }

    /// Follows lane prompt changes (for the lane displays).
    pub fn subscribe_lanes(&self) -> broadcast::Receiver<LaneUpdate> {
        self.inner.lane_tx.subscribe()
    }

    /// The lane's current prompt.
    pub fn lane_prompt(&self, lane: &str) -> Option<Prompt> {
        self.expire_lanes();
        let lanes = self.inner.lanes.lock().expect("lanes lock");
        lanes.get(lane).and_then(|l| l.prompt.clone())
    }

    /// The customer's KPIs and their view on `today`, read once per decision and shared by
    /// the lifecycle triggers, the audience and the cashier's insight.
    fn known(&self, customer: &str, today: Date) -> Result<Option<Known>, StoreError> {
        let p = &self.inner.profiles;
        let Some(kpis) = p.kpis_shared(customer)? else {
            return Ok(None);
        };
        let model = p.model()?;
        let rfm = p.rfm_breakpoints()?;
        let mut view = kpis.view(
            today,
            &self.inner.settings.kpi,
            model.as_ref(),
            rfm.as_ref(),
        );
        view.follow_up = p.suggest_followup(&kpis, today);
        Ok(Some(Known { kpis, view }))
    }

    fn today(&self, at: Timestamp) -> Date {
        at.to_zoned(self.inner.settings.tz.clone()).date()
    }

    /// Decides without recording anything: what `storelink offers explain` prints.
    pub fn explain(
        &self,
        customer: &str,
        triggers: Vec<Trigger>,
        zone: Option<String>,
        lane: Option<String>,
        at: Option<Timestamp>,
    ) -> Result<Explanation, OffersError> {
        let customer = self.inner.profiles.resolve_card(customer)?;
        let at = at.unwrap_or_else(|| self.inner.clock.now());
        let occasion = self.occasion(triggers, zone, lane, at);
        let set = self.campaigns();
        let Some(profile) = self.inner.profiles.lookup(&customer)? else {
            return Ok(Explanation {
                customer_found: false,
                campaign_version: set.version,
                occasion,
                chosen: Vec::new(),
                controls: Vec::new(),
                explained: Vec::new(),
            });
        };
        let known = self.known(&customer, self.today(at))?;
        let state = self.inner.ledger.cap_state(&customer, set.budgeted())?;
        let d = decide(
            &set,
            &profile,
            known.as_ref().map(|k| &k.view),
            &occasion,
            &state,
            &self.inner.settings.tz,
        );
        Ok(Explanation {
            customer_found: true,
            campaign_version: set.version,
            occasion,
            chosen: d.chosen,
            controls: d.controls,
            explained: d.explained,
        })
    }

    /// The lifecycle triggers a visit may add (a store entry, a card scanned at a till), each
    /// once per customer and occasion: `birthday_visit` on the birthday's first visit,
    /// `winback_due` once per overdue rhythm (overall, or per product group, until the next
    /// purchase there). Only those not yet claimed: a read, no write; the decision claims
    /// the ones it fires on ([`Offers::decide_and_record`]).
    fn lifecycle_candidates(
        &self,
        profile: &Profile,
        known: Option<&Known>,
        today: Date,
    ) -> Result<Vec<(Trigger, OccasionKey)>, StoreError> {
        let customer = profile.customer_id.as_str();
        let mut candidates: Vec<(Trigger, OccasionKey)> = Vec::new();
        if profile.birthday.is_some_and(|b| b.is(today)) {
            let key = OccasionKey::new(
                customer,
                Scope::Store,
                "birthday_visit",
                &today.year().to_string(),
            );
            candidates.push((Trigger::BirthdayVisit, key));
        }
        if let Some(Known { kpis, view: v }) =
            known.filter(|k| k.view.overdue || !k.view.overdue_groups.is_empty())
        {
            let last = |r: &crate::profiles::kpi::Rhythm| r.last.map(|d| d.to_string());
            if v.overdue
                && let Some(day) = last(&kpis.rhythm)
            {
                let key =
                    OccasionKey::new(customer, Scope::Store, "winback_due", &format!("*:{day}"));
                candidates.push((Trigger::WinbackDue { group: None }, key));
            }
            for g in &v.overdue_groups {
                if let Some(day) = kpis.groups.get(g).and_then(last) {
                    let key = OccasionKey::new(
                        customer,
                        Scope::Store,
                        "winback_due",
                        &format!("{g}:{day}"),
                    );
                    candidates.push((
                        Trigger::WinbackDue {
                            group: Some(g.clone()),
                        },
                        key,
                    ));
                }
            }
        }
        if candidates.is_empty() {
            return Ok(candidates);
        }
        let keys: Vec<OccasionKey> = candidates.iter().map(|(_, k)| k.clone()).collect();
        let unclaimed = self.inner.occasions.unclaimed(&keys)?;
        Ok(candidates
            .into_iter()
            .zip(unclaimed)
            .filter_map(|(c, new)| new.then_some(c))
            .collect())
    }

    /// Claims durably the lifecycle occasions a decision fired on; returns, per key, whether
    /// it was still free (a visit at the same moment may have taken it).
    async fn claim(&self, keys: Vec<OccasionKey>, at: Timestamp) -> Result<Vec<bool>, StoreError> {
        let occasions = self.inner.occasions.clone();
        // A durable commit: off the async threads.
        tokio::task::spawn_blocking(move || occasions.claim(&keys, at))
            .await
            .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
    }

    /// An occasion at this store.
    fn occasion(
        &self,
        triggers: Vec<Trigger>,
        zone: Option<String>,
        lane: Option<String>,
        at: Timestamp,
    ) -> Occasion {
        Occasion {
            triggers,
            store: self.inner.settings.store_id.clone(),
            zone,
            lane,
            at,
            basket: None,
        }
    }

    /// Decides for a customer on an occasion, records the decision, and sends the offer
    /// event. A `visit` (a store entry, a card at a till) adds the lifecycle triggers that are
    /// new ([`Offers::lifecycle_candidates`]).
    ///
    /// An occasion is used up only by a decision that fires on it: the candidates join the
    /// decision, and the ones it fires on ([`fired_on`]: a chosen or control campaign listens
    /// to them, or its audience reads the event) are claimed durably before the decision is
    /// recorded or shown. A visit that no lifecycle campaign answers
    /// costs no write, so the next visit still finds the occasion. Should another visit
    /// claim one first, the decision is taken again with the occasions this one holds.
    async fn decide_and_record(
        &self,
        profile: &Profile,
        known: Option<&Known>,
        mut occasion: Occasion,
        visit: bool,
    ) -> Result<Decision, OffersError> {
        if !self.inner.settings.enabled {
            return Ok(Decision::default());
        }
        let customer = profile.customer_id.as_str();
        let at = occasion.at;
        let view = known.map(|k| &k.view);
        // Without consent to offers, no occasion is used up.
        let candidates = if visit && profile.consents.personalised_offers {
            self.lifecycle_candidates(profile, known, self.today(at))?
        } else {
            Vec::new()
        };
        let set = self.campaigns();
        let state = self.inner.ledger.cap_state(customer, set.budgeted())?;
        let tz = &self.inner.settings.tz;
        let base = occasion.triggers.len();
        occasion
            .triggers
            .extend(candidates.iter().map(|(t, _)| t.clone()));
        let mut decision = decide(&set, profile, view, &occasion, &state, tz);
        if !candidates.is_empty() {
            let fired = fired_on(&set, &decision, &occasion.triggers[base..]);
            let (triggers, keys): (Vec<Trigger>, Vec<OccasionKey>) = candidates
                .into_iter()
                .zip(fired)
                .filter_map(|(c, fired)| fired.then_some(c))
                .unzip();
            let held = if keys.is_empty() {
                Vec::new()
            } else {
                self.claim(keys, at).await?
            };
            let lost = held.contains(&false);
            occasion.triggers.truncate(base);
            occasion.triggers.extend(
                triggers
                    .into_iter()
                    .zip(held)
                    .filter_map(|(t, held)| held.then_some(t)),
            );
            if lost {
                decision = decide(&set, profile, view, &occasion, &state, tz);
            }
        }
        self.inner
            .ledger
            .record(&mut decision, customer, at, &set)?;
        let trigger_names: Vec<&'static str> =
            occasion.triggers.iter().map(Trigger::name).collect();
        for c in &decision.chosen {
            metrics::counter!("storelink_offer_decisions_total", "campaign" => c.campaign.clone(), "group" => "exposed", "channel" => channel_name(c.channel)).increment(1);
        }
        for c in &decision.controls {
            metrics::counter!("storelink_offer_decisions_total", "campaign" => c.campaign.clone(), "group" => "control", "channel" => "none").increment(1);
            tracing::info!(campaign = %c.campaign, variant = ?c.variant, offer = %c.offer, "control decision: this offer would have been shown");
        }
        tracing::debug!(customer, triggers = ?trigger_names, chosen = decision.chosen.len(), controls = decision.controls.len(), "offer decision");
        if decision.chosen.is_empty() && decision.controls.is_empty() {
            return Ok(decision);
        }
        let micros = at.as_microsecond().to_be_bytes();
        let id = format!(
            "{}:offer:{}",
            self.inner.settings.store_id,
            short_hash(&[
                customer.as_bytes(),
                &micros,
                trigger_names.join(",").as_bytes()
            ])
        );
        let data = OfferData {
            store: &self.inner.settings.store_id,
            customer_id: customer,
            triggers: trigger_names,
            zone: occasion.zone.as_deref(),
            lane: occasion.lane.as_deref(),
            offers: &decision.chosen,
            controls: &decision.controls,
        };
        self.send(EventKind::Offer, id, at, &data).await;
        Ok(decision)
    }

    async fn send<T: Serialize>(&self, kind: EventKind, id: String, at: Timestamp, data: &T) {
        let Some(ingest) = &self.inner.ingest else {
            return;
        };
        let payload = events::encode(kind, &id, &self.inner.settings.store_id, at, data);
        if ingest.event(NewEvent { kind, id, payload }).await.is_err() {
            tracing::debug!(kind = kind.name(), "agent stopping; event not queued");
        }
    }

    /// Puts a prompt on a lane (or clears it) and tells the displays and central.
    async fn set_lane(&self, lane: &str, prompt: Option<Prompt>, card: Option<Option<String>>) {
        let now = self.inner.clock.now();
        {
            let mut lanes = self.inner.lanes.lock().expect("lanes lock");
            let state = lanes.entry(lane.to_string()).or_default();
            state.prompt = prompt.clone();
            state.touched = Some(now);
            if let Some(card) = card {
                state.card = card;
            }
        }
        let _ = self.inner.lane_tx.send(LaneUpdate {
            lane: lane.to_string(),
            prompt: prompt.clone(),
        });
        if let Some(p) = prompt {
            metrics::counter!("storelink_prompts_total", "lane" => lane.to_string(), "action" => "shown").increment(1);
            self.prompt_event(&p, PromptAction::Shown, now).await;
        }
    }

    async fn prompt_event(&self, p: &Prompt, action: PromptAction, at: Timestamp) {
        let data = PromptData {
            store: &self.inner.settings.store_id,
            prompt_id: &p.id,
            lane: &p.lane,
            customer_id: &p.customer_id,
            action,
            recognised: p.recognised,
            ask_for_card: p.ask_for_card,
            campaign: p.offer.as_ref().map(|o| o.campaign.as_str()),
            variant: p.offer.as_ref().and_then(|o| o.variant.as_deref()),
            offer: p.offer.as_ref().map(|o| o.offer.as_str()),
        };
        let id = format!("{}:{}", p.id, action.as_str());
        self.send(EventKind::Prompt, id, at, &data).await;
    }

    /// A cashier's action on a prompt (accepted, dismissed, redeemed): sent to central as
    /// `storelink.prompt.v1`. A redeemed or dismissed prompt leaves the lane.
    pub async fn prompt_action(
        &self,
        lane: &str,
        prompt_id: &str,
        action: PromptAction,
    ) -> Result<Prompt, OffersError> {
        let prompt = self
            .lane_prompt(lane)
            .filter(|p| p.id == prompt_id)
            .ok_or_else(|| {
                OffersError::BadRequest(format!(
                    "lane {lane:?} is not showing prompt {prompt_id:?} (it may have changed)"
                ))
            })?;
        metrics::counter!("storelink_prompts_total", "lane" => lane.to_string(), "action" => action.as_str()).increment(1);
        self.prompt_event(&prompt, action, self.inner.clock.now())
            .await;
        if matches!(action, PromptAction::Dismissed | PromptAction::Redeemed) {
            self.set_lane(lane, None, None).await;
        }
        Ok(prompt)
    }

    fn prompt_for(
        &self,
        profile: &Profile,
        known: Option<&Known>,
        lane: &str,
        decision: &Decision,
        recognised: Recognised,
        at: Timestamp,
    ) -> Prompt {
        let offer = decision
            .chosen
            .iter()
            .find(|c| c.channel == Channel::Cashier)
            .map(PromptOffer::from);
        let micros = at.as_microsecond().to_be_bytes();
        Prompt {
            id: format!(
                "{}:prompt:{}",
                self.inner.settings.store_id,
                short_hash(&[profile.customer_id.as_bytes(), lane.as_bytes(), &micros])
            ),
            lane: lane.to_string(),
            customer_id: profile.customer_id.clone(),
            first_name: profile.first_name.clone(),
            tier: profile.tier.clone(),
            points: profile.points,
            offer,
            // A card scanned is how a customer is recognised at the till: a phone alone asks.
            ask_for_card: recognised == Recognised::Presence,
            recognised,
            at,
            insight: self.insight(profile, known, at),
        }
    }

    /// The cashier's view of the customer: class, days since the last visit, the last
    /// purchase's main category, and the follow-up to ask about (central's first, else the
    /// one the store learned). `None` when the store has no purchase of theirs and no
    /// follow-up; a lookup failure only costs the insight, never the prompt.
    fn insight(&self, profile: &Profile, known: Option<&Known>, at: Timestamp) -> Option<Insight> {
        let text = |i: &crate::profiles::Item| match i {
            crate::profiles::Item::Category(c) | crate::profiles::Item::Sku(c) => c.clone(),
        };
        let today = self.today(at);
        let central = profile
            .follow_ups
            .iter()
            .max_by(|a, b| a.confidence.total_cmp(&b.confidence))
            .map(|f| PromptSuggestion {
                if_bought: text(&f.if_bought),
                suggest: text(&f.suggest),
                days_ago: None,
            });
        let learned = || {
            let s = known?.view.follow_up.as_ref()?;
            Some(PromptSuggestion {
                if_bought: text(&s.if_bought),
                suggest: text(&s.suggest),
                days_ago: Some(s.days_ago),
            })
        };
        let suggestion = central.or_else(learned);
        let k = known.map(|k| &k.kpis).filter(|k| k.purchases > 0);
        if k.is_none() && suggestion.is_none() {
            return None;
        }
        Some(Insight {
            activity: k.and_then(|k| k.activity_on(today, &self.inner.settings.kpi)),
            days_since_last: k.and_then(|k| Some((today - k.rhythm.last?).get_days())),
            last_category: k.and_then(|k| k.last_main.as_ref().map(|(_, c)| c.clone())),
            suggestion,
        })
    }

    /// A presence change: store entry, zone dwelling, lane arrival, or a lane left.
    pub async fn on_presence(&self, ev: &PresenceEvent) -> Result<Option<Decision>, OffersError> {
        let customer: &str = &ev.customer_id;
        if ev.kind == PresenceKind::Left {
            if let Some(lane) = &ev.lane {
                let clear = {
                    let lanes = self.inner.lanes.lock().expect("lanes lock");
                    lanes.get(lane).is_some_and(|l| {
                        l.card.is_none()
                            && l.prompt.as_ref().is_some_and(|p| p.customer_id == customer)
                    })
                };
                if clear {
                    self.set_lane(lane, None, None).await;
                }
            }
            return Ok(None);
        }
        let Some(profile) = self.inner.profiles.lookup(customer)? else {
            return Ok(None);
        };
        let (triggers, visit) = match (ev.kind, &ev.zone, &ev.lane) {
            (PresenceKind::Entered, None, _) => (vec![Trigger::StoreEntered], true),
            (PresenceKind::Entered, Some(_), Some(_)) => (vec![Trigger::LaneArrived], false),
            (PresenceKind::Dwelling, Some(zone), _) => {
                (vec![Trigger::ZoneDwelling { zone: zone.clone() }], false)
            }
            _ => return Ok(None),
        };
        let known = self.known(customer, self.today(ev.at))?;
        let decision = self
            .decide_and_record(
                &profile,
                known.as_ref(),
                self.occasion(triggers, ev.zone.clone(), ev.lane.clone(), ev.at),
                visit,
            )
            .await?;
        if let (PresenceKind::Entered, Some(lane)) = (ev.kind, &ev.lane) {
            // A card already scanned at this lane outranks a phone nearby.
            let card = {
                let lanes = self.inner.lanes.lock().expect("lanes lock");
                lanes.get(lane).and_then(|l| l.card.clone())
            };
            if card.is_none() {
                let prompt = self.prompt_for(
                    &profile,
                    known.as_ref(),
                    lane,
                    &decision,
                    Recognised::Presence,
                    ev.at,
                );
                self.set_lane(lane, Some(prompt), None).await;
            }
        }
        Ok(Some(decision))
    }

    fn lane_of(&self, event: &RegisterEvent) -> Result<String, OffersError> {
        match event.place() {
            (_, Some(lane)) => Ok(lane.to_string()),
            (Some(register), None) => self
                .inner
                .settings
                .register_lanes
                .get(register)
                .cloned()
                .ok_or_else(|| {
                    OffersError::BadRequest(format!(
                        "register {register:?} has no lane in the config; send \"lane\" with the event"
                    ))
                }),
            (None, None) => Err(OffersError::BadRequest(
                "the event names neither a lane nor a register".into(),
            )),
        }
    }

    /// A live register event; returns what the register should show.
    pub async fn on_register_event(&self, event: RegisterEvent) -> Result<Effects, OffersError> {
        let lane = self.lane_of(&event)?;
        let now = self.inner.clock.now();
        let card = match &event {
            RegisterEvent::CustomerIdentified { loyalty_id, .. } => Some(loyalty_id.as_str()),
            RegisterEvent::TransactionStarted { loyalty_id, .. } => loyalty_id.as_deref(),
            RegisterEvent::TransactionEnded { .. } => {
                self.set_lane(&lane, None, Some(None)).await;
                return Ok(self.effects(&lane, Vec::new(), true));
            }
            RegisterEvent::BasketUpdated { .. } => None,
        };
        let Some(card) = card else {
            let offers = self.current_offers(&lane);
            return Ok(self.effects(&lane, offers, true));
        };
        if !Profile::valid_id(card) {
            return Err(OffersError::BadRequest(
                "loyalty_id must be 1-128 characters without NUL".into(),
            ));
        }
        let customer = self.inner.profiles.resolve_card(card)?;
        let already = {
            let lanes = self.inner.lanes.lock().expect("lanes lock");
            lanes.get(&lane).is_some_and(|l| {
                l.card.as_deref() == Some(customer.as_str())
                    && l.prompt.as_ref().is_some_and(|p| p.customer_id == customer)
            })
        };
        if already {
            // The same card again in this transaction (identified, then started): no new
            // decision, the same prompt.
            let offers = self.current_offers(&lane);
            return Ok(self.effects(&lane, offers, true));
        }
        let Some(profile) = self.inner.profiles.lookup(&customer)? else {
            self.set_lane(&lane, None, Some(Some(customer))).await;
            return Ok(self.effects(&lane, Vec::new(), false));
        };
        let known = self.known(&customer, self.today(now))?;
        let decision = self
            .decide_and_record(
                &profile,
                known.as_ref(),
                self.occasion(
                    vec![Trigger::TransactionStarted],
                    None,
                    Some(lane.clone()),
                    now,
                ),
                true,
            )
            .await?;
        let mut prompt = self.prompt_for(
            &profile,
            known.as_ref(),
            &lane,
            &decision,
            Recognised::Card,
            now,
        );
        let mut offers: Vec<PromptOffer> = decision.chosen.iter().map(PromptOffer::from).collect();
        // The phone was recognised at this lane first and its prompt already carries an offer:
        // the cashier keeps mentioning it rather than losing it to the card scan.
        if prompt.offer.is_none()
            && let Some(earlier) = self
                .lane_prompt(&lane)
                .filter(|p| p.customer_id == customer)
                .and_then(|p| p.offer)
        {
            offers.push(earlier.clone());
            prompt.offer = Some(earlier);
        }
        self.set_lane(&lane, Some(prompt), Some(Some(customer)))
            .await;
        Ok(self.effects(&lane, offers, true))
    }

    fn current_offers(&self, lane: &str) -> Vec<PromptOffer> {
        self.lane_prompt(lane)
            .and_then(|p| p.offer)
            .into_iter()
            .collect()
    }

    fn effects(&self, lane: &str, offers: Vec<PromptOffer>, known: bool) -> Effects {
        Effects {
            lane: lane.to_string(),
            prompt: self.lane_prompt(lane),
            offers,
            customer_known: known,
        }
    }

    /// A loyalty transaction completed: the lane's transaction is over, and the customer may
    /// get a follow-up offer (`transaction_completed`, typically for the phone).
    pub async fn on_completed(&self, done: &Completed) -> Result<Option<Decision>, OffersError> {
        if let Some(lane) = &done.lane {
            let ours = {
                let lanes = self.inner.lanes.lock().expect("lanes lock");
                lanes.get(lane).is_some_and(|l| {
                    l.prompt
                        .as_ref()
                        .is_some_and(|p| p.customer_id == done.customer_id)
                        || l.card.as_deref() == Some(done.customer_id.as_str())
                })
            };
            if ours {
                self.set_lane(lane, None, Some(None)).await;
            }
        }
        // Most stores run no campaign on this trigger: then there is nothing to decide, and
        // the KPIs and profile need not be read for every loyalty transaction.
        if !self.campaigns().listens_to(&Trigger::TransactionCompleted) {
            return Ok(None);
        }
        let Some(profile) = self.inner.profiles.lookup(&done.customer_id)? else {
            return Ok(None);
        };
        let known = self.known(&done.customer_id, self.today(done.at))?;
        let decision = self
            .decide_and_record(
                &profile,
                known.as_ref(),
                Occasion {
                    basket: Some(done.basket.clone()),
                    ..self.occasion(
                        vec![Trigger::TransactionCompleted],
                        None,
                        done.lane.clone(),
                        done.at,
                    )
                },
                false,
            )
            .await?;
        Ok(Some(decision))
    }

    /// Clears prompts nobody touched for `prompt_ttl`.
    fn expire_lanes(&self) {
        let now = self.inner.clock.now();
        let ttl = jiff::SignedDuration::try_from(self.inner.settings.prompt_ttl)
            .unwrap_or(jiff::SignedDuration::MAX);
        let mut expired = Vec::new();
        {
            let mut lanes = self.inner.lanes.lock().expect("lanes lock");
            for (lane, state) in lanes.iter_mut() {
                if state.prompt.is_some()
                    && state.touched.is_some_and(|t| now.duration_since(t) >= ttl)
                {
                    state.prompt = None;
                    state.card = None;
                    expired.push(lane.clone());
                }
            }
        }
        for lane in expired {
            let _ = self.inner.lane_tx.send(LaneUpdate { lane, prompt: None });
        }
    }

    /// Campaign statistics with the uplift test, per campaign and variant.
    pub fn stats(&self) -> Result<Vec<CampaignStats>, StoreError> {
        Ok(self
            .inner
            .ledger
            .counts()?
            .into_iter()
            .map(|((campaign, variant), counts)| CampaignStats::new(campaign, variant, counts))
            .collect())
    }

    /// Sets the per-campaign gauges from the ledger's counts (called on a `/metrics` scrape).
    pub fn export_stats(&self) {
        let Ok(stats) = self.stats() else { return };
        for s in stats {
            let labels = [
                ("campaign", s.campaign.clone()),
                ("variant", s.variant.clone().unwrap_or_default()),
            ];
            let c = &s.counts;
            for (name, value) in [
                ("storelink_campaign_shown", c.shown),
                ("storelink_campaign_controls", c.controls),
                ("storelink_campaign_redeemed", c.redeemed),
                ("storelink_campaign_control_purchases", c.control_purchases),
                ("storelink_campaign_revenue_minor", c.revenue),
                ("storelink_campaign_margin_minor", c.margin),
            ] {
                metrics::gauge!(name, &labels).set(value as f64);
            }
            if let Some(u) = s.uplift {
                metrics::gauge!("storelink_campaign_uplift", &labels).set(u.difference);
                metrics::gauge!("storelink_campaign_uplift_z", &labels).set(u.z);
                metrics::gauge!("storelink_campaign_uplift_p_value", &labels).set(u.p_value);
            }
        }
    }

    /// Runs until cancelled: presence changes and completed transactions become decisions.
    /// A failure on one event is logged and counted; the next event is decided normally.
    pub async fn run(
        &self,
        mut presence: broadcast::Receiver<PresenceEvent>,
        completed: Arc<tokio::sync::Mutex<mpsc::Receiver<Completed>>>,
        component: Component,
        token: CancellationToken,
    ) -> Result<(), OffersError> {
        let mut completed = completed.lock().await;
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        component.running(Some(format!(
            "{} campaigns live",
            self.campaigns().live.len()
        )));
        loop {
            let result = tokio::select! {
                _ = token.cancelled() => return Ok(()),
                ev = presence.recv() => match ev {
                    Ok(ev) => self.on_presence(&ev).await.map(|_| ()),
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        metrics::counter!("storelink_offer_triggers_dropped_total", "source" => "presence").increment(n);
                        tracing::warn!(missed = n, "offers fell behind presence; those moments got no decision");
                        Ok(())
                    }
                    Err(broadcast::error::RecvError::Closed) => return Ok(()),
                },
                done = completed.recv() => match done {
                    Some(done) => self.on_completed(&done).await.map(|_| ()),
                    None => return Ok(()),
                },
                _ = tick.tick() => {
                    self.expire_lanes();
                    Ok(())
                }
            };
            match result {
                Ok(()) => {}
                Err(OffersError::Store(e)) => return Err(OffersError::Store(e)),
                Err(e) => {
                    metrics::counter!("storelink_offer_errors_total").increment(1);
                    tracing::warn!(error = %e, "could not decide an offer");
                }
            }
        }
    }
}

fn channel_name(c: Channel) -> &'static str {
    match c {
        Channel::Push => "push",
        Channel::Cashier => "cashier",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use crate::model::ingest::{self as engine, Ingest};
    use crate::store::{Store, StoreOptions};

    struct Fixture {
        _dir: tempfile::TempDir,
        store: Store,
        offers: Offers,
        clock: Arc<ManualClock>,
        events: mpsc::Receiver<Ingest>,
    }

    fn campaigns(version: u64) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({
            "version": version,
            "campaigns": [
                {
                    "id": "lane-hello",
                    "name": "Greeting at the lane",
                    "valid_from": "2026-01-01T00:00:00Z",
                    "valid_until": "2027-01-01T00:00:00Z",
                    "trigger": {"kind": "lane_arrived"},
                    "offers": [{"id": "double-points", "texts": {"cashier": {"en": "{first_name}: double points today"}}}]
                },
                {
                    "id": "birthday",
                    "name": "Birthday",
                    "valid_from": "2026-01-01T00:00:00Z",
                    "valid_until": "2027-01-01T00:00:00Z",
                    "trigger": {"kind": "birthday_visit"},
                    "offers": [{"id": "cake", "texts": {"push": {"en": "Happy birthday, {first_name}!"}}}],
                    "value": 100000
                }
            ]
        }))
        .unwrap()
    }

    fn fixture_in(dir: tempfile::TempDir) -> Fixture {
        let store = Store::open(dir.path(), &StoreOptions::default()).unwrap();
        let profiles = ProfileStore::open(&store).unwrap();
        let mut p = Profile::new("c1");
        p.first_name = Some("Ada".into());
        p.consents.personalised_offers = true;
        p.birthday = Some("11-23".parse().unwrap());
        p.version = 1;
        profiles.upsert_many(vec![p], &[]).unwrap();
        let clock = Arc::new(ManualClock::new("2026-11-23T09:00:00Z".parse().unwrap()));
        let (ingest, events) = engine::channel();
        let offers = Offers::open(
            Settings {
                store_id: "s1".into(),
                tz: TimeZone::get("Europe/Berlin").unwrap(),
                kpi: KpiConfig::default(),
                register_lanes: HashMap::from([("r1".to_string(), "1".to_string())]),
                prompt_ttl: Duration::from_secs(60),
                enabled: true,
            },
            clock.clone(),
            profiles,
            OfferLedger::open(&store).unwrap(),
            Occasions::new(&store),
            Some(ingest),
        )
        .unwrap();
        Fixture {
            _dir: dir,
            store,
            offers,
            clock,
            events,
        }
    }

    fn fixture() -> Fixture {
        fixture_in(tempfile::tempdir().unwrap())
    }

    fn sent(f: &mut Fixture) -> Vec<serde_json::Value> {
        let mut out = Vec::new();
        while let Ok(Ingest::Event { event }) = f.events.try_recv() {
            out.push(serde_json::from_slice(&event.payload).unwrap());
        }
        out
    }

    /// The customer's phone at the entrance at `at`; the decision it brought.
    async fn entered(f: &Fixture, at: &str) -> Decision {
        f.offers
            .on_presence(&presence(PresenceKind::Entered, None, None, at))
            .await
            .unwrap()
            .unwrap()
    }

    fn presence(
        kind: PresenceKind,
        zone: Option<&str>,
        lane: Option<&str>,
        at: &str,
    ) -> PresenceEvent {
        PresenceEvent {
            id: "p".into(),
            customer_id: Arc::from("c1"),
            kind,
            zone: zone.map(Into::into),
            lane: lane.map(Into::into),
            at: at.parse().unwrap(),
            confidence: 0.9,
            distance_m: None,
        }
    }

    /// c1's phone arrives at lane 1 (zone "till-1") at 09:00 UTC.
    async fn phone_at_lane_1(f: &Fixture) {
        f.offers
            .on_presence(&presence(
                PresenceKind::Entered,
                Some("till-1"),
                Some("1"),
                "2026-11-23T09:00:00Z",
            ))
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn a_completed_transaction_is_decided_only_when_a_campaign_listens_for_it() {
        let mut f = fixture();
        f.offers.install(Slot::Store, &campaigns(1)).unwrap();
        let done = Completed {
            customer_id: "c1".into(),
            lane: Some("1".into()),
            at: "2026-11-23T09:05:00Z".parse().unwrap(),
            basket: Basket {
                categories: vec!["games".into()],
                skus: vec!["g-1".into()],
                total: 5999,
            },
        };
        assert!(
            f.offers.on_completed(&done).await.unwrap().is_none(),
            "no campaign listens for transaction_completed: nothing to decide"
        );
        let mut set: serde_json::Value = serde_json::from_slice(&campaigns(2)).unwrap();
        set["campaigns"].as_array_mut().unwrap().push(serde_json::json!({
            "id": "after-games",
            "name": "After a games purchase",
            "valid_from": "2026-01-01T00:00:00Z",
            "valid_until": "2027-01-01T00:00:00Z",
            "trigger": {"kind": "transaction_completed"},
            "audience": "'games' in event.basket.categories",
            "offers": [{"id": "controller-10", "texts": {"push": {"en": "{first_name}: 10% off a second controller"}}}]
        }));
        f.offers
            .install(Slot::Store, &serde_json::to_vec(&set).unwrap())
            .unwrap();
        let decision = f.offers.on_completed(&done).await.unwrap().unwrap();
        assert_eq!(decision.chosen.len(), 1);
        assert_eq!(decision.chosen[0].campaign, "after-games");
        assert!(
            sent(&mut f)
                .iter()
                .any(|e| e["type"] == "storelink.offer.v1"),
            "the decision went to central"
        );
    }

    #[tokio::test]
    async fn a_phone_at_the_lane_asks_for_the_card_until_it_is_scanned() {
        let mut f = fixture();
        f.offers.install(Slot::Store, &campaigns(1)).unwrap();
        phone_at_lane_1(&f).await;
        let p = f.offers.lane_prompt("1").expect("a prompt on lane 1");
        assert!(p.ask_for_card);
        assert_eq!(p.recognised, Recognised::Presence);
        assert_eq!(
            p.offer.as_ref().unwrap().text["en"],
            "Ada: double points today"
        );
        let mut lanes = f.offers.subscribe_lanes();

        let effects = f
            .offers
            .on_register_event(RegisterEvent::CustomerIdentified {
                register: Some("r1".into()),
                lane: None,
                loyalty_id: "c1".into(),
            })
            .await
            .unwrap();
        let p2 = effects.prompt.unwrap();
        assert!(!p2.ask_for_card, "the card is scanned now");
        // No cashier campaign for transaction_started: the offer decided at the lane stays.
        // The card is the birthday's first visit (the phone was only seen at the lane), so
        // the birthday push offer comes with it.
        assert_eq!(p2.offer, p.offer);
        let campaigns: Vec<&str> = effects.offers.iter().map(|o| o.campaign.as_str()).collect();
        assert_eq!(campaigns.len(), 2, "{campaigns:?}");
        assert!(campaigns.contains(&"birthday"), "{campaigns:?}");
        assert_eq!(p2.recognised, Recognised::Card);
        assert_eq!(lanes.recv().await.unwrap().prompt.unwrap().id, p2.id);

        // Leaving the lane does not clear a card customer's prompt; the transaction's end does.
        f.offers
            .on_presence(&presence(
                PresenceKind::Left,
                Some("till-1"),
                Some("1"),
                "2026-11-23T09:01:00Z",
            ))
            .await
            .unwrap();
        assert!(f.offers.lane_prompt("1").is_some());
        f.offers
            .on_register_event(RegisterEvent::TransactionEnded {
                register: None,
                lane: Some("1".into()),
            })
            .await
            .unwrap();
        assert!(f.offers.lane_prompt("1").is_none());

        let kinds: Vec<String> = sent(&mut f)
            .iter()
            .map(|e| {
                format!(
                    "{}:{}",
                    e["type"],
                    e["data"]["action"].as_str().unwrap_or("")
                )
            })
            .collect();
        assert_eq!(
            kinds,
            [
                "\"storelink.offer.v1\":",
                "\"storelink.prompt.v1\":shown",
                // The birthday offer the card scan brought.
                "\"storelink.offer.v1\":",
                "\"storelink.prompt.v1\":shown"
            ]
        );
    }

    #[tokio::test]
    async fn an_unattended_prompt_expires() {
        let f = fixture();
        f.offers.install(Slot::Store, &campaigns(1)).unwrap();
        phone_at_lane_1(&f).await;
        f.clock.advance(Duration::from_secs(59));
        assert!(f.offers.lane_prompt("1").is_some());
        f.clock.advance(Duration::from_secs(1));
        assert!(f.offers.lane_prompt("1").is_none());
    }

    #[tokio::test]
    async fn the_birthday_offer_comes_with_the_first_entry_of_the_day_only() {
        let mut f = fixture();
        f.offers.install(Slot::Store, &campaigns(1)).unwrap();
        let d = entered(&f, "2026-11-23T09:00:00Z").await;
        assert_eq!(d.chosen[0].text["en"], "Happy birthday, Ada!");
        let offer = sent(&mut f).pop().unwrap();
        assert_eq!(offer["type"], "storelink.offer.v1");
        assert_eq!(
            offer["data"]["triggers"],
            serde_json::json!(["store_entered", "birthday_visit"])
        );
        let d = entered(&f, "2026-11-23T15:00:00Z").await;
        assert!(d.chosen.is_empty());
        assert!(!d.explained.iter().any(|e| e.campaign == "birthday"
            && e.outcome != super::super::decide::Outcome::OtherTrigger));

        // The memory is durable: after a restart, neither an entry nor a card scan that day
        // brings the birthday again.
        let dir = f._dir;
        drop(f.offers);
        f.store.flush_blocking().unwrap();
        drop(f.store);
        let again = fixture_in(dir);
        again.offers.install(Slot::Store, &campaigns(1)).unwrap();
        let d = entered(&again, "2026-11-23T16:00:00Z").await;
        assert!(d.chosen.is_empty(), "{:?}", d.chosen);
        let effects = again
            .offers
            .on_register_event(RegisterEvent::CustomerIdentified {
                register: Some("r1".into()),
                lane: None,
                loyalty_id: "c1".into(),
            })
            .await
            .unwrap();
        assert!(
            effects.offers.iter().all(|o| o.campaign != "birthday"),
            "{:?}",
            effects.offers
        );
    }

    #[tokio::test]
    async fn a_visit_no_birthday_campaign_answers_leaves_the_birthday_for_a_later_one() {
        let mut f = fixture();
        let key = OccasionKey::new("c1", Scope::Store, "birthday_visit", "2026");
        let occasions = Occasions::new(&f.store);
        // Only the lane greeting is live: the morning entry is a birthday visit nobody answers.
        let mut set: serde_json::Value = serde_json::from_slice(&campaigns(1)).unwrap();
        set["campaigns"].as_array_mut().unwrap().truncate(1);
        f.offers
            .install(Slot::Store, &serde_json::to_vec(&set).unwrap())
            .unwrap();
        let d = entered(&f, "2026-11-23T09:00:00Z").await;
        assert!(d.chosen.is_empty() && d.controls.is_empty());
        assert_eq!(
            occasions.unclaimed(std::slice::from_ref(&key)).unwrap(),
            [true]
        );
        // The birthday campaign arrives at noon: the afternoon entry fires it, and uses it up.
        f.offers.install(Slot::Store, &campaigns(2)).unwrap();
        let d = entered(&f, "2026-11-23T14:00:00Z").await;
        assert_eq!(d.chosen[0].campaign, "birthday");
        assert_eq!(
            occasions.unclaimed(std::slice::from_ref(&key)).unwrap(),
            [false]
        );
        let offer = sent(&mut f).pop().unwrap();
        assert_eq!(
            offer["data"]["triggers"],
            serde_json::json!(["store_entered", "birthday_visit"])
        );
    }

    #[tokio::test]
    async fn only_a_newer_valid_set_replaces_the_one_in_force_and_it_survives_a_restart() {
        let f = fixture();
        assert!(matches!(
            f.offers.install(Slot::Tenant, &campaigns(3)).unwrap(),
            Installed::Live {
                version: 3,
                live: 2,
                ..
            }
        ));
        assert_eq!(
            f.offers.install(Slot::Tenant, &campaigns(2)).unwrap(),
            Installed::Stale {
                version: 2,
                held: 3
            }
        );
        assert!(matches!(
            f.offers.install(Slot::Tenant, b"{not json"),
            Err(OffersError::Malformed(_))
        ));
        assert_eq!(f.offers.campaigns().version, 3);
        // A store set overrides a tenant campaign of the same id, and adds its own.
        let store_set = serde_json::json!({"version": 1, "campaigns": [{
            "id": "birthday", "name": "Store birthday", "valid_from": "2026-01-01T00:00:00Z",
            "valid_until": "2027-01-01T00:00:00Z", "trigger": {"kind": "birthday_visit"},
            "offers": [{"id": "flowers", "texts": {"push": {"en": "Flowers for you"}}}]
        }, {
            "id": "bad", "name": "Bad", "valid_from": "2026-01-01T00:00:00Z",
            "valid_until": "2027-01-01T00:00:00Z", "trigger": {"kind": "store_entered"},
            "audience": "profile.(", "offers": [{"id": "x", "texts": {"push": {"en": "x"}}}]
        }]});
        let installed = f
            .offers
            .install(Slot::Store, &serde_json::to_vec(&store_set).unwrap())
            .unwrap();
        let Installed::Live { live, rejected, .. } = installed else {
            panic!("{installed:?}")
        };
        assert_eq!(live, 2);
        assert_eq!(rejected[0].campaign, "bad");
        assert_eq!(
            f.offers
                .campaigns()
                .get("birthday")
                .unwrap()
                .campaign
                .offers[0]
                .id,
            "flowers"
        );

        let dir = f._dir;
        drop(f.offers);
        f.store.flush().await.unwrap();
        drop(f.store);
        let again = fixture_in(dir);
        assert_eq!(again.offers.campaigns().live.len(), 2);
        assert_eq!(again.offers.versions()["tenant"], 3);
        assert_eq!(
            again
                .offers
                .campaigns()
                .get("birthday")
                .unwrap()
                .campaign
                .offers[0]
                .id,
            "flowers"
        );
    }

    #[tokio::test]
    async fn the_file_set_is_used_only_until_central_sends_one() {
        let f = fixture();
        f.offers.install(Slot::File, &campaigns(9)).unwrap();
        assert_eq!(f.offers.campaigns().live.len(), 2);
        let central = serde_json::json!({"version": 1, "campaigns": []});
        f.offers
            .install(Slot::Tenant, &serde_json::to_vec(&central).unwrap())
            .unwrap();
        assert!(
            f.offers.campaigns().live.is_empty(),
            "central's set replaces the file's"
        );
    }

    fn arb_register_event() -> impl proptest::strategy::Strategy<Value = RegisterEvent> {
        use proptest::prelude::*;
        let s = || proptest::option::of(".{0,12}");
        prop_oneof![
            (s(), s(), ".{0,20}").prop_map(|(register, lane, loyalty_id)| {
                RegisterEvent::CustomerIdentified {
                    register,
                    lane,
                    loyalty_id,
                }
            }),
            (s(), s(), s()).prop_map(|(register, lane, loyalty_id)| {
                RegisterEvent::TransactionStarted {
                    register,
                    lane,
                    loyalty_id,
                }
            }),
            (s(), s(), proptest::collection::vec(any::<i64>(), 0..4)).prop_map(
                |(register, lane, lines)| RegisterEvent::BasketUpdated {
                    register,
                    lane,
                    lines: lines.into_iter().map(serde_json::Value::from).collect(),
                }
            ),
            (s(), s())
                .prop_map(|(register, lane)| RegisterEvent::TransactionEnded { register, lane }),
        ]
    }

    /// The wire form a POS sends: absent fields rather than nulls.
    fn wire(e: &RegisterEvent) -> serde_json::Value {
        let (kind, register, lane) = match e {
            RegisterEvent::CustomerIdentified { register, lane, .. } => {
                ("customer_identified", register, lane)
            }
            RegisterEvent::TransactionStarted { register, lane, .. } => {
                ("transaction_started", register, lane)
            }
            RegisterEvent::BasketUpdated { register, lane, .. } => {
                ("basket_updated", register, lane)
            }
            RegisterEvent::TransactionEnded { register, lane } => {
                ("transaction_ended", register, lane)
            }
        };
        let mut v = serde_json::json!({ "type": kind });
        if let Some(r) = register {
            v["register"] = r.as_str().into();
        }
        if let Some(l) = lane {
            v["lane"] = l.as_str().into();
        }
        match e {
            RegisterEvent::CustomerIdentified { loyalty_id, .. } => {
                v["loyalty_id"] = loyalty_id.as_str().into();
            }
            RegisterEvent::TransactionStarted {
                loyalty_id: Some(id),
                ..
            } => v["loyalty_id"] = id.as_str().into(),
            RegisterEvent::BasketUpdated { lines, .. } if !lines.is_empty() => {
                v["lines"] = lines.clone().into();
            }
            _ => {}
        }
        v
    }

    proptest::proptest! {
        #[test]
        fn register_events_parse_from_their_wire_form(e in arb_register_event()) {
            let bytes = serde_json::to_vec(&wire(&e)).unwrap();
            proptest::prop_assert_eq!(serde_json::from_slice::<RegisterEvent>(&bytes).unwrap(), e);
        }

        #[test]
        fn an_unknown_field_or_type_is_refused(e in arb_register_event(), key in "[a-z]{1,8}") {
            let mut v = wire(&e);
            proptest::prop_assume!(!["type", "register", "lane", "loyalty_id", "lines"].contains(&key.as_str()));
            v[key.as_str()] = 1.into();
            proptest::prop_assert!(serde_json::from_value::<RegisterEvent>(v.clone()).is_err());
            v.as_object_mut().unwrap().remove(&key);
            v["type"] = format!("{key}_x").into();
            proptest::prop_assert!(serde_json::from_value::<RegisterEvent>(v).is_err());
        }
    }
}
