//! The offers' share of the durable step: loyalty transactions attributed to the offers made
//! before them, as redemptions in the same log transaction, and the `transaction_completed`
//! trigger once the step is durable.
//!
//! Registered with the engine as a [`CommitHook`] by the agent, after the profile KPIs.
//!
//! Invariants:
//! - Idempotent: attributing a transaction again (a resend, a journal replay) yields the same
//!   redemptions with the same event ids and counts nothing twice (the ledger's own check).
//! - A completed transaction is announced only for a first store (`new`), after the step is
//!   durable; a full trigger channel drops the trigger and counts it, never blocks the commit.

use tokio::sync::mpsc;

use super::ledger::{Group, OfferLedger};
use super::live::Completed;
use crate::events::{self, EventKind};
use crate::model::ingest::{CommitHook, Committed, NewEvent, StepOutput};
use crate::profiles::{Profile, ProfileStore};
use crate::store::StoreError;

/// Attribution of loyalty transactions, as a hook of the durable step.
pub struct Attribution {
    pub profiles: ProfileStore,
    pub ledger: OfferLedger,
    pub store_id: String,
    /// Completed loyalty transactions for the `transaction_completed` trigger.
    pub completed: mpsc::Sender<Completed>,
}

impl CommitHook for Attribution {
    fn committed(&self, group: &[Committed<'_>], out: &mut StepOutput) -> Result<(), StoreError> {
        let mut completed = Vec::new();
        for Committed { tx, new } in group {
            let Some(card) = tx.loyalty_id.as_deref() else {
                continue;
            };
            if !Profile::valid_id(card) {
                continue;
            }
            let customer = self.profiles.resolve_card(card)?;
            for r in self.ledger.attribute(&customer, &self.store_id, tx)? {
                let id = r.event_id();
                out.events.push(NewEvent {
                    kind: EventKind::Redemption,
                    payload: events::encode(
                        EventKind::Redemption,
                        &id,
                        &self.store_id,
                        r.transaction_at,
                        &r,
                    ),
                    id,
                });
                if *new {
                    let group = match r.group {
                        Group::Exposed => "exposed",
                        Group::Control => "control",
                    };
                    metrics::counter!("storelink_redemptions_total", "campaign" => r.campaign.clone(), "group" => group).increment(1);
                }
            }
            if *new {
                completed.push(Completed {
                    customer_id: customer,
                    lane: tx.lane.clone(),
                    at: tx.ended_at,
                    basket: super::decide::Basket::of(tx),
                });
            }
        }
        if !completed.is_empty() {
            let tx = self.completed.clone();
            out.after.push(Box::new(move || {
                for done in completed {
                    if tx.try_send(done).is_err() {
                        metrics::counter!("storelink_offer_triggers_dropped_total", "source" => "transactions").increment(1);
                    }
                }
            }));
        }
        Ok(())
    }
}
