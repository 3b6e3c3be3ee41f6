use super::*;

const MINIMAL: &str = r#"
[store]
id = "s042"
tenant = "acme"

[central.mqtt]
url = "mqtt://127.0.0.1:1883"
"#;

fn env() -> HashMap<String, String> {
    HashMap::new()
}

fn problems(text: &str) -> Vec<Problem> {
    match Config::parse(text, "t.toml", &env()) {
        Ok(_) => panic!("expected an error for:\n{text}"),
        Err(e) => e.problems().to_vec(),
    }
}

fn keys(problems: &[Problem]) -> Vec<&str> {
    problems.iter().map(|p| p.key.as_str()).collect()
}

#[test]
fn the_storage_memory_budget_is_split_between_the_engines() {
    let options = |extra: &str| {
        let text = format!("{MINIMAL}\n[storage]\n{extra}");
        Config::parse(&text, "t.toml", &env())
            .unwrap()
            .storage
            .store_options()
    };
    let o = options("");
    assert_eq!((o.cache_bytes, o.log_cache_bytes), (4 << 20, 4 << 20));
    let o = options("memory_budget_bytes = 33554432\n");
    assert_eq!((o.cache_bytes, o.log_cache_bytes), (16 << 20, 16 << 20));
    // A config from before the budget keeps its cache and gets the log's default on top.
    let o = options("cache_bytes = 16777216\n");
    assert_eq!((o.cache_bytes, o.log_cache_bytes), (16 << 20, 4 << 20));
    let o = options("memory_budget_bytes = 8388608\ncache_bytes = 6291456\n");
    assert_eq!((o.cache_bytes, o.log_cache_bytes), (6 << 20, 2 << 20));
    let p = problems(&format!(
        "{MINIMAL}\n[storage]\nmemory_budget_bytes = 4194304\ncache_bytes = 4194304\n"
    ));
    assert_eq!(keys(&p), ["storage.cache_bytes"]);
    assert!(p[0].message.contains("less than 1 MiB"), "{:?}", p[0]);
    let p = problems(&format!(
        "{MINIMAL}\n[storage]\nmemory_budget_bytes = 1000\n"
    ));
    assert_eq!(keys(&p), ["storage.memory_budget_bytes"]);
}

#[test]
fn presence_defaults_and_a_valid_zone() {
    let text = format!(
        "{MINIMAL}\n[presence]\nsource = \"btleplug\"\nservice_uuid = \"FEAA\"\n\
         [[presence.zones]]\nname = \"lane-3\"\nlane = \"3\"\nscanners = [\"local\"]\nenter_m = 1.5\nexit_m = 2.5\n"
    );
    let c = Config::parse(&text, "t.toml", &env()).unwrap();
    assert_eq!(c.presence.rotation_s, 900);
    assert_eq!(c.presence.retention_days, 30);
    assert_eq!(
        c.presence.service.unwrap().to_string(),
        "0000feaa-0000-1000-8000-00805f9b34fb"
    );
    assert_eq!(c.presence.zones[0].lane.as_deref(), Some("3"));
}

#[test]
fn profiles_settings_have_defaults_and_named_problems() {
    let c = Config::parse(MINIMAL, "t.toml", &env()).unwrap();
    assert_eq!(c.profiles.kpi.new_days, 90);
    assert_eq!(c.profiles.kpi.passive_after_days, 180);
    assert_eq!(c.profiles.sync_page_size, 1000);
    let c = Config::parse(
        &format!("{MINIMAL}\n[profiles.kpi]\nnew_days = 60\n"),
        "t.toml",
        &env(),
    )
    .unwrap();
    assert_eq!(c.profiles.kpi.new_days, 60);

    let p = problems(&format!(
        "{MINIMAL}\n[profiles]\nsync_interval_s = 1\n[profiles.kpi]\noverdue_factor = 0.5\n"
    ));
    assert_eq!(
        keys(&p),
        ["profiles.sync_interval_s", "profiles.kpi.overdue_factor"]
    );
    let p = problems(&format!("{MINIMAL}\n[profiles.kpi]\nnew_dayz = 3\n"));
    assert_eq!(keys(&p), ["profiles.kpi.new_dayz"]);
    assert!(p[0].message.contains("expected one of new_days"), "{p:?}");

    let p = problems(&format!(
        "{MINIMAL}\n[central.https]\nbase_url = \"https://c.example\"\nca_file = \"/nonexistent/ca.pem\"\n"
    ));
    assert_eq!(keys(&p), ["central.https.ca_file"]);
}

#[test]
fn presence_problems_name_their_keys() {
    let p = problems(&format!("{MINIMAL}\n[presence]\nsource = \"btleplug\"\n"));
    assert_eq!(keys(&p), ["presence.service_uuid"]);

    let p = problems(&format!(
        "{MINIMAL}\n[presence]\nsource = \"replay\"\nservice_uuid = \"nope\"\nrotation_s = 5\n"
    ));
    assert_eq!(
        keys(&p),
        [
            "presence.service_uuid",
            "presence.rotation_s",
            "presence.replay"
        ]
    );

    let p = problems(&format!(
        "{MINIMAL}\n[presence]\nsource = \"none\"\n[presence.replay]\nfile = \"x.jsonl\"\n"
    ));
    assert_eq!(keys(&p), ["presence.replay"]);

    let p = problems(&format!(
        "{MINIMAL}\n[presence]\nsource = \"replay\"\nservice_uuid = \"FEAA\"\n\
         [presence.replay]\nfile = \"/nonexistent/walk.jsonl\"\nspeed = -1.0\n"
    ));
    assert_eq!(keys(&p), ["presence.replay.file", "presence.replay.speed"]);

    let zone = "[[presence.zones]]\nname = \"a\"\nscanners = [\"s\"]\nenter_m = 2.0\nexit_m = 1.0\n\
                [[presence.zones]]\nname = \"a\"\nscanners = []\nenter_m = 1.0\nexit_m = 2.0\n\
                [[presence.calibration]]\nscanner = \"s\"\nref_rssi_1m = 10\npath_loss_exponent = 9\n";
    let p = problems(&format!("{MINIMAL}\n{zone}"));
    assert_eq!(
        keys(&p),
        [
            "presence.calibration[0].ref_rssi_1m",
            "presence.calibration[0].path_loss_exponent",
            "presence.zones[0].exit_m",
            "presence.zones[1].name",
            "presence.zones[1].scanners",
        ]
    );

    let p = problems(&format!(
        "{MINIMAL}\n[[presence.zones]]\nname = \"a\"\nscanners = [\"s\"]\nenter_m = 1.0\nexit_m = 2.0\nradius = 3\n"
    ));
    assert_eq!(keys(&p), ["presence.zones[0].radius"]);
    assert!(p[0].message.starts_with("unknown key"), "{p:?}");
}

#[test]
fn minimal_config_gets_documented_defaults() {
    let c = Config::parse(MINIMAL, "t.toml", &env()).unwrap();
    assert_eq!(c.store.timezone, "UTC");
    assert_eq!(c.store.currency, "EUR");
    assert_eq!(c.storage.path, PathBuf::from("/var/lib/storelink"));
    assert_eq!(c.storage.max_outbox_bytes, 2_147_483_648);
    assert_eq!(c.cashier.bind, "127.0.0.1:8080");
    assert_eq!(c.topic_prefix(), "storelink/v1/acme");
    assert_eq!(c.mqtt_client_id(), "storelink-acme-s042");
}

#[test]
fn unknown_key_is_named_with_its_table() {
    let p = problems(&MINIMAL.replace("tenant = \"acme\"", "tenant = \"acme\"\ncolour = 3"));
    assert_eq!(p.len(), 1);
    assert_eq!(p[0].key, "store.colour");
    assert!(p[0].message.starts_with("unknown key"), "{p:?}");
}

#[test]
fn unknown_key_inside_transport_is_named() {
    let text = format!(
        "{MINIMAL}\n[[registers]]\nname = \"lane-3\"\nformat = \"jsonl\"\ntransport = {{ kind = \"tcp-listen\", bnd = \"0.0.0.0:5020\" }}\n"
    );
    let p = problems(&text);
    assert_eq!(p[0].key, "registers[0].transport.bnd", "{p:?}");
}

#[test]
fn missing_key_and_wrong_type_are_named() {
    let p = problems(&MINIMAL.replace("id = \"s042\"\n", ""));
    assert_eq!(p[0].key, "store.id");
    assert_eq!(p[0].message, "missing required key");

    let p = problems(&MINIMAL.replace("id = \"s042\"", "id = 42"));
    assert_eq!(p[0].key, "store.id");
    assert!(p[0].message.contains("invalid type"), "{p:?}");
}

#[test]
fn port_out_of_range_is_an_invalid_value() {
    let p = problems(&format!("{MINIMAL}\n[cashier]\nbind = \"0.0.0.0:70000\"\n"));
    assert_eq!(p[0].key, "cashier.bind");
    assert!(p[0].message.contains("70000 is out of range"), "{p:?}");
    let p = problems(&MINIMAL.replace("1883", "70000"));
    assert_eq!(p[0].key, "central.mqtt.url");
}

#[test]
fn every_validation_problem_is_reported_at_once() {
    let text = MINIMAL.replace(
        "tenant = \"acme\"",
        "tenant = \"a/b\"\ntimezone = \"Mars/Olympus\"\ncurrency = \"euro\"",
    );
    let keys: Vec<_> = problems(&text).into_iter().map(|p| p.key).collect();
    assert_eq!(keys, ["store.tenant", "store.timezone", "store.currency"]);
}

#[test]
fn duplicate_registers_and_overlapping_binds_are_refused() {
    let reg = |bind: &str| {
        format!(
            "[[registers]]\nname = \"lane-1\"\nformat = \"jsonl\"\ntransport = {{ kind = \"tcp-listen\", bind = \"{bind}\" }}\n"
        )
    };
    let text = format!("{MINIMAL}{}{}", reg("0.0.0.0:5020"), reg("127.0.0.1:5020"));
    let p = problems(&text);
    assert_eq!(p[0].key, "registers[1].name");
    assert_eq!(p[1].key, "registers[1].transport.bind");
}

#[test]
fn relative_template_paths_resolve_next_to_the_config_file() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("receipts")).unwrap();
    std::fs::copy(
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/config/receipts/supermarket.toml"
        ),
        dir.path().join("receipts/s.toml"),
    )
    .unwrap();
    let text = format!(
        "{MINIMAL}\n[[registers]]\nname = \"r\"\nformat = \"receipt\"\ntemplate = \"receipts/s.toml\"\ntransport = {{ kind = \"http\" }}\n"
    );
    let file = dir.path().join("storelink.toml");
    std::fs::write(&file, &text).unwrap();
    let c = Config::load(&file).unwrap();
    assert_eq!(
        c.registers[0].template.as_deref(),
        Some(dir.path().join("receipts/s.toml").as_path())
    );
    // The same text, read from elsewhere, does not find the template, and says which key.
    let p = problems(&text);
    assert_eq!(p[0].key, "registers[0].template");
}

#[test]
fn receipt_trailers_must_be_ascii() {
    let text = format!(
        "{MINIMAL}\n[[registers]]\nname = \"r\"\nformat = \"jsonl\"\nframing = {{ kind = \"cut\", trailer = \"Tschüß\" }}\ntransport = {{ kind = \"http\" }}\n"
    );
    assert_eq!(problems(&text)[0].key, "registers[0].framing.trailer");
}

#[test]
fn secrets_come_from_the_environment_and_are_redacted() {
    let text = MINIMAL.replace(
        "url = \"mqtt://127.0.0.1:1883\"",
        "url = \"mqtt://127.0.0.1:1883\"\nusername = \"s042\"\npassword_env = \"MQTT_PW\"",
    );
    let p = problems(&text);
    assert_eq!(p[0].key, "central.mqtt.password_env");
    assert!(p[0].message.contains("MQTT_PW is not set"));

    let env: HashMap<String, String> = [("MQTT_PW".to_string(), "hunter2".to_string())].into();
    let c = Config::parse(&text, "t.toml", &env).unwrap();
    let mqtt = c.central.mqtt.unwrap();
    assert_eq!(mqtt.password.as_ref().unwrap().expose(), "hunter2");
    assert!(!format!("{mqtt:?}").contains("hunter2"));
}

#[test]
fn syntax_errors_carry_a_line() {
    let p = problems("[store\nid = 1");
    assert!(p[0].key.is_empty());
    assert!(p[0].message.starts_with("line 1:"), "{p:?}");
}

#[test]
fn rendered_error_has_file_key_message_shape() {
    let err = Config::parse(
        &MINIMAL.replace("id = \"s042\"", "id = 42"),
        "/etc/x.toml",
        &env(),
    )
    .unwrap_err();
    assert!(
        err.to_string()
            .starts_with("/etc/x.toml: store.id: invalid type"),
        "{err}"
    );
}

#[test]
fn mqtt_urls() {
    assert_eq!(
        MqttEndpoint::parse("mqtt://broker.local").unwrap(),
        MqttEndpoint {
            scheme: MqttScheme::Mqtt,
            host: "broker.local".into(),
            port: 1883,
            path: String::new(),
        }
    );
    let tls = MqttEndpoint::parse("mqtts://broker.local").unwrap();
    assert_eq!((tls.scheme, tls.port), (MqttScheme::Mqtts, 8883));
    let ws = MqttEndpoint::parse("wss://central.example").unwrap();
    assert_eq!((ws.port, ws.path.as_str()), (443, "/mqtt"));
    assert_eq!(ws.websocket_url(), "wss://central.example:443/mqtt");
    let ws = MqttEndpoint::parse("ws://[::1]:8080/x/mqtt").unwrap();
    assert_eq!(ws.websocket_url(), "ws://[::1]:8080/x/mqtt");
    assert!(MqttEndpoint::parse("mqtts://host:8883/path").is_err());
    assert_eq!(
        MqttEndpoint::parse("mqtt://[::1]:1884").unwrap().host,
        "::1"
    );
    assert!(MqttEndpoint::parse("http://x").is_err());
    assert!(MqttEndpoint::parse("mqtt://:1883").is_err());
}

proptest::proptest! {
    #[test]
    fn endpoint_urls_never_panic_and_valid_ones_round_trip(url in "(mqtts?|wss?|http)://[a-z0-9.:\\[\\]/@]{0,30}") {
        if let Ok(e) = MqttEndpoint::parse(&url) {
            let again = MqttEndpoint::parse(&e.to_string()).unwrap();
            proptest::prop_assert_eq!(again, e);
        }
    }

    #[test]
    fn proxy_urls_never_panic(url in "\\PC{0,40}") {
        if let Ok(p) = ProxyUrl::parse(&url) {
            proptest::prop_assert!(!p.host.is_empty());
        }
    }
}

#[test]
fn proxies_come_from_config_or_environment_and_no_proxy_exempts() {
    let with = |url: &str, env: &[(&str, &str)]| {
        let text = MINIMAL.replace(
            "url = \"mqtt://127.0.0.1:1883\"",
            &format!("url = \"{url}\""),
        );
        let env: std::collections::HashMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::parse(&text, "t.toml", &env)
    };
    let proxy = |c: Config| c.central.mqtt.unwrap().resolved_proxy;
    let env = [("HTTPS_PROXY", "http://user:pw@proxy.lan:3128")];
    let p = proxy(with("wss://central.example/mqtt", &env).unwrap()).unwrap();
    assert_eq!((p.host.as_str(), p.port), ("proxy.lan", 3128));
    assert_eq!(p.username.as_deref(), Some("user"));
    assert!(
        !format!("{p:?}").contains("pw"),
        "the password stays out of logs"
    );
    assert_eq!(proxy(with("mqtts://central.example", &env).unwrap()), None);
    let exempt = [env[0], ("NO_PROXY", ".example")];
    assert_eq!(proxy(with("wss://central.example", &exempt).unwrap()), None);
    let bad = with("wss://central.example", &[("HTTPS_PROXY", "socks5://x:1")]).unwrap_err();
    assert!(bad.to_string().contains("central.mqtt.proxy"), "{bad}");
    let e = with(
        "mqtt://central.example\"\nca_file = \"/nonexistent.pem",
        &[],
    )
    .unwrap_err();
    assert!(e.to_string().contains("central.mqtt.ca_file"), "{e}");
}

#[test]
fn signals_and_retention_settings_are_checked_under_their_keys() {
    let p = problems(&format!(
        "{MINIMAL}\n[signals]\ndaily_at = \"6am\"\nsnapshot_every_s = 5\n\n[signals.followups]\nwindow_days = 0\nanchor_skus = [\"\"]\n\n[retention]\nledger_days = 30\noccasion_days = 100\n"
    ));
    assert_eq!(
        keys(&p),
        [
            "signals.daily_at",
            "signals.snapshot_every_s",
            "signals.followups.window_days",
            "retention.ledger_days",
            "retention.occasion_days",
            "signals.followups.anchor_skus[0]",
        ]
    );
    let err = Config::parse(
        &format!("{MINIMAL}\n[signals]\ndaily_at = \"25:00\"\n"),
        "t.toml",
        &env(),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("t.toml: signals.daily_at:"), "{err}");
    assert!(
        problems(&format!("{MINIMAL}\n[signals]\ndaily = \"06:00\"\n"))[0]
            .message
            .contains("daily")
    );
    let c = Config::parse(
        &format!("{MINIMAL}\n[signals]\ndaily_at = \"23:30\"\n"),
        "t.toml",
        &env(),
    )
    .unwrap();
    assert_eq!(
        c.signals.daily_time(),
        Some(jiff::civil::time(23, 30, 0, 0))
    );
    assert_eq!(c.retention.occasion_days, 400);
}
