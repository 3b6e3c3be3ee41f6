//! Any bytes as a campaign set from central, and as one campaign's audience expression. The
//! set parses or is refused; compiling never panics and rejects only the campaigns at fault;
//! a decision over whatever went live never panics and shows at most one offer per channel.
#![no_main]
use libfuzzer_sys::fuzz_target;
use storelink::offers::campaign::{CampaignSet, CompiledSet, Trigger};
use storelink::offers::decide::{CapState, Occasion, decide};
use storelink::profiles::Profile;

fn template(audience: &str) -> serde_json::Value {
    serde_json::json!({
        "version": 1,
        "campaigns": [{
            "id": "fuzz",
            "name": "fuzz",
            "valid_from": "2026-01-01T00:00:00Z",
            "valid_until": "2027-01-01T00:00:00Z",
            "trigger": {"kind": "store_entered"},
            "audience": audience,
            "offers": [{"id": "o", "texts": {"push": {"en": "Hi {first_name}"}, "cashier": {"en": "{tier}"}}}]
        }]
    })
}

fn check(set: CampaignSet) {
    let n = set.campaigns.len();
    let compiled = CompiledSet::compile(set);
    assert_eq!(compiled.live.len() + compiled.rejected.len(), n);
    let mut p = Profile::new("c1");
    p.first_name = Some("Ada".into());
    p.consents.personalised_offers = true;
    p.segments = vec!["gamer".into()];
    let occasion = Occasion {
        triggers: vec![Trigger::StoreEntered],
        store: "s1".into(),
        zone: Some("games".into()),
        lane: None,
        at: "2026-06-01T10:00:00Z".parse().unwrap(),
        basket: None,
    };
    let d = decide(&compiled, &p, None, &occasion, &CapState::default(), &jiff::tz::TimeZone::UTC);
    assert!(d.chosen.len() <= 2);
    assert!(d.explained.len() >= compiled.live.len());
}

fuzz_target!(|data: &[u8]| {
    if let Ok(set) = serde_json::from_slice::<CampaignSet>(data) {
        check(set);
    }
    if let Ok(expr) = std::str::from_utf8(data)
        && let Ok(set) = serde_json::from_value::<CampaignSet>(template(expr))
    {
        check(set);
    }
});
