//! Human-readable renderings of what the local API answers for `storelink offers explain` and
//! `storelink offers stats`. They read the API's JSON, so the command works against an agent
//! of another version as long as the fields are there.

use std::fmt::Write as _;

use serde_json::Value;

fn s(v: &Value) -> &str {
    v.as_str().unwrap_or("")
}

/// Why one campaign was or was not chosen, in words.
fn outcome(line: &Value) -> String {
    match s(&line["outcome"]) {
        "not_live" => "not live at this time (outside its validity window)".into(),
        "out_of_scope" => "not for this store, zone or lane".into(),
        "other_trigger" => "waits for another trigger".into(),
        "no_consent" => "customer has not consented to personalised offers".into(),
        "not_in_audience" => "customer is not in the audience".into(),
        "audience_error" => format!("audience expression failed: {}", s(&line["error"])),
        "capped" => format!("frequency cap reached ({})", s(&line["cap"])),
        "budget_spent" => format!("budget of {} spent", line["budget"]),
        "control" => format!(
            "control group: would have shown {}{}",
            s(&line["offer"]),
            line["variant"]
                .as_str()
                .map(|v| format!(" (variant {v})"))
                .unwrap_or_default()
        ),
        "no_text" => "the offer has no text that renders for this customer".into(),
        "outranked" => format!("outranked on {} by {}", s(&line["channel"]), s(&line["by"])),
        "chosen" => format!(
            "CHOSEN for {} (score {})",
            s(&line["channel"]),
            line["score"]
        ),
        other => other.to_string(),
    }
}

/// The explanation of one decision.
pub fn explanation(v: &Value) -> String {
    let mut out = String::new();
    let o = &v["occasion"];
    let triggers: Vec<&str> = o["triggers"]
        .as_array()
        .map(|a| a.iter().map(s).collect())
        .unwrap_or_default();
    let _ = writeln!(
        out,
        "campaign set {}; {} at {}{}{}",
        v["campaign_version"],
        triggers.join(" + "),
        s(&o["at"]),
        o["zone"]
            .as_str()
            .map(|z| format!(", zone {z}"))
            .unwrap_or_default(),
        o["lane"]
            .as_str()
            .map(|l| format!(", lane {l}"))
            .unwrap_or_default(),
    );
    let chosen = v["chosen"].as_array().cloned().unwrap_or_default();
    if chosen.is_empty() {
        let _ = writeln!(out, "no offer");
    }
    for c in &chosen {
        let text = c["text"]
            .as_object()
            .and_then(|t| t.values().next())
            .and_then(Value::as_str)
            .unwrap_or("");
        let _ = writeln!(
            out,
            "offer on {}: {} / {}{}: {:?}",
            s(&c["channel"]),
            s(&c["campaign"]),
            s(&c["offer"]),
            c["variant"]
                .as_str()
                .map(|v| format!(" (variant {v})"))
                .unwrap_or_default(),
            text
        );
    }
    let lines = v["explained"].as_array().cloned().unwrap_or_default();
    let width = lines
        .iter()
        .map(|l| s(&l["campaign"]).len())
        .max()
        .unwrap_or(0);
    if !lines.is_empty() {
        let _ = writeln!(out, "campaigns:");
    }
    for l in &lines {
        let _ = writeln!(
            out,
            "  {:width$}  {}",
            s(&l["campaign"]),
            outcome(l),
            width = width
        );
    }
    out.trim_end().to_string()
}

fn money(minor: &Value) -> String {
    let m = minor.as_i64().unwrap_or(0);
    format!("{}.{:02}", m / 100, (m % 100).abs())
}

/// The campaign statistics table.
pub fn stats(v: &Value) -> String {
    let rows = v.as_array().cloned().unwrap_or_default();
    if rows.is_empty() {
        return "no offer decided yet".into();
    }
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:24} {:8} {:>7} {:>8} {:>7} {:>7} {:>7} {:>8} {:>7} {:>8} {:>12}",
        "campaign",
        "variant",
        "shown",
        "redeemed",
        "rate",
        "control",
        "bought",
        "ctl rate",
        "uplift",
        "p",
        "revenue"
    );
    for r in &rows {
        let u = &r["uplift"];
        let pct = |x: &Value| {
            x.as_f64()
                .map(|x| format!("{:.1}%", x * 100.0))
                .unwrap_or_else(|| "-".into())
        };
        let rate = if r["shown"].as_i64().unwrap_or(0) > 0 {
            format!(
                "{:.1}%",
                r["redeemed"].as_f64().unwrap_or(0.0) / r["shown"].as_f64().unwrap_or(1.0) * 100.0
            )
        } else {
            "-".into()
        };
        let _ = writeln!(
            out,
            "{:24} {:8} {:>7} {:>8} {:>7} {:>7} {:>7} {:>8} {:>7} {:>8} {:>12}",
            s(&r["campaign"]),
            r["variant"].as_str().unwrap_or("-"),
            r["shown"],
            r["redeemed"],
            rate,
            r["controls"],
            r["control_purchases"],
            pct(&u["control_rate"]),
            pct(&u["difference"]),
            u["p_value"]
                .as_f64()
                .map(|p| format!("{p:.4}"))
                .unwrap_or_else(|| "-".into()),
            money(&r["revenue"]),
        );
    }
    let _ = write!(
        out,
        "uplift = redemption rate of the shown minus that of the control group; p from a two-sided two-proportion z-test"
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn explanation_names_every_campaign_and_why() {
        let v = serde_json::json!({
            "customer_found": true,
            "campaign_version": 7,
            "occasion": {"triggers": ["store_entered"], "store": "s1", "zone": null, "lane": "3", "at": "2026-11-23T10:00:00Z"},
            "chosen": [{"channel": "push", "campaign": "games", "offer": "g20", "variant": "B", "text": {"en": "20% off"}, "score": 3000.0}],
            "controls": [],
            "explained": [
                {"campaign": "games", "outcome": "chosen", "channel": "push", "score": 3000.0},
                {"campaign": "winback", "outcome": "capped", "cap": "1 per day"},
                {"campaign": "xmas", "outcome": "not_live"}
            ]
        });
        let text = explanation(&v);
        assert!(
            text.contains("store_entered at 2026-11-23T10:00:00Z, lane 3"),
            "{text}"
        );
        assert!(
            text.contains("offer on push: games / g20 (variant B): \"20% off\""),
            "{text}"
        );
        assert!(
            text.contains("winback  frequency cap reached (1 per day)"),
            "{text}"
        );
        assert!(text.contains("xmas     not live"), "{text}");
    }

    #[test]
    fn stats_show_rates_uplift_and_money() {
        let v = serde_json::json!([{
            "campaign": "games", "shown": 1000, "controls": 1000, "redeemed": 120,
            "control_purchases": 80, "revenue": 123456, "margin": 0, "control_revenue": 0,
            "with_margin": 0,
            "uplift": {"exposed_rate": 0.12, "control_rate": 0.08, "difference": 0.04, "z": 2.98, "p_value": 0.00287}
        }]);
        let text = stats(&v);
        let row = text.lines().nth(1).unwrap();
        for want in ["games", "12.0%", "8.0%", "4.0%", "0.0029", "1234.56"] {
            assert!(row.contains(want), "{want} in {row}");
        }
    }
}
