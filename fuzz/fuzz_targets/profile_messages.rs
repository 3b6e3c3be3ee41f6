//! Any bytes as what central sends about profiles: a sync page, and the same page's profiles
//! and erasures applied to a real profile store. Nothing panics; an accepted page survives
//! being written back out; whatever central sends, the store keeps its invariants (no
//! presence key without consent, versions never go back, erased customers stay erased).
#![no_main]
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use storelink::profiles::sync::Page;
use storelink::profiles::{MonthDay, Profile, ProfileStore, Upserted};
use storelink::store::{Store, StoreOptions};

fn profiles() -> &'static ProfileStore {
    // Held in the static with the store, so the sanitizer sees it as reachable, not leaked.
    static STORE: OnceLock<(tempfile::TempDir, ProfileStore)> = OnceLock::new();
    &STORE
        .get_or_init(|| {
            let dir = tempfile::tempdir().unwrap();
            let store = Store::open(dir.path(), &StoreOptions::default()).unwrap();
            let profiles = ProfileStore::open_with(&store, 64).unwrap();
            (dir, profiles)
        })
        .1
}

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data)
        && let Ok(md) = text.parse::<MonthDay>()
    {
        assert_eq!(serde_json::to_string(&md).unwrap(), format!("\"{text}\""));
    }
    let Ok(page) = serde_json::from_slice::<Page>(data) else {
        return;
    };
    let bytes = serde_json::to_vec(&page).unwrap();
    let again: Page = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(serde_json::to_vec(&again).unwrap(), bytes);

    let store = profiles();
    for e in &page.erased {
        if Profile::valid_id(&e.customer_id) {
            let erased = store.erase(&e.customer_id, e.version).unwrap();
            assert!(erased.version >= e.version);
            assert!(store.get(&e.customer_id).unwrap().is_none());
        }
    }
    let sent = page.profiles.clone();
    let before: Vec<Option<u64>> = sent
        .iter()
        .map(|p| store.get(&p.customer_id).ok().flatten().map(|h| h.version))
        .collect();
    let outcomes = store.upsert_many(page.profiles, &[]).unwrap();
    for ((p, outcome), held_before) in sent.iter().zip(&outcomes).zip(before) {
        match outcome {
            Upserted::Invalid => assert!(!Profile::valid_id(&p.customer_id)),
            Upserted::Erased => {
                assert!(store.tombstone(&p.customer_id).unwrap() >= Some(p.version))
            }
            Upserted::Stale | Upserted::Applied => {
                let held = store.get(&p.customer_id).unwrap().unwrap();
                assert!(held.version >= p.version.max(held_before.unwrap_or(0)));
                assert!(held.consents.presence || held.presence_key.is_none());
            }
        }
    }
});
