//! BG/NBD known answers: the agent's P(alive) and conditional expected purchases against the
//! `lifetimes` package on CDNOW customers (fixture written by `tests/bgnbd_cdnow.py`), with the
//! published CDNOW fit r = 0.24, α = 4.41, a = 0.79, b = 2.43.

use storelink::profiles::kpi::{ModelParams, bgnbd_expected, bgnbd_p_alive};

#[test]
fn bgnbd_matches_lifetimes_on_cdnow_to_1e_6() {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/bgnbd_cdnow.json"
    ))
    .unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let p = &v["params"];
    let m = ModelParams {
        r: p["r"].as_f64().unwrap(),
        alpha: p["alpha"].as_f64().unwrap(),
        a: p["a"].as_f64().unwrap(),
        b: p["b"].as_f64().unwrap(),
        p: None,
        q: None,
        gamma: None,
        unit_days: 7.0,
    };
    let customers = v["customers"].as_array().unwrap();
    assert!(customers.len() >= 40);
    let mut one_timers = 0;
    for c in customers {
        let f = |k: &str| c[k].as_f64().unwrap();
        let (x, t_x, big_t) = (f("x"), f("t_x"), f("T"));
        if x == 0.0 {
            one_timers += 1;
        }
        let alive = bgnbd_p_alive(&m, x, t_x, big_t);
        assert!(
            (alive - f("p_alive")).abs() < 1e-6,
            "customer {}: P(alive) {alive} vs {}",
            c["customer"],
            f("p_alive")
        );
        let expected = bgnbd_expected(&m, f("t"), x, t_x, big_t);
        assert!(
            (expected - f("expected")).abs() < 1e-6,
            "customer {}: E[Y(39)] {expected} vs {}",
            c["customer"],
            f("expected")
        );
    }
    // The sample spans both branches of the formulas.
    assert!(one_timers > 0 && one_timers < customers.len());
}
