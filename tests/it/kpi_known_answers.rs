//! Known answers from the `lifetimes` package on CDNOW customers:
//! - BG/NBD: P(alive) and conditional expected purchases (fixture written by
//!   `tests/bgnbd_cdnow.py`), with the published fit r = 0.24, α = 4.41, a = 0.79, b = 2.43;
//! - Gamma-Gamma and CLV (fixture written by `tests/gammagamma_cdnow.py`): the expected average
//!   profit and the undiscounted 12-month CLV, with the quickstart's fit at full precision
//!   (printed there as p = 6.25, q = 3.74, v = 15.45).

use storelink::profiles::kpi::{ModelParams, bgnbd_expected, bgnbd_p_alive, gamma_gamma_value};

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

fn fixture(name: &str) -> serde_json::Value {
    let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn gamma_gamma_and_clv_match_lifetimes_on_cdnow_to_1e_4() {
    let v = fixture("gammagamma_cdnow.json");
    let (gg, bg) = (&v["gamma_gamma"], &v["bgnbd"]);
    let f = |o: &serde_json::Value, k: &str| o[k].as_f64().unwrap();
    let m = ModelParams {
        r: f(bg, "r"),
        alpha: f(bg, "alpha"),
        a: f(bg, "a"),
        b: f(bg, "b"),
        p: Some(f(gg, "p")),
        q: Some(f(gg, "q")),
        gamma: Some(f(gg, "v")),
        unit_days: 7.0,
    };
    // The fit is the quickstart's: it prints these, rounded to two places.
    let round2 = |x: f64| (x * 100.0).round() / 100.0;
    assert_eq!(
        (
            round2(m.p.unwrap()),
            round2(m.q.unwrap()),
            round2(m.gamma.unwrap())
        ),
        (6.25, 3.74, 15.45)
    );
    let horizon = f(&v, "horizon_weeks");
    let customers = v["customers"].as_array().unwrap();
    assert!(customers.len() >= 30);
    let mut published = 0;
    for c in customers {
        let (x, t_x, big_t) = (f(c, "x"), f(c, "t_x"), f(c, "T"));
        let value = gamma_gamma_value(&m, x, f(c, "monetary_value")).unwrap();
        let want = f(c, "expected_average_profit");
        assert!(
            (value - want).abs() < 1e-4,
            "customer {}: E[M] {value} vs {want}",
            c["customer"]
        );
        // The quickstart's own printout, to its six places.
        let printed = match c["customer"].as_u64().unwrap() {
            1 => Some(24.658619),
            6 => Some(71.462843),
            _ => None,
        };
        if let Some(p) = printed {
            assert!(
                (value - p).abs() < 1e-4,
                "customer {}: {value} vs {p}",
                c["customer"]
            );
            published += 1;
        }
        // lifetimes' CLV with discount_rate = 0 is E[Y(H)] · E[M], the agent's CLV.
        let clv = bgnbd_expected(&m, horizon, x, t_x, big_t) * value;
        let want = f(c, "clv_12_months");
        assert!(
            (clv - want).abs() < 1e-4,
            "customer {}: CLV {clv} vs {want}",
            c["customer"]
        );
    }
    assert_eq!(published, 2);
    // With no repeat purchase the value is the population mean p·v / (q − 1).
    let mean = gamma_gamma_value(&m, 0.0, 0.0).unwrap();
    assert!((mean - m.p.unwrap() * m.gamma.unwrap() / (m.q.unwrap() - 1.0)).abs() < 1e-12);
}
