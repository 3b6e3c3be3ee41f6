//! The rotating presence identifier against an independent implementation: vectors written by
//! `tests/eid_vectors.py` (Python's hmac and hashlib, no shared code), window edges included.

use crate::common;

use std::process::Command;

use storelink::presence::identity::{self, eid, parse_key, window_of};

#[derive(serde::Deserialize)]
struct Vector {
    key: String,
    at: jiff::Timestamp,
    rotation_s: u32,
    window: u32,
    eid: String,
}

const VECTORS: &str = include_str!("../fixtures/eid_vectors.json");

#[test]
fn agent_eids_match_the_independent_vectors() {
    let vectors: Vec<Vector> = serde_json::from_str(VECTORS).unwrap();
    assert!(vectors.len() >= 40);
    for v in &vectors {
        let key = parse_key(&v.key).unwrap();
        assert_eq!(
            window_of(v.at, v.rotation_s),
            v.window,
            "window at {}",
            v.at
        );
        assert_eq!(
            identity::hex(&eid(&key, v.window)),
            v.eid,
            "EID at {}",
            v.at
        );
    }
}

#[test]
fn the_vectors_are_what_the_python_script_prints() {
    if !common::require_external("python3", "the_vectors_are_what_the_python_script_prints") {
        return;
    }
    let out = Command::new(common::find_program("python3").unwrap())
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/eid_vectors.py"))
        .output()
        .unwrap();
    assert!(out.status.success());
    let printed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let committed: serde_json::Value = serde_json::from_str(VECTORS).unwrap();
    assert_eq!(printed, committed);
}

#[test]
fn ble_eid_prints_what_an_app_must_advertise() {
    let v: Vec<Vector> = serde_json::from_str(VECTORS).unwrap();
    let v = &v[2];
    let out = Command::new(common::binary())
        .args(["ble", "eid", "--key", &v.key, "--at", &v.at.to_string()])
        .args(["--rotation-s", &v.rotation_s.to_string()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains(&format!("eid {}", v.eid)), "{text}");
    assert!(text.contains(&format!("window {}", v.window)), "{text}");
    assert!(
        text.contains(&format!("service data 01{}", v.eid)),
        "{text}"
    );
    let major = u16::from_str_radix(&v.eid[0..4], 16).unwrap();
    let minor = u16::from_str_radix(&v.eid[4..8], 16).unwrap();
    assert!(
        text.contains(&format!("ibeacon major {major} minor {minor}")),
        "{text}"
    );

    let bad = Command::new(common::binary())
        .args(["ble", "eid", "--key", "abc", "--at", "2026-11-22T10:00:00Z"])
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2));
}
