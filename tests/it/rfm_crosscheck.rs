//! RFM scores and BG/NBD's frequency, recency and T against an independent computation
//! (pandas, numpy and `lifetimes`; fixture written by `tests/rfm_crosscheck.py`). The same
//! transactions go through the agent's profile store as the engine would record them.

use storelink::model::transaction::TransactionKind;
use storelink::profiles::ProfileStore;
use storelink::profiles::kpi::KpiConfig;
use storelink::store::{Store, StoreOptions};

#[test]
fn rfm_and_frequency_recency_t_match_pandas_and_lifetimes() {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/rfm_crosscheck.json"
    ))
    .unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), &StoreOptions::default()).unwrap();
    let profiles = ProfileStore::open(&store).unwrap();
    let mut register = storelink::sim::SimRegister::new("s1", "r1", None, 1);
    for (i, t) in v["transactions"].as_array().unwrap().iter().enumerate() {
        let mut tx = register.next("2026-01-01T10:00:00Z".parse().unwrap());
        tx.id = format!("s1:r1:{i}");
        tx.loyalty_id = Some(t["customer"].as_str().unwrap().to_string());
        tx.business_day = t["day"].as_str().unwrap().parse().unwrap();
        let amount = t["amount"].as_i64().unwrap();
        (tx.kind, tx.total) = if amount < 0 {
            (TransactionKind::Return, -amount)
        } else {
            (TransactionKind::Sale, amount)
        };
        assert!(profiles.record_transaction(&tx).unwrap());
    }

    let as_of: jiff::civil::Date = v["as_of"].as_str().unwrap().parse().unwrap();
    let bp = profiles.recompute_rfm(as_of).unwrap().unwrap();
    assert_eq!(profiles.rfm_breakpoints().unwrap().as_ref(), Some(&bp));
    let expected = &v["breakpoints"];
    for (name, ours) in [
        ("recency_days", bp.recency_days),
        ("frequency", bp.frequency),
        ("monetary", bp.monetary),
    ] {
        for (i, q) in ours.iter().enumerate() {
            let theirs = expected[name][i].as_f64().unwrap();
            assert!((q - theirs).abs() < 1e-9, "{name}[{i}]: {q} vs {theirs}");
        }
    }

    let customers = v["customers"].as_object().unwrap();
    assert_eq!(bp.customers as usize, customers.len());
    let mut scores_seen = std::collections::BTreeSet::new();
    for (id, c) in customers {
        let kpis = profiles.kpis(id).unwrap().unwrap();
        let view = kpis.view(as_of, &KpiConfig::default(), None, Some(&bp));
        let n = |k: &str| c[k].as_i64().unwrap();
        assert_eq!(i64::from(view.frequency), n("frequency"), "{id} frequency");
        assert_eq!(
            view.recency_days.map(i64::from),
            Some(n("recency")),
            "{id} recency"
        );
        assert_eq!(view.age_days.map(i64::from), Some(n("T")), "{id} T");
        let rfm = view.rfm.unwrap();
        let theirs: Vec<u8> = c["rfm"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_u64().unwrap() as u8)
            .collect();
        assert_eq!(vec![rfm.r, rfm.f, rfm.m], theirs, "{id} RFM");
        scores_seen.insert(rfm.r);
        scores_seen.insert(rfm.f);
        scores_seen.insert(rfm.m);
    }
    assert_eq!(scores_seen.len(), 5, "the fixture spans every score");
}
