//! Offers: campaigns from central, and the decision of which offer a customer gets on which
//! channel at a given moment.
//!
//! - [`campaign`]: the campaign model and its compilation;
//! - [`audience`]: audience expressions (CEL, and a typed fast path for the common shapes);
//! - [`decide`]: the pure decision;
//! - [`ledger`]: caps, budgets, offer history, attribution and counts in sled;
//! - [`attribution`]: the ledger's attribution as a hook of the engine's durable step;
//! - [`stats`]: campaign success and the uplift test;
//! - [`live`]: the service that wires triggers (presence, register events, completed
//!   transactions) to decisions, prompts and events;
//! - [`sync`]: campaign sets from central over HTTPS.
//!
//! Invariants: see each module. In short, a bad campaign never stops the others, a decision is
//! a pure function of its inputs, and assignment to control groups and variants is the same
//! everywhere.
//!
//! One import cycle inside this module, on purpose: a campaign (`campaign`) holds its compiled
//! audience expression (`audience`), and that expression is evaluated against the trigger and
//! occasion a decision (`decide`) is made for. The three are one language: splitting the shared
//! types out would leave a module of types with no behaviour of its own.

pub mod attribution;
pub mod audience;
pub mod campaign;
pub mod decide;
pub mod ledger;
pub mod live;
pub mod report;
pub mod stats;
pub mod sync;

#[cfg(test)]
mod tests {
    use super::campaign::*;
    use super::decide::*;
    use crate::profiles::kpi::{KpiConfig, Kpis, LedgerEntry};
    use crate::profiles::{FollowUp, Item, Profile};
    use jiff::tz::TimeZone;

    fn set(json: serde_json::Value) -> CompiledSet {
        CompiledSet::compile(serde_json::from_value(json).unwrap())
    }

    fn games_campaign() -> serde_json::Value {
        serde_json::json!({
            "id": "games-after-console",
            "name": "Games for console buyers",
            "valid_from": "2026-01-01T00:00:00Z",
            "valid_until": "2027-01-01T00:00:00Z",
            "trigger": {"kind": "store_entered"},
            "audience": "profile.follow_ups.exists(f, f.if_bought.category == 'consoles')",
            "offers": [{
                "id": "games-20",
                "texts": {
                    "push": {"de": "Hallo {first_name}, -20% auf {suggestion}", "en": "Hi {first_name}, 20% off {suggestion}"},
                    "cashier": {"de": "{first_name} ({tier}): -20% auf Spiele anbieten"}
                },
                "fallback": {"push": {"de": "-20% auf Spiele", "en": "20% off games"}},
                "code": "GAMES20",
                "items": [{"category": "games"}]
            }],
            "priority": 2.0,
            "value": 1500,
            "caps": [{"max": 1, "per": "day"}, {"max": 3, "per": "week"}]
        })
    }

    fn winback_campaign() -> serde_json::Value {
        serde_json::json!({
            "id": "winback-fashion",
            "name": "Fashion win-back",
            "valid_from": "2026-01-01T00:00:00Z",
            "valid_until": "2027-01-01T00:00:00Z",
            "trigger": {"kind": "winback_due", "group": "fashion"},
            "audience": "'fashion' in kpi.overdue_groups",
            "offers": [{"id": "fashion-10", "texts": {"push": {"en": "We miss you, {first_name}: 10% off"}}}],
            "value": 800
        })
    }

    fn ps_buyer() -> Profile {
        let mut p = Profile::new("c-ps5");
        p.first_name = Some("Ada".into());
        p.tier = Some("gold".into());
        p.consents.personalised_offers = true;
        p.follow_ups = vec![FollowUp {
            if_bought: Item::Category("consoles".into()),
            suggest: Item::Category("Spiele".into()),
            confidence: 0.6,
            lift: 3.2,
        }];
        p
    }

    fn occasion(trigger: Trigger, at: &str) -> Occasion {
        Occasion {
            triggers: vec![trigger],
            store: "s042".into(),
            zone: None,
            lane: None,
            at: at.parse().unwrap(),
            basket: None,
        }
    }

    fn berlin() -> TimeZone {
        TimeZone::get("Europe/Berlin").unwrap()
    }

    /// The customer walks into the store at `at` (the trigger most scenarios use).
    fn entered(s: &CompiledSet, p: &Profile, at: &str, state: &CapState) -> Decision {
        decide(
            s,
            p,
            None,
            &occasion(Trigger::StoreEntered, at),
            state,
            &berlin(),
        )
    }

    #[test]
    fn a_lifecycle_trigger_is_used_up_only_by_a_winner_that_rests_on_it() {
        let campaign = |id: &str, trigger: &str, audience: &str, value: u32| {
            serde_json::json!({
                "id": id,
                "name": id,
                "valid_from": "2026-01-01T00:00:00Z",
                "valid_until": "2027-01-01T00:00:00Z",
                "trigger": {"kind": trigger},
                "audience": audience,
                "offers": [{"id": "o", "texts": {"push": {"en": "hi"}}}],
                "value": value
            })
        };
        let mut o = occasion(Trigger::StoreEntered, "2026-11-23T10:00:00Z");
        o.triggers.push(Trigger::BirthdayVisit);
        let lifecycle = &o.triggers[1..];
        let fired = |campaigns: Vec<serde_json::Value>| {
            let s = set(serde_json::json!({"version": 1, "campaigns": campaigns}));
            let d = decide(&s, &ps_buyer(), None, &o, &CapState::default(), &berlin());
            assert_eq!(d.chosen.len(), 1, "{:?}", d.explained);
            fired_on(&s, &d, lifecycle)
        };
        // The birthday campaign wins: it is used up.
        let birthday = campaign("cake", "birthday_visit", "true", 900);
        let hello = campaign("hello", "store_entered", "profile.tier == 'gold'", 100);
        assert_eq!(fired(vec![birthday.clone(), hello.clone()]), [true]);
        // The entry greeting wins over a birthday campaign that is worth less: not used up.
        let small_cake = campaign("cake", "birthday_visit", "true", 50);
        assert_eq!(fired(vec![small_cake, hello]), [false]);
        // An entry campaign whose audience tests the occasion's triggers rests on it.
        let reads = campaign(
            "hello",
            "store_entered",
            "'birthday_visit' in event.triggers",
            100,
        );
        assert_eq!(fired(vec![reads]), [true]);
    }

    #[test]
    fn the_playstation_buyer_walks_in_and_gets_the_games_offer() {
        let s = set(
            serde_json::json!({"version": 1, "campaigns": [games_campaign(), winback_campaign()]}),
        );
        assert!(s.rejected.is_empty(), "{:?}", s.rejected);
        let d = entered(
            &s,
            &ps_buyer(),
            "2026-11-23T10:00:00Z",
            &CapState::default(),
        );
        let push = d
            .chosen
            .iter()
            .find(|c| c.channel == Channel::Push)
            .unwrap();
        assert_eq!(push.campaign, "games-after-console");
        assert_eq!(push.text["de"], "Hallo Ada, -20% auf Spiele");
        assert_eq!(push.text["en"], "Hi Ada, 20% off Spiele");
        assert_eq!(push.code.as_deref(), Some("GAMES20"));
        assert_eq!(push.score, 3000.0, "priority 2 × propensity 1 × value 1500");
        let cashier = d
            .chosen
            .iter()
            .find(|c| c.channel == Channel::Cashier)
            .unwrap();
        assert_eq!(cashier.text["de"], "Ada (gold): -20% auf Spiele anbieten");
        let why: Vec<_> = d
            .explained
            .iter()
            .map(|e| (e.campaign.as_str(), &e.outcome))
            .collect();
        assert!(
            why.contains(&("winback-fashion", &Outcome::OtherTrigger)),
            "{why:?}"
        );

        // Without a first name the push falls back; the cashier text has no fallback and goes.
        let mut anonymous = ps_buyer();
        anonymous.first_name = None;
        let d = entered(&s, &anonymous, "2026-11-23T10:00:00Z", &CapState::default());
        assert_eq!(d.chosen.len(), 1);
        assert_eq!(d.chosen[0].text["en"], "20% off games");
    }

    #[test]
    fn a_customer_due_for_winback_gets_the_winback_offer() {
        let s = set(
            serde_json::json!({"version": 1, "campaigns": [games_campaign(), winback_campaign()]}),
        );
        let day = |d: &str| d.parse::<jiff::civil::Date>().unwrap();
        let ledger: Vec<LedgerEntry> = ["2026-01-10", "2026-03-10", "2026-05-10"]
            .iter()
            .map(|d| LedgerEntry {
                day: day(d),
                amount: 5000,
                anchors: Vec::new(),
                main: None,
                groups: vec!["fashion".into()],
            })
            .collect();
        let view =
            Kpis::compute(&ledger).view(day("2026-11-23"), &KpiConfig::default(), None, None);
        assert_eq!(view.overdue_groups, ["fashion"]);
        let mut p = Profile::new("c-fashion");
        p.first_name = Some("Ben".into());
        p.consents.personalised_offers = true;
        let due = Trigger::WinbackDue {
            group: Some("fashion".into()),
        };
        let d = decide(
            &s,
            &p,
            Some(&view),
            &occasion(due.clone(), "2026-11-23T10:00:00Z"),
            &CapState::default(),
            &berlin(),
        );
        assert_eq!(d.chosen.len(), 1);
        assert_eq!(d.chosen[0].campaign, "winback-fashion");
        assert_eq!(d.chosen[0].text["en"], "We miss you, Ben: 10% off");

        // A customer still within their rhythm is not in the audience.
        let fresh =
            Kpis::compute(&ledger).view(day("2026-05-20"), &KpiConfig::default(), None, None);
        let d = decide(
            &s,
            &p,
            Some(&fresh),
            &occasion(due, "2026-05-20T10:00:00Z"),
            &CapState::default(),
            &berlin(),
        );
        assert!(d.chosen.is_empty());
        assert!(
            d.explained
                .iter()
                .any(|e| e.outcome == Outcome::NotInAudience)
        );
    }

    #[test]
    fn no_consent_means_no_offer_and_no_evaluation() {
        let s = set(serde_json::json!({"version": 1, "campaigns": [games_campaign()]}));
        let mut p = ps_buyer();
        p.consents.personalised_offers = false;
        let d = entered(&s, &p, "2026-11-23T10:00:00Z", &CapState::default());
        assert!(d.chosen.is_empty() && d.controls.is_empty());
        assert_eq!(d.explained[0].outcome, Outcome::NoConsent);
    }

    #[test]
    fn a_capped_customer_gets_nothing_the_second_time_the_same_day() {
        let s = set(serde_json::json!({"version": 1, "campaigns": [games_campaign()]}));
        let first = "2026-11-23T09:00:00Z".parse().unwrap();
        let mut state = CapState::default();
        state
            .shown
            .insert("games-after-console".into(), vec![first]);
        let later = occasion(Trigger::StoreEntered, "2026-11-23T18:00:00Z");
        let d = decide(&s, &ps_buyer(), None, &later, &state, &berlin());
        assert!(d.chosen.is_empty());
        assert_eq!(
            d.explained[0].outcome,
            Outcome::Capped {
                cap: "1 per day".into()
            }
        );
        // The store's day: 23:30 UTC is already the 24th in Berlin.
        let next_day = occasion(Trigger::StoreEntered, "2026-11-23T23:30:00Z");
        let d = decide(&s, &ps_buyer(), None, &next_day, &state, &berlin());
        assert_eq!(d.chosen.len(), 2);
        // Three this week (Monday 23rd to Sunday 29th) is the weekly cap.
        state.shown.insert(
            "games-after-console".into(),
            [
                "2026-11-23T09:00:00Z",
                "2026-11-24T09:00:00Z",
                "2026-11-25T09:00:00Z",
            ]
            .iter()
            .map(|t| t.parse().unwrap())
            .collect(),
        );
        let d = entered(&s, &ps_buyer(), "2026-11-27T09:00:00Z", &state);
        assert_eq!(
            d.explained[0].outcome,
            Outcome::Capped {
                cap: "3 per week".into()
            }
        );
        let d = entered(&s, &ps_buyer(), "2026-11-30T09:00:00Z", &state);
        assert_eq!(d.chosen.len(), 2, "a new week");
    }

    #[test]
    fn the_holdout_share_is_ten_percent_and_assignment_is_stable() {
        let mut c = games_campaign();
        c["holdout_bp"] = 1000.into();
        c["audience"] = serde_json::Value::Null;
        c["offers"].as_array_mut().unwrap().push(
            serde_json::json!({"id": "games-10", "texts": {"push": {"en": "10% off games"}}}),
        );
        c["variants"] = serde_json::json!([{"id": "A", "weight": 50, "offer": "games-20"}, {"id": "B", "weight": 50, "offer": "games-10"}]);
        let s = set(serde_json::json!({"version": 1, "campaigns": [c]}));
        assert!(s.rejected.is_empty(), "{:?}", s.rejected);
        let mut control = 0;
        let mut b = 0;
        let n = 100_000;
        for i in 0..n {
            let id = format!("cust-{i}");
            if in_holdout(&id, "games-after-console", 1000) {
                control += 1;
            } else if variant(&id, "games-after-console", &s.live[0].campaign.variants)
                .unwrap()
                .id
                == "B"
            {
                b += 1;
            }
        }
        let share = control as f64 / n as f64;
        assert!((0.09..=0.11).contains(&share), "holdout share {share}");
        let b_share = b as f64 / (n - control) as f64;
        assert!(
            (0.49..=0.51).contains(&b_share),
            "variant B share {b_share}"
        );

        // A control decision names the offer it would have shown, and shows nothing.
        let in_control = (0..)
            .map(|i| format!("cust-{i}"))
            .find(|id| in_holdout(id, "games-after-console", 1000))
            .unwrap();
        let mut p = ps_buyer();
        p.customer_id = in_control.clone();
        let d = entered(&s, &p, "2026-11-23T10:00:00Z", &CapState::default());
        assert!(d.chosen.is_empty());
        assert_eq!(d.controls.len(), 1);
        // The same answer from a freshly compiled set (a restart), and the hash is pinned so a
        // change to it cannot slip through: central computes the same buckets.
        let mut restarted = games_campaign();
        restarted["holdout_bp"] = 1000.into();
        let again = set(serde_json::json!({"version": 1, "campaigns": [restarted]}));
        assert!(in_holdout(&in_control, &again.live[0].campaign.id, 1000));
        assert_eq!(
            bucket("c-ps5", "games-after-console", "holdout"),
            bucket("c-ps5", "games-after-console", "holdout")
        );
        assert_eq!(bucket("4711", "spring", "variant"), {
            use sha2::Digest;
            let d = sha2::Sha256::digest(b"4711\0spring\0variant\0");
            (u64::from_be_bytes(d[..8].try_into().unwrap()) % 10_000) as u32
        });
    }

    #[test]
    fn a_bad_campaign_is_rejected_alone_with_its_field_named() {
        let mut bad_expr = games_campaign();
        bad_expr["id"] = "bad-expr".into();
        bad_expr["audience"] = "profile.tier ==".into();
        let mut bad_weights = games_campaign();
        bad_weights["id"] = "bad-weights".into();
        bad_weights["variants"] =
            serde_json::json!([{"id": "A", "weight": 60, "offer": "games-20"}]);
        let mut bad_variant = games_campaign();
        bad_variant["id"] = "bad-variant".into();
        bad_variant["variants"] = serde_json::json!([{"id": "A", "weight": 100, "offer": "nope"}]);
        let s = set(
            serde_json::json!({"version": 7, "campaigns": [bad_expr, games_campaign(), bad_weights, bad_variant, games_campaign()]}),
        );
        assert_eq!(s.version, 7);
        assert_eq!(s.live.len(), 1);
        let fields: Vec<(&str, &str)> = s
            .rejected
            .iter()
            .map(|r| (r.campaign.as_str(), r.field.as_str()))
            .collect();
        assert_eq!(
            fields,
            [
                ("bad-expr", "audience"),
                ("bad-weights", "variants"),
                ("bad-variant", "variants[0].offer"),
                ("games-after-console", "id"),
            ]
        );
        assert!(
            s.rejected[0]
                .to_string()
                .starts_with("campaign \"bad-expr\": audience: not a CEL expression")
        );
    }

    #[test]
    fn the_higher_score_wins_each_channel_and_the_others_are_outranked() {
        let mut low = games_campaign();
        low["id"] = "a-low".into();
        low["value"] = 100.into();
        let mut segment = games_campaign();
        segment["id"] = "b-segment".into();
        segment["propensity"] = serde_json::json!({"default": 0.1, "by_segment": {"gamer": 0.9}});
        let s =
            set(serde_json::json!({"version": 1, "campaigns": [low, games_campaign(), segment]}));
        let mut p = ps_buyer();
        p.segments = vec!["gamer".into()];
        let d = entered(&s, &p, "2026-11-23T10:00:00Z", &CapState::default());
        assert!(
            d.chosen.iter().all(|c| c.campaign == "games-after-console"),
            "{:?}",
            d.chosen
        );
        let outranked = d
            .explained
            .iter()
            .filter(|e| matches!(&e.outcome, Outcome::Outranked { by, .. } if by == "games-after-console"))
            .count();
        assert_eq!(outranked, 4, "two campaigns on two channels each");
    }

    #[test]
    fn templates_render_slots_or_refuse() {
        let mut slots = std::collections::BTreeMap::new();
        slots.insert("first_name", "Ada".to_string());
        assert_eq!(
            render("Hallo {first_name}!", &slots).as_deref(),
            Some("Hallo Ada!")
        );
        assert_eq!(render("no slots", &slots).as_deref(), Some("no slots"));
        assert_eq!(render("{tier}", &slots), None);
        assert_eq!(render("broken {first_name", &slots), None);
    }

    proptest::proptest! {
        /// The decision is a pure function of (campaign set, profile, event, clock, cap state):
        /// the same inputs, even with the set compiled afresh (a restart), give the same
        /// decision.
        #[test]
        fn the_decision_is_a_pure_function_of_its_inputs(
            customer in "[a-z0-9]{1,12}",
            consent in proptest::bool::ANY,
            gamer in proptest::bool::ANY,
            minutes in 0i64..(60 * 24 * 400),
            shown_minutes in proptest::collection::vec(0i64..(60 * 24 * 400), 0..4),
            holdout in 0u32..=10_000,
        ) {
            let mut c = games_campaign();
            c["holdout_bp"] = holdout.into();
            c["audience"] = "'gamer' in segments".into();
            let json = serde_json::json!({"version": 3, "campaigns": [c, winback_campaign()]});
            let start: jiff::Timestamp = "2025-12-01T00:00:00Z".parse().unwrap();
            let at = start + jiff::Span::new().minutes(minutes);
            let mut p = ps_buyer();
            p.customer_id = customer;
            p.consents.personalised_offers = consent;
            if gamer {
                p.segments.push("gamer".into());
            }
            let mut state = CapState::default();
            state.shown.insert(
                "games-after-console".into(),
                shown_minutes.iter().map(|m| start + jiff::Span::new().minutes(*m)).collect(),
            );
            let o = occasion(Trigger::StoreEntered, &at.to_string());
            let first = decide(&set(json.clone()), &p, None, &o, &state, &berlin());
            let again = decide(&set(json), &p, None, &o, &state, &berlin());
            proptest::prop_assert_eq!(&first, &again);
            proptest::prop_assert!(first.chosen.len() <= 2, "one per channel at most");
            if !consent {
                proptest::prop_assert!(first.chosen.is_empty() && first.controls.is_empty());
            }
        }
    }
}
