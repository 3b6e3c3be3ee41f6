//! `storelink status`: the agent's `/api/v1/status` answer as a few readable lines, and the
//! exit code monitoring keys on (0 healthy, 1 degraded, 2 unreachable).
//!
//! Works on the JSON rather than the Rust types, so a newer or older agent's answer still
//! prints what it has.

use jiff::Timestamp;
use serde_json::Value;

pub const EXIT_HEALTHY: u8 = 0;
pub const EXIT_DEGRADED: u8 = 1;
pub const EXIT_UNREACHABLE: u8 = 2;

/// The summary and the exit code for one status answer.
pub fn summarize(report: &Value, now: Timestamp) -> (String, u8) {
    let healthy = report["health"] == "healthy" && report["ready"] == true;
    let mut out = String::new();
    let agent = &report["agent"];
    out.push_str(&format!(
        "storelink {} · store {} ({}) · up {} · {}\n",
        agent["version"].as_str().unwrap_or("?"),
        agent["store"].as_str().unwrap_or("?"),
        agent["tenant"].as_str().unwrap_or("?"),
        duration(report["uptime_s"].as_f64().unwrap_or(0.0)),
        if healthy {
            "HEALTHY"
        } else if report["ready"] != true {
            "STARTING"
        } else {
            "DEGRADED"
        }
    ));
    out.push_str(&format!(
        "central: {}\n",
        match report["central_last_contact"]
            .as_str()
            .and_then(|s| s.parse::<Timestamp>().ok())
        {
            Some(at) => format!("last reached {at} ({} ago)", ago(now, at)),
            None => "not reached since the agent started".into(),
        }
    ));
    let outbox = &report["outbox"];
    if outbox.is_null() {
        out.push_str("outbox: unreadable (see the store's component)\n");
    } else {
        let mut line = format!(
            "outbox: {} events held, {} of {}",
            outbox["depth"].as_u64().unwrap_or(0),
            bytes(outbox["total_bytes"].as_u64().unwrap_or(0)),
            bytes(outbox["max_bytes"].as_u64().unwrap_or(0)),
        );
        let oldest = outbox["streams"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| Some((s["stream"].as_str()?, s["oldest_age_s"].as_f64()?)))
            .max_by(|a, b| a.1.total_cmp(&b.1));
        if let Some((stream, age)) = oldest {
            line.push_str(&format!("; oldest {} ({stream})", duration(age)));
        }
        out.push_str(&line);
        out.push('\n');
    }
    out.push_str(&format!(
        "dead letters stored: {}\n",
        report["deadletters_stored"].as_u64().unwrap_or(0)
    ));
    out.push_str("components:\n");
    if let Some(components) = report["components"].as_object() {
        let width = components.keys().map(String::len).max().unwrap_or(0);
        for (name, c) in components {
            let state = c["state"].as_str().unwrap_or("?");
            let mut line = format!("  {name:width$}  {state:9}");
            if let Some(detail) = c["detail"].as_str() {
                line.push_str(&format!("  {detail}"));
            }
            if state != "running"
                && state != "stopped"
                && let Some(error) = c["last_error"].as_str()
                && Some(error) != c["detail"].as_str()
            {
                line.push_str(&format!("  (last error: {error})"));
            }
            if let Some(restarts) = c["restarts"].as_u64().filter(|r| *r > 0) {
                line.push_str(&format!("  [{restarts} restarts]"));
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
    }
    (out, if healthy { EXIT_HEALTHY } else { EXIT_DEGRADED })
}

fn ago(now: Timestamp, then: Timestamp) -> String {
    duration(now.duration_since(then).as_secs_f64().max(0.0))
}

fn duration(secs: f64) -> String {
    let s = secs as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m {}s", s / 60, s % 60),
        3600..86_400 => format!("{}h {}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d {}h", s / 86_400, (s % 86_400) / 3600),
    }
}

fn bytes(n: u64) -> String {
    const MIB: f64 = 1024.0 * 1024.0;
    if n < 1024 * 1024 {
        format!("{:.1} KiB", n as f64 / 1024.0)
    } else {
        format!("{:.1} MiB", n as f64 / MIB)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(health: &str, ready: bool) -> Value {
        serde_json::json!({
            "agent": {"version": "0.1.0", "store": "s042", "tenant": "acme", "started_at": "2026-11-23T08:00:00Z"},
            "uptime_s": 7322.0,
            "ready": ready,
            "health": health,
            "components": {
                "api": {"state": "running", "detail": "listening on 127.0.0.1:8080", "restarts": 0},
                "uplink.mqtt": {"state": "degraded", "detail": "connecting to mqtt://central:8883", "last_error": "connection refused", "restarts": 2}
            },
            "outbox": {"depth": 12, "total_bytes": 20480, "max_bytes": 2147483648u64,
                       "streams": [{"stream": "transaction", "oldest_age_s": 95.0}, {"stream": "presence", "oldest_age_s": null}]},
            "deadletters_stored": 3,
            "central_last_contact": "2026-11-23T10:00:00Z"
        })
    }

    #[test]
    fn degraded_reads_well_and_exits_1() {
        let now: Timestamp = "2026-11-23T10:01:30Z".parse().unwrap();
        let (text, code) = summarize(&report("degraded", true), now);
        assert_eq!(code, EXIT_DEGRADED);
        assert!(
            text.contains("store s042 (acme) · up 2h 2m · DEGRADED"),
            "{text}"
        );
        assert!(
            text.contains("last reached 2026-11-23T10:00:00Z (1m 30s ago)"),
            "{text}"
        );
        assert!(
            text.contains("12 events held, 20.0 KiB of 2048.0 MiB; oldest 1m 35s (transaction)"),
            "{text}"
        );
        assert!(text.contains("uplink.mqtt  degraded   connecting to mqtt://central:8883  (last error: connection refused)  [2 restarts]"), "{text}");
        assert!(text.contains("dead letters stored: 3"), "{text}");
    }

    #[test]
    fn healthy_and_ready_exits_0_and_starting_exits_1() {
        let now: Timestamp = "2026-11-23T10:01:30Z".parse().unwrap();
        assert_eq!(summarize(&report("healthy", true), now).1, EXIT_HEALTHY);
        let (text, code) = summarize(&report("healthy", false), now);
        assert_eq!(code, EXIT_DEGRADED);
        assert!(text.contains("STARTING"));
    }
}
