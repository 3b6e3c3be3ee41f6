//! Campaigns as central ships them (JSON, versioned), and their compiled form.
//!
//! Invariants:
//! - A campaign set is compiled once per version: every audience expression is parsed into a
//!   CEL program then, never per decision.
//! - A campaign with a problem (a bad expression, an empty offer pool, a variant naming an offer
//!   that does not exist, weights that do not add up, a window that ends before it starts) is
//!   rejected with a message naming the campaign and the field; the other campaigns go live.
//! - Shares (holdout, variant weights) are integers in basis points or percent, never floats,
//!   so assignment is exact and the same on every gateway and in central.

use std::collections::BTreeMap;
use std::sync::Arc;

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::profiles::Item;

/// The campaign set: what central publishes on `…/campaigns` and serves over HTTPS.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CampaignSet {
    pub version: u64,
    #[serde(default)]
    pub campaigns: Vec<Campaign>,
}

impl CampaignSet {
    /// A set as central sends it and `offers.campaigns_file` holds it.
    pub fn from_json(bytes: &[u8]) -> Result<CampaignSet, serde_json::Error> {
        serde_json::from_slice(bytes)
    }
}

/// What makes a campaign consider a customer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Trigger {
    StoreEntered,
    ZoneDwelling {
        zone: String,
    },
    LaneArrived,
    /// A loyalty card scanned at a till.
    TransactionStarted,
    TransactionCompleted,
    /// The first visit on (or the day after a leap-day) birthday.
    BirthdayVisit,
    /// Overdue against the customer's own rhythm: overall, or in one product group.
    WinbackDue {
        #[serde(default)]
        group: Option<String>,
    },
}

impl Trigger {
    /// Every trigger name, for messages.
    pub const NAMES: [&'static str; 7] = [
        "store_entered",
        "zone_dwelling",
        "lane_arrived",
        "transaction_started",
        "transaction_completed",
        "birthday_visit",
        "winback_due",
    ];

    /// A trigger from its name; `zone_dwelling` needs the zone, `winback_due` takes a group.
    pub fn parse(name: &str, zone: Option<&str>, group: Option<&str>) -> Result<Trigger, String> {
        Ok(match name {
            "store_entered" => Trigger::StoreEntered,
            "zone_dwelling" => Trigger::ZoneDwelling {
                zone: zone.ok_or("zone_dwelling needs a zone")?.to_string(),
            },
            "lane_arrived" => Trigger::LaneArrived,
            "transaction_started" => Trigger::TransactionStarted,
            "transaction_completed" => Trigger::TransactionCompleted,
            "birthday_visit" => Trigger::BirthdayVisit,
            "winback_due" => Trigger::WinbackDue {
                group: group.map(str::to_string),
            },
            other => {
                return Err(format!(
                    "unknown trigger {other:?}; one of {}",
                    Trigger::NAMES.join(", ")
                ));
            }
        })
    }

    pub fn name(&self) -> &'static str {
        match self {
            Trigger::StoreEntered => "store_entered",
            Trigger::ZoneDwelling { .. } => "zone_dwelling",
            Trigger::LaneArrived => "lane_arrived",
            Trigger::TransactionStarted => "transaction_started",
            Trigger::TransactionCompleted => "transaction_completed",
            Trigger::BirthdayVisit => "birthday_visit",
            Trigger::WinbackDue { .. } => "winback_due",
        }
    }
}

/// Where a campaign runs; an empty list means everywhere.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Scope {
    pub stores: Vec<String>,
    pub zones: Vec<String>,
    pub lanes: Vec<String>,
}

/// The channels an offer can be shown on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Channel {
    /// A push to the customer's phone, sent by central from `storelink.offer.v1`.
    Push,
    /// The loyalty prompt on the lane display and in the POS effects.
    Cashier,
}

/// Texts per language, with `{first_name}`-style slots.
pub type Texts = BTreeMap<String, String>;

/// One offer of a campaign's pool.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Offer {
    pub id: String,
    /// Per channel, per language. A channel missing here is not used by this offer.
    pub texts: BTreeMap<Channel, Texts>,
    /// Per channel, per language: used when a slot the text needs has no value.
    #[serde(default)]
    pub fallback: BTreeMap<Channel, Texts>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub barcode: Option<String>,
    /// What a redemption is: a later purchase of one of these.
    #[serde(default)]
    pub items: Vec<Item>,
}

/// Propensity: a default, and per segment (central's model); the highest matching segment
/// wins.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Propensity {
    #[serde(default = "one")]
    pub default: f64,
    #[serde(default)]
    pub by_segment: BTreeMap<String, f64>,
}

impl Default for Propensity {
    fn default() -> Self {
        Propensity {
            default: 1.0,
            by_segment: BTreeMap::new(),
        }
    }
}

fn one() -> f64 {
    1.0
}

/// A per-customer frequency cap: at most `max` offers of this campaign per period.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cap {
    pub max: u32,
    pub per: Period,
}

/// Calendar periods in the store's time zone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Period {
    Day,
    /// ISO week, Monday to Sunday.
    Week,
    /// The campaign's whole life.
    Campaign,
}

/// An A/B variant: its share of the exposed customers, and the offer it shows.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Variant {
    pub id: String,
    /// Percent of the exposed customers; the variants' weights add up to 100.
    pub weight: u32,
    pub offer: String,
}

/// One campaign as central writes it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Campaign {
    pub id: String,
    pub name: String,
    pub valid_from: Timestamp,
    pub valid_until: Timestamp,
    #[serde(default)]
    pub scope: Scope,
    pub trigger: Trigger,
    /// A CEL expression over `profile`, `kpi`, `event` and `segments`; absent means everyone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audience: Option<String>,
    pub offers: Vec<Offer>,
    #[serde(default = "one")]
    pub priority: f64,
    #[serde(default)]
    pub propensity: Propensity,
    /// Value of a redemption to the retailer, in minor units.
    #[serde(default)]
    pub value: i64,
    #[serde(default)]
    pub caps: Vec<Cap>,
    /// Most offers this campaign may make in all (at this store).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<u64>,
    /// Without variants every exposed customer gets the first offer of the pool.
    #[serde(default)]
    pub variants: Vec<Variant>,
    /// Basis points (1/100 of a percent) of customers held out as the control group.
    #[serde(default)]
    pub holdout_bp: u32,
    /// Days after an offer in which a qualifying purchase counts as its redemption.
    #[serde(default = "default_attribution_days")]
    pub attribution_days: u32,
}

fn default_attribution_days() -> u32 {
    14
}

/// A campaign ready for decisions.
#[derive(Debug)]
pub struct Compiled {
    pub campaign: Campaign,
    pub audience: Option<super::audience::Audience>,
}

/// Why a campaign could not go live.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Rejected {
    pub campaign: String,
    pub field: String,
    pub message: String,
}

impl std::fmt::Display for Rejected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "campaign {:?}: {}: {}",
            self.campaign, self.field, self.message
        )
    }
}

/// A compiled campaign set: the campaigns that went live and the ones rejected.
#[derive(Debug, Default)]
pub struct CompiledSet {
    pub version: u64,
    pub live: Vec<Arc<Compiled>>,
    pub rejected: Vec<Rejected>,
    /// Campaign id → position in `live`.
    index: std::collections::HashMap<String, usize>,
    /// The live campaigns with a budget: the only counters a decision has to read.
    budgeted: Vec<String>,
    /// The triggers some live campaign listens to, by name: an event no campaign listens to
    /// needs no decision at all.
    triggers: std::collections::HashSet<&'static str>,
}

impl CompiledSet {
    /// Compiles every campaign; a problem rejects only its campaign.
    pub fn compile(set: CampaignSet) -> CompiledSet {
        let mut out = CompiledSet {
            version: set.version,
            ..CompiledSet::default()
        };
        let mut ids = std::collections::HashSet::new();
        for campaign in set.campaigns {
            if !ids.insert(campaign.id.clone()) {
                out.rejected.push(Rejected {
                    campaign: campaign.id.clone(),
                    field: "id".into(),
                    message: "another campaign in this set has the same id".into(),
                });
                continue;
            }
            match compile_one(campaign) {
                Ok(c) => {
                    out.index.insert(c.campaign.id.clone(), out.live.len());
                    if c.campaign.budget.is_some() {
                        out.budgeted.push(c.campaign.id.clone());
                    }
                    out.triggers.insert(c.campaign.trigger.name());
                    out.live.push(Arc::new(c));
                }
                Err(r) => out.rejected.push(r),
            }
        }
        out
    }

    /// A live campaign by id.
    pub fn get(&self, id: &str) -> Option<&Compiled> {
        self.index.get(id).map(|i| self.live[*i].as_ref())
    }

    /// Whether a live campaign may fire on `trigger` (by its kind: a win-back campaign of one
    /// group counts for every win-back). False means a decision on it can only be empty.
    pub fn listens_to(&self, trigger: &Trigger) -> bool {
        self.triggers.contains(trigger.name())
    }

    /// Ids of the live campaigns that have a budget.
    pub fn budgeted(&self) -> &[String] {
        &self.budgeted
    }
}

fn compile_one(campaign: Campaign) -> Result<Compiled, Rejected> {
    let reject = |field: &str, message: String| Rejected {
        campaign: campaign.id.clone(),
        field: field.to_string(),
        message,
    };
    if campaign.id.is_empty() {
        return Err(reject("id", "must not be empty".into()));
    }
    if campaign.valid_until <= campaign.valid_from {
        return Err(reject(
            "valid_until",
            format!("{} is not after valid_from", campaign.valid_until),
        ));
    }
    if campaign.offers.is_empty() {
        return Err(reject("offers", "the pool is empty".into()));
    }
    for (i, o) in campaign.offers.iter().enumerate() {
        if o.texts.is_empty() {
            return Err(reject(
                &format!("offers[{i}].texts"),
                "no channel has a text".into(),
            ));
        }
    }
    if !campaign.variants.is_empty() {
        let total: u32 = campaign.variants.iter().map(|v| v.weight).sum();
        if total != 100 {
            return Err(reject(
                "variants",
                format!("weights add up to {total}, not 100"),
            ));
        }
        for (i, v) in campaign.variants.iter().enumerate() {
            if !campaign.offers.iter().any(|o| o.id == v.offer) {
                return Err(reject(
                    &format!("variants[{i}].offer"),
                    format!("no offer {:?} in the pool", v.offer),
                ));
            }
        }
    }
    if campaign.holdout_bp > 10_000 {
        return Err(reject(
            "holdout_bp",
            format!("{} is more than 10000 (100%)", campaign.holdout_bp),
        ));
    }
    let finite = |x: f64| x.is_finite() && x >= 0.0;
    if !finite(campaign.priority)
        || !finite(campaign.propensity.default)
        || !campaign.propensity.by_segment.values().all(|p| finite(*p))
    {
        return Err(reject(
            "priority",
            "priority and propensities must be finite and not negative".into(),
        ));
    }
    if let Some(c) = campaign.caps.iter().find(|c| c.max == 0) {
        return Err(reject(
            "caps",
            format!("a cap of 0 per {:?} would never show the offer", c.per),
        ));
    }
    let audience = match &campaign.audience {
        None => None,
        Some(source) => Some(
            super::audience::Audience::compile(source)
                .map_err(|e| reject("audience", format!("not a CEL expression: {e}")))?,
        ),
    };
    Ok(Compiled { campaign, audience })
}
