//! The decision: for one occasion (a trigger with its place and time) and one customer, which
//! offer to show on each channel, and why every campaign was or was not chosen.
//!
//! Invariants:
//! - [`decide`] is a pure function of the compiled campaign set, the profile and KPIs, the
//!   occasion (which carries the time), and the customer's cap state. No clock, no I/O: the
//!   caller reads the state and records the outcome.
//! - No personalised-offer consent, no offer, and nothing is evaluated for that customer.
//! - Assignment is deterministic: the control group and the A/B variant come from a SHA-256
//!   of (customer, campaign), so a customer stays in their group across restarts, gateways
//!   and central's own analysis.
//! - Control decisions are reported with the offer they would have shown, and never shown.
//! - At most one offer per channel: the highest score (priority × propensity × value) wins,
//!   ties going to the smaller campaign id.

use std::collections::BTreeMap;

use jiff::Timestamp;
use jiff::tz::TimeZone;
use serde::Serialize;
use sha2::{Digest, Sha256};

use super::campaign::{Cap, Channel, Compiled, CompiledSet, Offer, Period, Trigger, Variant};
use crate::profiles::kpi::KpiView;
use crate::profiles::{Item, Profile};

/// What happened, where and when. One moment can be several triggers at once: a store entry
/// on the customer's birthday while they are overdue is `store_entered`, `birthday_visit` and
/// `winback_due`, decided together so each channel still gets at most one offer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Occasion {
    pub triggers: Vec<Trigger>,
    pub store: String,
    pub zone: Option<String>,
    pub lane: Option<String>,
    pub at: Timestamp,
    /// The basket of the transaction that triggered it (`transaction_completed`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub basket: Option<Basket>,
}

/// What a campaign sees of the basket just bought: "just bought a PS5" is
/// `'ps5-console' in event.basket.skus`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Basket {
    /// Categories of the basket's lines, sorted, without repeats.
    pub categories: Vec<String>,
    /// SKUs of its lines, sorted, without repeats.
    pub skus: Vec<String>,
    /// Minor units.
    pub total: i64,
}

impl Basket {
    pub fn of(tx: &crate::model::transaction::Transaction) -> Basket {
        let lines = tx.lines.iter().filter(|l| !l.voided);
        let mut categories: Vec<String> =
            lines.clone().filter_map(|l| l.category.clone()).collect();
        let mut skus: Vec<String> = lines.map(|l| l.sku.clone()).collect();
        categories.sort();
        categories.dedup();
        skus.sort();
        skus.dedup();
        Basket {
            categories,
            skus,
            total: tx.total,
        }
    }
}

/// What the caller knows about one customer's past offers.
#[derive(Debug, Clone, Default)]
pub struct CapState {
    /// Campaign id → when this customer was shown its offers.
    pub shown: BTreeMap<String, Vec<Timestamp>>,
    /// Campaign id → offers made in all (the budget used).
    pub budget_used: BTreeMap<String, u64>,
}

/// Why a campaign was or was not chosen.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Outcome {
    NotLive,
    OutOfScope,
    OtherTrigger,
    NoConsent,
    NotInAudience,
    AudienceError {
        error: String,
    },
    Capped {
        cap: String,
    },
    BudgetSpent {
        budget: u64,
    },
    /// In the holdout group: no offer, recorded as a control decision.
    Control {
        variant: Option<String>,
        offer: String,
    },
    /// The offer has no text for any channel it could use.
    NoText,
    Outranked {
        channel: Channel,
        by: String,
    },
    Chosen {
        channel: Channel,
        score: f64,
    },
}

/// One campaign's line in the explanation.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Explained {
    pub campaign: String,
    #[serde(flatten)]
    pub outcome: Outcome,
}

/// An offer to show.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Chosen {
    pub channel: Channel,
    pub campaign: String,
    pub variant: Option<String>,
    pub offer: String,
    /// Language → rendered text.
    pub text: BTreeMap<String, String>,
    pub code: Option<String>,
    pub barcode: Option<String>,
    pub items: Vec<Item>,
    pub score: f64,
}

/// A control-group decision: what would have been shown.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Control {
    pub campaign: String,
    pub variant: Option<String>,
    pub offer: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Decision {
    pub chosen: Vec<Chosen>,
    pub controls: Vec<Control>,
    pub explained: Vec<Explained>,
}

/// A bucket in 0..10000 for (customer, campaign, purpose), the same everywhere.
pub fn bucket(customer: &str, campaign: &str, purpose: &str) -> u32 {
    let mut h = Sha256::new();
    for part in [customer, campaign, purpose] {
        h.update(part.as_bytes());
        h.update([0]);
    }
    let d = h.finalize();
    (u64::from_be_bytes(d[..8].try_into().expect("8 bytes")) % 10_000) as u32
}

/// Whether the customer is in the campaign's control group.
pub fn in_holdout(customer: &str, campaign: &str, holdout_bp: u32) -> bool {
    bucket(customer, campaign, "holdout") < holdout_bp
}

/// The customer's A/B variant (weights in percent adding up to 100).
pub fn variant<'v>(customer: &str, campaign: &str, variants: &'v [Variant]) -> Option<&'v Variant> {
    let b = bucket(customer, campaign, "variant") % 100;
    let mut upto = 0;
    variants.iter().find(|v| {
        upto += v.weight;
        b < upto
    })
}

/// When the period of a cap that contains `at` began, in the store's time zone.
fn period_start(period: Period, at: Timestamp, tz: &TimeZone, valid_from: Timestamp) -> Timestamp {
    let zoned = at.to_zoned(tz.clone());
    let day = zoned.date();
    let first = match period {
        Period::Campaign => return valid_from,
        Period::Day => day,
        Period::Week => {
            let back = i64::from(day.weekday().to_monday_zero_offset());
            day.checked_sub(jiff::Span::new().days(back)).unwrap_or(day)
        }
    };
    first
        .to_zoned(tz.clone())
        .map(|z| z.timestamp())
        .unwrap_or(at)
}

fn capped(c: &Compiled, state: &CapState, at: Timestamp, tz: &TimeZone) -> Option<Cap> {
    let shown = state.shown.get(&c.campaign.id)?;
    c.campaign.caps.iter().copied().find(|cap| {
        let since = period_start(cap.per, at, tz, c.campaign.valid_from);
        shown.iter().filter(|t| **t >= since && **t <= at).count() as u64 >= u64::from(cap.max)
    })
}

fn trigger_matches(wanted: &Trigger, got: &Trigger) -> bool {
    match (wanted, got) {
        (Trigger::WinbackDue { group: None }, Trigger::WinbackDue { .. }) => true,
        _ => wanted == got,
    }
}

/// Which of `triggers` the decision fired on: a chosen or control campaign listens to it,
/// or its audience reads `event` (and so may test for it). What an in-store occasion is used
/// up by; a trigger no winner rests on stays unclaimed.
pub fn fired_on(set: &CompiledSet, decision: &Decision, triggers: &[Trigger]) -> Vec<bool> {
    let ids = decision.chosen.iter().map(|c| c.campaign.as_str());
    let winners: Vec<&Compiled> = ids
        .chain(decision.controls.iter().map(|c| c.campaign.as_str()))
        .filter_map(|id| set.get(id))
        .collect();
    triggers
        .iter()
        .map(|t| {
            winners.iter().any(|w| {
                trigger_matches(&w.campaign.trigger, t)
                    || w.audience.as_ref().is_some_and(|a| a.reads_event())
            })
        })
        .collect()
}

fn in_scope(c: &Compiled, o: &Occasion) -> bool {
    let s = &c.campaign.scope;
    let within = |list: &[String], v: Option<&str>| {
        list.is_empty() || v.is_some_and(|v| list.iter().any(|x| x == v))
    };
    within(&s.stores, Some(&o.store))
        && within(&s.zones, o.zone.as_deref())
        && within(&s.lanes, o.lane.as_deref())
}

/// The variables an audience expression sees.
pub(super) fn audience_context(
    profile: &Profile,
    kpi: Option<&KpiView>,
    occasion: &Occasion,
) -> cel::Context<'static, 'static> {
    let mut ctx = cel::Context::default();
    let mut shown = profile.clone();
    // Expressions have no use for the key, and must not be able to leak it into a text.
    shown.presence_key = None;
    let value = |v: serde_json::Value| cel::to_value(v).unwrap_or(cel::Value::Null);
    ctx.add_variable_from_value(
        "profile",
        value(serde_json::to_value(&shown).unwrap_or_default()),
    );
    ctx.add_variable_from_value(
        "segments",
        value(serde_json::to_value(&profile.segments).unwrap_or_default()),
    );
    ctx.add_variable_from_value(
        "kpi",
        value(
            kpi.map(|k| serde_json::to_value(k).unwrap_or_default())
                .unwrap_or_else(|| serde_json::json!({})),
        ),
    );
    ctx.add_variable_from_value(
        "event",
        value(serde_json::json!({
            "trigger": occasion.triggers.first().map(Trigger::name),
            "triggers": occasion.triggers.iter().map(Trigger::name).collect::<Vec<_>>(),
            "zone": occasion.zone,
            "lane": occasion.lane,
            "basket": occasion.basket,
        })),
    );
    ctx
}

fn propensity(c: &Compiled, profile: &Profile) -> f64 {
    let p = &c.campaign.propensity;
    profile
        .segments
        .iter()
        .filter_map(|s| p.by_segment.get(s).copied())
        .fold(None, |best: Option<f64>, x| {
            Some(best.map_or(x, |b| b.max(x)))
        })
        .unwrap_or(p.default)
}

/// Fills `{slot}`s from `slots`; `None` when a slot has no value.
pub fn render(template: &str, slots: &BTreeMap<&str, String>) -> Option<String> {
    let mut out = String::with_capacity(template.len() + 16);
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        let close = after.find('}')?;
        out.push_str(slots.get(&after[..close])?);
        rest = &after[close + 1..];
    }
    out.push_str(rest);
    Some(out)
}

fn item_text(item: &Item) -> &str {
    match item {
        Item::Category(c) | Item::Sku(c) => c,
    }
}

/// The slots a template can use, from the profile and KPIs. `{suggestion}` is central's
/// follow-up with the highest confidence, else the one the store's own baskets suggest.
fn slots(profile: &Profile, kpi: Option<&KpiView>) -> BTreeMap<&'static str, String> {
    let mut s = BTreeMap::new();
    if let Some(n) = &profile.first_name {
        s.insert("first_name", n.clone());
    }
    if let Some(t) = &profile.tier {
        s.insert("tier", t.clone());
    }
    s.insert("points", profile.points.to_string());
    if let Some(f) = profile
        .follow_ups
        .iter()
        .max_by(|a, b| a.confidence.total_cmp(&b.confidence))
    {
        s.insert("suggestion", item_text(&f.suggest).to_string());
    } else if let Some(f) = kpi.and_then(|k| k.follow_up.as_ref()) {
        s.insert("suggestion", item_text(&f.suggest).to_string());
    }
    s
}

/// The offer's text on a channel in every language it has, each from the template or, when a
/// slot is missing, the fallback; `None` when neither renders.
fn texts(
    offer: &Offer,
    channel: Channel,
    slots: &BTreeMap<&str, String>,
) -> Option<BTreeMap<String, String>> {
    let templates = offer.texts.get(&channel)?;
    let mut out = BTreeMap::new();
    for (lang, t) in templates {
        let fallback = offer.fallback.get(&channel).and_then(|f| f.get(lang));
        if let Some(text) = render(t, slots).or_else(|| fallback.and_then(|f| render(f, slots))) {
            out.insert(lang.clone(), text);
        }
    }
    (!out.is_empty()).then_some(out)
}

/// Decides. See the module invariants.
///
/// Long on purpose: one pass over the live campaigns (consent, triggers, audience, caps,
/// the A/B arm) that fills the candidate list and the explanation together, then the choice per
/// channel; the explanation must name every campaign in the order it was judged, which a
/// split into stages would have to thread through each of them.
pub fn decide(
    set: &CompiledSet,
    profile: &Profile,
    kpi: Option<&KpiView>,
    occasion: &Occasion,
    state: &CapState,
    tz: &TimeZone,
) -> Decision {
    let mut decision = Decision::default();
    let mut explain = |campaign: &str, outcome: Outcome| {
        decision.explained.push(Explained {
            campaign: campaign.to_string(),
            outcome,
        })
    };
    let consent = profile.consents.personalised_offers;
    let slots = slots(profile, kpi);
    let mut ctx = None;
    // Channel → (score, campaign id, candidate) of the best so far.
    let mut best: BTreeMap<Channel, Chosen> = BTreeMap::new();
    let mut candidates: Vec<Chosen> = Vec::new();
    let mut controls = Vec::new();
    for c in &set.live {
        let id = &c.campaign.id;
        if occasion.at < c.campaign.valid_from || occasion.at >= c.campaign.valid_until {
            explain(id, Outcome::NotLive);
            continue;
        }
        if !occasion
            .triggers
            .iter()
            .any(|t| trigger_matches(&c.campaign.trigger, t))
        {
            explain(id, Outcome::OtherTrigger);
            continue;
        }
        if !in_scope(c, occasion) {
            explain(id, Outcome::OutOfScope);
            continue;
        }
        if !consent {
            explain(id, Outcome::NoConsent);
            continue;
        }
        if let Some(audience) = &c.audience {
            let verdict = match audience.fast(profile, kpi, occasion) {
                Some(b) => Ok(cel::Value::Bool(b)),
                None => {
                    let ctx = ctx.get_or_insert_with(|| audience_context(profile, kpi, occasion));
                    audience.program.execute(ctx)
                }
            };
            match verdict {
                Ok(cel::Value::Bool(true)) => {}
                Ok(cel::Value::Bool(false)) => {
                    explain(id, Outcome::NotInAudience);
                    continue;
                }
                Ok(other) => {
                    explain(
                        id,
                        Outcome::AudienceError {
                            error: format!("not a boolean: {other:?}"),
                        },
                    );
                    continue;
                }
                Err(e) => {
                    explain(
                        id,
                        Outcome::AudienceError {
                            error: e.to_string(),
                        },
                    );
                    continue;
                }
            }
        }
        if let Some(cap) = capped(c, state, occasion.at, tz) {
            explain(
                id,
                Outcome::Capped {
                    cap: format!("{} per {:?}", cap.max, cap.per).to_lowercase(),
                },
            );
            continue;
        }
        if let Some(budget) = c.campaign.budget
            && state.budget_used.get(id).copied().unwrap_or(0) >= budget
        {
            explain(id, Outcome::BudgetSpent { budget });
            continue;
        }
        let variant = variant(&profile.customer_id, id, &c.campaign.variants);
        let offer_id = variant
            .map(|v| v.offer.as_str())
            .unwrap_or(&c.campaign.offers[0].id);
        let offer = c
            .campaign
            .offers
            .iter()
            .find(|o| o.id == offer_id)
            .expect("compile checked that variants name offers of the pool");
        if in_holdout(&profile.customer_id, id, c.campaign.holdout_bp) {
            explain(
                id,
                Outcome::Control {
                    variant: variant.map(|v| v.id.clone()),
                    offer: offer.id.clone(),
                },
            );
            controls.push(Control {
                campaign: id.clone(),
                variant: variant.map(|v| v.id.clone()),
                offer: offer.id.clone(),
            });
            continue;
        }
        let score = c.campaign.priority * propensity(c, profile) * c.campaign.value.max(1) as f64;
        let mut any = false;
        for channel in offer.texts.keys().copied() {
            let Some(text) = texts(offer, channel, &slots) else {
                continue;
            };
            any = true;
            candidates.push(Chosen {
                channel,
                campaign: id.clone(),
                variant: variant.map(|v| v.id.clone()),
                offer: offer.id.clone(),
                text,
                code: offer.code.clone(),
                barcode: offer.barcode.clone(),
                items: offer.items.clone(),
                score,
            });
        }
        if !any {
            explain(id, Outcome::NoText);
        }
    }
    for cand in &candidates {
        let better = match best.get(&cand.channel) {
            None => true,
            Some(b) => {
                cand.score > b.score || (cand.score == b.score && cand.campaign < b.campaign)
            }
        };
        if better {
            best.insert(cand.channel, cand.clone());
        }
    }
    for cand in candidates {
        let winner = &best[&cand.channel];
        let outcome = if winner.campaign == cand.campaign {
            Outcome::Chosen {
                channel: cand.channel,
                score: cand.score,
            }
        } else {
            Outcome::Outranked {
                channel: cand.channel,
                by: winner.campaign.clone(),
            }
        };
        explain(&cand.campaign, outcome);
    }
    decision.chosen = best.into_values().collect();
    decision.controls = controls;
    decision
}
