//! Validation after parsing: every problem found, each under its key.

use super::*;

impl Config {
    pub(super) fn validate(&mut self, env: &dyn Env) -> Vec<Problem> {
        let mut v = Validator::default();

        self.validate_store(&mut v);
        self.validate_storage(&mut v);
        if let Some(bind) = env.var("STORELINK_CASHIER_BIND").filter(|b| !b.is_empty()) {
            self.cashier.bind = bind;
        }
        let cashier_bind = v.bind("cashier.bind", &self.cashier.bind);
        self.validate_cashier(&mut v, cashier_bind, env);
        let binds: Vec<(SocketAddr, String)> = cashier_bind
            .map(|a| vec![(a, "cashier.bind".to_string())])
            .unwrap_or_default();
        self.validate_registers(&mut v, binds);
        self.validate_presence(&mut v);
        self.validate_profiles(&mut v);
        self.validate_offers(&mut v);
        self.validate_signals(&mut v);
        self.validate_central(&mut v, env);
        self.validate_ttls(&mut v);
        v.problems
    }

    /// `[store]`: names that go into event ids and topics, the time zone, the currency.
    pub(super) fn validate_store(&self, v: &mut Validator) {
        v.name("store.id", &self.store.id, 64);
        v.name("store.tenant", &self.store.tenant, 64);
        if jiff::tz::TimeZone::get(&self.store.timezone).is_err() {
            v.problem(
                "store.timezone",
                format!(
                    "unknown time zone {:?} (use an IANA name such as \"Europe/Berlin\")",
                    self.store.timezone
                ),
            );
        }
        v.currency("store.currency", &self.store.currency);
    }

    /// `[storage]`: the sizes the outbox, the caches and the dead letters may take.
    pub(super) fn validate_storage(&self, v: &mut Validator) {
        if self.storage.path.as_os_str().is_empty() {
            v.problem("storage.path", "must not be empty");
        }
        if self.storage.max_outbox_bytes < 1024 * 1024 {
            v.problem(
                "storage.max_outbox_bytes",
                format!(
                    "{} is too small; use at least 1048576 (1 MiB)",
                    self.storage.max_outbox_bytes
                ),
            );
        }
        if let Some(cache) = self.storage.cache_bytes
            && cache < MIN_CACHE_BYTES
        {
            v.problem(
                "storage.cache_bytes",
                "too small; use at least 1048576 (1 MiB)",
            );
        }
        let budget = self.storage.memory_budget();
        if budget < 2 * MIN_CACHE_BYTES {
            v.problem(
                "storage.memory_budget_bytes",
                format!("{budget} is too small; use at least 2097152 (2 MiB)"),
            );
        } else if let Some(cache) = self.storage.cache_bytes
            && cache > budget - MIN_CACHE_BYTES
        {
            v.problem(
                "storage.cache_bytes",
                format!(
                    "{cache} leaves less than 1 MiB of storage.memory_budget_bytes ({budget}) for the outbox's log; lower it or raise the budget"
                ),
            );
        }
        if self.storage.max_deadletter_bytes < 64 * 1024 {
            v.problem(
                "storage.max_deadletter_bytes",
                "too small; use at least 65536 (64 KiB)",
            );
        }

        if !(1..=3650).contains(&self.storage.seen_retention_days) {
            v.problem(
                "storage.seen_retention_days",
                format!(
                    "{} is out of range 1-3650",
                    self.storage.seen_retention_days
                ),
            );
        }
        if self.storage.max_seen_ids < 1000 {
            v.problem("storage.max_seen_ids", "too small; use at least 1000");
        }
    }

    /// `[[registers]]`: unique names, free and distinct ports, formats with what they need. `binds` holds the addresses already taken (the local API's).
    pub(super) fn validate_registers(
        &self,
        v: &mut Validator,
        mut binds: Vec<(SocketAddr, String)>,
    ) {
        let mut names: HashMap<&str, usize> = HashMap::new();
        for (i, register) in self.registers.iter().enumerate() {
            let at = format!("registers[{i}]");
            v.name(&format!("{at}.name"), &register.name, 64);
            if let Some(previous) = names.insert(&register.name, i) {
                v.problem(
                    format!("{at}.name"),
                    format!(
                        "{:?} is already used by registers[{previous}]",
                        register.name
                    ),
                );
            }
            if let Some(lane) = &register.lane {
                v.name(&format!("{at}.lane"), lane, 32);
            }
            match &register.transport {
                Transport::TcpListen { bind } => {
                    let key = format!("{at}.transport.bind");
                    if let Some(addr) = v.bind(&key, bind) {
                        if let Some((_, other)) = binds.iter().find(|(a, _)| {
                            a.port() == addr.port()
                                && (a.ip() == addr.ip()
                                    || a.ip().is_unspecified()
                                    || addr.ip().is_unspecified())
                        }) {
                            v.problem(&key, format!("{bind} overlaps with {other}"));
                        }
                        binds.push((addr, key));
                    }
                }
                Transport::TcpConnect { addr } => {
                    let ok = addr.rsplit_once(':').is_some_and(|(h, p)| {
                        !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0)
                    });
                    if !ok {
                        v.problem(
                            format!("{at}.transport.addr"),
                            format!("{addr:?} is not host:port with a port of 1-65535"),
                        );
                    }
                }
                Transport::Serial {
                    port,
                    baud,
                    data_bits,
                    stop_bits,
                    ..
                } => {
                    if port.as_os_str().is_empty() {
                        v.problem(format!("{at}.transport.port"), "must name a device");
                    }
                    if !(50..=4_000_000).contains(baud) {
                        v.problem(
                            format!("{at}.transport.baud"),
                            format!("{baud} is out of range 50-4000000"),
                        );
                    }
                    if !(5..=8).contains(data_bits) {
                        v.problem(
                            format!("{at}.transport.data_bits"),
                            format!("{data_bits} is not 5, 6, 7 or 8"),
                        );
                    }
                    if !(1..=2).contains(stop_bits) {
                        v.problem(
                            format!("{at}.transport.stop_bits"),
                            format!("{stop_bits} is not 1 or 2"),
                        );
                    }
                }
                Transport::Http => {}
            }
            if !(1024..=64 * 1024 * 1024).contains(&register.max_frame_bytes) {
                v.problem(
                    format!("{at}.max_frame_bytes"),
                    format!("{} is out of range 1024-67108864", register.max_frame_bytes),
                );
            }
            if let Some(Framing::Cut { trailer: Some(t) }) = &register.framing
                && (t.is_empty() || !t.is_ascii())
            {
                // The printer sends its code page, not UTF-8: only ASCII means the same bytes.
                v.problem(
                    format!("{at}.framing.trailer"),
                    "must be non-empty ASCII (the printer's code page differs from UTF-8 elsewhere)",
                );
            }
            match (register.format, &register.template) {
                (RegisterFormat::Receipt, None) => v.problem(
                    format!("{at}.template"),
                    "missing required key: receipts are parsed with a template (see config/receipts/)",
                ),
                // The template's content is the receipt parser's to judge; the agent checks
                // it when it loads the config (`daemon::load_config`).
                (RegisterFormat::Receipt, Some(path)) => v.readable(&format!("{at}.template"), path),
                (_, Some(_)) => v.problem(
                    format!("{at}.template"),
                    "only receipt registers use a template",
                ),
                (_, None) => {}
            }
            if register.replies.is_some()
                && matches!(
                    register.transport,
                    Transport::Serial { .. } | Transport::Http
                )
            {
                v.problem(
                    format!("{at}.replies"),
                    "serial and http registers cannot take reply lines",
                );
            }
        }
    }

    /// `[central]`: the MQTT uplink (required), its TLS and credentials, the HTTPS backfill.
    pub(super) fn validate_central(&mut self, v: &mut Validator, env: &dyn Env) {
        match (&mut self.central.mqtt, &mut self.central.https) {
            (None, _) => v.problem(
                "central.mqtt",
                "missing required table: the MQTT uplink is how events reach central",
            ),
            (Some(mqtt), _) => {
                v.mqtt_url("central.mqtt.url", &mqtt.url);
                if let Some(id) = &mqtt.client_id
                    && (id.is_empty() || id.len() > 128)
                {
                    v.problem("central.mqtt.client_id", "must be 1 to 128 characters");
                }
                if let Some(prefix) = &mqtt.topic_prefix
                    && (prefix.is_empty()
                        || prefix.ends_with('/')
                        || prefix.contains(['+', '#', '\0']))
                {
                    v.problem(
                        "central.mqtt.topic_prefix",
                        "must be non-empty, must not end with '/' and must not contain '+', '#' or NUL",
                    );
                }
                let endpoint = MqttEndpoint::parse(&mqtt.url).ok();
                if endpoint.as_ref().is_some_and(|e| !e.scheme.tls()) {
                    for (name, file) in TLS_KEYS.iter().zip(mqtt.tls_paths()) {
                        if file.is_some() {
                            v.problem(
                                format!("central.mqtt.{name}"),
                                "TLS settings need an mqtts:// or wss:// url",
                            );
                        }
                    }
                }
                v.tls_files(&*mqtt);
                mqtt.resolved_proxy = match (&mqtt.proxy, &endpoint) {
                    (Some(url), _) => match ProxyUrl::parse(url) {
                        Ok(p) => Some(p),
                        Err(e) => {
                            v.problem("central.mqtt.proxy", e);
                            None
                        }
                    },
                    (None, Some(endpoint)) if endpoint.scheme.websocket() => {
                        let names: &[&str] = if endpoint.scheme.tls() {
                            &["HTTPS_PROXY", "https_proxy"]
                        } else {
                            &["HTTP_PROXY", "http_proxy"]
                        };
                        let exempt = ["NO_PROXY", "no_proxy"]
                            .iter()
                            .filter_map(|n| env.var(n))
                            .any(|np| no_proxy_matches(&np, &endpoint.host));
                        match names.iter().find_map(|n| env.var(n).map(|u| (*n, u))) {
                            Some((name, url)) if !exempt && !url.is_empty() => {
                                match ProxyUrl::parse(&url) {
                                    Ok(p) => Some(p),
                                    Err(e) => {
                                        v.problem(
                                            "central.mqtt.proxy",
                                            format!("from the environment variable {name}: {e}"),
                                        );
                                        None
                                    }
                                }
                            }
                            _ => None,
                        }
                    }
                    _ => None,
                };
                if mqtt.keep_alive_s < 5 || mqtt.keep_alive_s > 3600 {
                    v.problem(
                        "central.mqtt.keep_alive_s",
                        format!("{} is out of range 5-3600", mqtt.keep_alive_s),
                    );
                }
                if mqtt.inflight == 0 || mqtt.inflight > 1000 {
                    v.problem(
                        "central.mqtt.inflight",
                        format!("{} is out of range 1-1000", mqtt.inflight),
                    );
                }
                if mqtt.password_env.is_some() && mqtt.username.is_none() {
                    v.problem(
                        "central.mqtt.password_env",
                        "a password needs central.mqtt.username",
                    );
                }
                mqtt.password = v.secret("central.mqtt.password_env", &mqtt.password_env, env);
            }
        }
        if let Some(https) = &mut self.central.https {
            if !https.base_url.starts_with("https://") {
                v.problem(
                    "central.https.base_url",
                    format!("{:?} must start with https://", https.base_url),
                );
            }
            https.token = v.secret("central.https.token_env", &https.token_env, env);
            v.tls_files(&*https);
            let mut range = |key: &str, value: u64, lo: u64, hi: u64| {
                if !(lo..=hi).contains(&value) {
                    v.problem(
                        format!("central.https.{key}"),
                        format!("{value} is out of range {lo}-{hi}"),
                    );
                }
            };
            range("backfill_after_s", https.backfill_after_s, 10, 30 * 86_400);
            range("mqtt_down_after_s", https.mqtt_down_after_s, 5, 30 * 86_400);
            range("batch_events", https.batch_events as u64, 1, 10_000);
            range("batch_bytes", https.batch_bytes as u64, 4096, 64 << 20);
        }
        if !(5..=86_400).contains(&self.central.live_after_s) {
            v.problem(
                "central.live_after_s",
                format!("{} is out of range 5-86400", self.central.live_after_s),
            );
        }
    }

    /// `[storage.ttl_s]`: which event types may expire unsent, and for how long.
    pub(super) fn validate_ttls(&self, v: &mut Validator) {
        let ttl = &self.storage.ttl_s;
        for (name, value) in [
            ("transaction", ttl.transaction),
            ("redemption", ttl.redemption),
        ] {
            if value.is_some() {
                v.problem(
                    format!("storage.ttl_s.{name}"),
                    "has no TTL: these events are kept until central acknowledges them",
                );
            }
        }
        for (name, value) in [
            ("presence", ttl.presence),
            ("offer", ttl.offer),
            ("status", ttl.status),
            ("deadletter", ttl.deadletter),
        ] {
            if let Some(s) = value
                && s != 0
                && !(60..=365 * 86_400).contains(&s)
            {
                v.problem(
                    format!("storage.ttl_s.{name}"),
                    format!("{s} is out of range: 0 (no TTL) or 60-31536000"),
                );
            }
        }
    }
}

impl Config {
    pub(super) fn validate_cashier(
        &mut self,
        v: &mut Validator,
        bind: Option<SocketAddr>,
        env: &dyn Env,
    ) {
        let c = &mut self.cashier;
        c.admin_token = v.secret("cashier.admin_token_env", &c.admin_token_env, env);
        c.lane_secret = v.secret("cashier.lane_secret_env", &c.lane_secret_env, env);
        if let Some(addr) = bind
            && !addr.ip().is_loopback()
            && c.admin_token_env.is_none()
        {
            v.problem(
                "cashier.admin_token_env",
                format!(
                    "required when cashier.bind ({addr}) is not a loopback address: name the environment variable that holds the admin token, or bind to 127.0.0.1"
                ),
            );
        }
        if let Some(token) = &c.admin_token
            && token.expose().len() < 16
        {
            v.problem(
                "cashier.admin_token_env",
                "the admin token is shorter than 16 characters",
            );
        }
        if let Some(secret) = &c.lane_secret
            && secret.expose().len() < 16
        {
            v.problem(
                "cashier.lane_secret_env",
                "the lane secret is shorter than 16 characters",
            );
        }
        let known: HashSet<&str> = LANE_TEXTS.iter().map(|(k, _, _)| *k).collect();
        for (language, texts) in &c.texts {
            for key in texts.keys() {
                if !known.contains(key.as_str()) {
                    v.problem(
                        format!("cashier.texts.{language}.{key}"),
                        format!(
                            "not a display text; known: {}",
                            LANE_TEXTS
                                .iter()
                                .map(|(k, _, _)| *k)
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                    );
                }
            }
            if !["de", "en"].contains(&language.as_str()) {
                let missing: Vec<&str> = LANE_TEXTS
                    .iter()
                    .map(|(k, _, _)| *k)
                    .filter(|k| !texts.contains_key(*k))
                    .collect();
                if !missing.is_empty() {
                    v.problem(
                        format!("cashier.texts.{language}"),
                        format!(
                            "a new language needs every text; missing: {}",
                            missing.join(", ")
                        ),
                    );
                }
            }
        }
        if c.texts_for(&c.language).is_none() {
            v.problem(
                "cashier.language",
                format!(
                    "{:?} has no texts; use one of {}",
                    c.language,
                    c.languages().join(", ")
                ),
            );
        }
    }

    pub(super) fn validate_profiles(&self, v: &mut Validator) {
        let p = &self.profiles;
        let mut range = |key: &str, value: f64, lo: f64, hi: f64| {
            if !(lo..=hi).contains(&value) {
                v.problem(
                    format!("profiles.{key}"),
                    format!("{value} is out of range {lo}-{hi}"),
                );
            }
        };
        range("cache_entries", p.cache_entries as f64, 0.0, 10_000_000.0);
        range("sync_interval_s", p.sync_interval_s as f64, 10.0, 86_400.0);
        range(
            "sync_page_size",
            f64::from(p.sync_page_size),
            1.0,
            100_000.0,
        );
        range(
            "rfm_interval_s",
            p.rfm_interval_s as f64,
            60.0,
            7.0 * 86_400.0,
        );
        let k = &p.kpi;
        range("kpi.new_days", f64::from(k.new_days), 1.0, 3650.0);
        range(
            "kpi.passive_after_days",
            f64::from(k.passive_after_days),
            1.0,
            3650.0,
        );
        range("kpi.overdue_factor", k.overdue_factor, 1.0, 10.0);
        range(
            "kpi.expected_lifetime_years",
            k.expected_lifetime_years,
            0.1,
            50.0,
        );
        range(
            "kpi.clv_horizon_days",
            f64::from(k.clv_horizon_days),
            1.0,
            3650.0,
        );
    }

    /// `[signals]` and `[retention]`.
    pub(super) fn validate_signals(&self, v: &mut Validator) {
        let s = &self.signals;
        if s.daily_time().is_none() {
            v.problem(
                "signals.daily_at",
                format!(
                    "{:?} is not a local time HH:MM such as \"06:00\"",
                    s.daily_at
                ),
            );
        }
        let mut range = |key: &str, value: u64, lo: u64, hi: u64| {
            if !(lo..=hi).contains(&value) {
                v.problem(
                    key.to_string(),
                    format!("{value} is out of range {lo}-{hi}"),
                );
            }
        };
        range(
            "signals.snapshot_every_s",
            s.snapshot_every_s,
            60,
            7 * 86_400,
        );
        range(
            "signals.birthday_days_ahead",
            s.birthday_days_ahead.into(),
            0,
            60,
        );
        range(
            "signals.points_expiry_days_ahead",
            s.points_expiry_days_ahead.into(),
            0,
            365,
        );
        range("signals.catch_up_days", s.catch_up_days.into(), 0, 60);
        let f = &s.followups;
        range(
            "signals.followups.window_days",
            f.window_days.into(),
            1,
            730,
        );
        range(
            "signals.followups.max_pairs",
            f.max_pairs as u64,
            1,
            1_000_000,
        );
        range(
            "signals.followups.min_customers",
            f.min_customers,
            1,
            1_000_000,
        );
        range("signals.followups.top", f.top as u64, 1, 1000);
        let r = &self.retention;
        range("retention.ledger_days", r.ledger_days.into(), 730, 36_500);
        range(
            "retention.offer_history_days",
            r.offer_history_days.into(),
            1,
            36_500,
        );
        range(
            "retention.occasion_days",
            r.occasion_days.into(),
            366,
            36_500,
        );
        range(
            "retention.deadletter_days",
            r.deadletter_days.into(),
            1,
            36_500,
        );
        for (i, sku) in f.anchor_skus.iter().enumerate() {
            if sku.is_empty() || sku.len() > 64 {
                v.problem(
                    format!("signals.followups.anchor_skus[{i}]"),
                    "an anchor SKU is 1 to 64 characters",
                );
            }
        }
    }

    pub(super) fn validate_offers(&self, v: &mut Validator) {
        let o = &self.offers;
        if !(10..=86_400).contains(&o.campaign_poll_s) {
            v.problem(
                "offers.campaign_poll_s",
                format!("{} is out of range 10-86400", o.campaign_poll_s),
            );
        }
        if !(5..=86_400).contains(&o.prompt_ttl_s) {
            v.problem(
                "offers.prompt_ttl_s",
                format!("{} is out of range 5-86400", o.prompt_ttl_s),
            );
        }
        // As with templates, what the set says is for offers to judge (`daemon::load_config`).
        if let Some(f) = &o.campaigns_file {
            v.readable("offers.campaigns_file", f);
        }
    }

    /// `[presence]`: the service UUID, the ranges, the source and its table.
    pub(super) fn validate_presence(&mut self, v: &mut Validator) {
        let p = &mut self.presence;
        match (&p.service_uuid, p.source) {
            (None, PresenceSource::None) => {}
            (None, _) => v.problem(
                "presence.service_uuid",
                "missing required key: the loyalty app's service UUID is how its phones are found",
            ),
            (Some(text), _) => match parse_service_uuid(text) {
                Ok(u) => p.service = Some(u),
                Err(e) => v.problem("presence.service_uuid", e),
            },
        }
        if !(30..=86_400).contains(&p.rotation_s) {
            v.problem(
                "presence.rotation_s",
                format!("{} is out of range 30-86400", p.rotation_s),
            );
        }
        if !(1..=3650).contains(&p.retention_days) {
            v.problem(
                "presence.retention_days",
                format!("{} is out of range 1-3650", p.retention_days),
            );
        }
        if !(5..=86_400).contains(&p.store_away_s) {
            v.problem(
                "presence.store_away_s",
                format!("{} is out of range 5-86400", p.store_away_s),
            );
        }
        let tables = [
            ("replay", p.replay.is_some(), PresenceSource::Replay),
            (
                "scanners",
                p.scanners.is_some(),
                PresenceSource::MqttScanners,
            ),
            ("btleplug", p.btleplug.is_some(), PresenceSource::Btleplug),
        ];
        for (table, present, wants) in tables {
            if present && p.source != wants {
                v.problem(
                    format!("presence.{table}"),
                    format!("only used when presence.source = {:?}", source_name(wants)),
                );
            }
        }
        match p.source {
            PresenceSource::Replay => match &p.replay {
                None => v.problem(
                    "presence.replay",
                    "missing required table: source = \"replay\" needs [presence.replay] with a file",
                ),
                Some(r) => {
                    if let Err(e) = std::fs::metadata(&r.file) {
                        v.problem(
                            "presence.replay.file",
                            format!("cannot read {}: {e}", r.file.display()),
                        );
                    }
                    if let Err(p) = r.validate() {
                        v.problems.push(p);
                    }
                }
            },
            PresenceSource::MqttScanners => {
                if let Some(Err(p)) = p.scanners.as_ref().map(|s| s.validate()) {
                    v.problems.push(p);
                }
            }
            PresenceSource::Btleplug | PresenceSource::None => {}
        }

        Self::validate_layout(p, v);
    }

    /// `[[presence.calibration]]` and `[[presence.zones]]`: the store's layout.
    fn validate_layout(p: &PresenceSection, v: &mut Validator) {
        let mut scanners: HashMap<&str, usize> = HashMap::new();
        for (i, c) in p.calibration.iter().enumerate() {
            let at = format!("presence.calibration[{i}]");
            v.name(&format!("{at}.scanner"), &c.scanner, 64);
            if let Some(previous) = scanners.insert(&c.scanner, i) {
                v.problem(
                    format!("{at}.scanner"),
                    format!(
                        "{:?} is already calibrated in presence.calibration[{previous}]",
                        c.scanner
                    ),
                );
            }
            if !(-120.0..=0.0).contains(&c.ref_rssi_1m) {
                v.problem(
                    format!("{at}.ref_rssi_1m"),
                    format!("{} dBm is out of range -120 to 0", c.ref_rssi_1m),
                );
            }
            if !(1.0..=6.0).contains(&c.path_loss_exponent) {
                v.problem(
                    format!("{at}.path_loss_exponent"),
                    format!("{} is out of range 1-6", c.path_loss_exponent),
                );
            }
        }

        let mut names: HashMap<&str, usize> = HashMap::new();
        for (i, z) in p.zones.iter().enumerate() {
            let at = format!("presence.zones[{i}]");
            v.name(&format!("{at}.name"), &z.name, 64);
            if z.name == "store" {
                v.problem(
                    format!("{at}.name"),
                    "\"store\" is reserved for store-level presence",
                );
            }
            if let Some(previous) = names.insert(&z.name, i) {
                v.problem(
                    format!("{at}.name"),
                    format!("{:?} is already used by presence.zones[{previous}]", z.name),
                );
            }
            if let Some(lane) = &z.lane {
                v.name(&format!("{at}.lane"), lane, 32);
            }
            if z.scanners.is_empty() {
                v.problem(
                    format!("{at}.scanners"),
                    "must name at least one scanner that covers the zone",
                );
            }
            for (j, s) in z.scanners.iter().enumerate() {
                v.name(&format!("{at}.scanners[{j}]"), s, 64);
            }
            if !(z.enter_m > 0.0 && z.enter_m <= 100.0) {
                v.problem(
                    format!("{at}.enter_m"),
                    format!("{} is out of range (0, 100] metres", z.enter_m),
                );
            }
            if !(z.exit_m > z.enter_m && z.exit_m <= 100.0) {
                v.problem(
                    format!("{at}.exit_m"),
                    format!(
                        "{} must be greater than enter_m ({}) and at most 100: the gap is what stops a zone from flapping",
                        z.exit_m, z.enter_m
                    ),
                );
            }
            if z.dwell_s > 86_400 {
                v.problem(
                    format!("{at}.dwell_s"),
                    format!("{} is out of range 0-86400", z.dwell_s),
                );
            }
            if !(1..=86_400).contains(&z.away_s) {
                v.problem(
                    format!("{at}.away_s"),
                    format!("{} is out of range 1-86400", z.away_s),
                );
            }
        }
    }
}

pub(super) fn source_name(source: PresenceSource) -> &'static str {
    match source {
        PresenceSource::None => "none",
        PresenceSource::Btleplug => "btleplug",
        PresenceSource::Replay => "replay",
        PresenceSource::MqttScanners => "mqtt-scanners",
    }
}

/// The keys of a [`TlsSection`], in the order of `tls_paths`.
const TLS_KEYS: [&str; 3] = ["ca_file", "cert_file", "key_file"];

#[derive(Default)]
pub(super) struct Validator {
    problems: Vec<Problem>,
}

impl Validator {
    /// `path` names a file this process can open.
    pub(super) fn readable(&mut self, key: &str, path: &Path) {
        if let Err(e) = std::fs::File::open(path) {
            self.problem(key, format!("cannot read {}: {e}", path.display()));
        } else if path.is_dir() {
            self.problem(
                key,
                format!("{} is a directory, not a file", path.display()),
            );
        }
    }

    pub(super) fn problem(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.problems.push(Problem {
            key: key.into(),
            message: message.into(),
        });
    }

    /// Names end up in event ids (`store:register:day:seq`) and MQTT topics, so they must not
    /// carry separators or wildcards.
    pub(super) fn name(&mut self, key: &str, value: &str, max: usize) {
        let ok = !value.is_empty()
            && value.len() <= max
            && value
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !ok {
            self.problem(
                key,
                format!("{value:?} must be 1 to {max} characters of A-Z, a-z, 0-9, '-' or '_'"),
            );
        }
    }

    pub(super) fn currency(&mut self, key: &str, value: &str) {
        if value.len() != 3 || !value.bytes().all(|b| b.is_ascii_uppercase()) {
            self.problem(
                key,
                format!("{value:?} is not an ISO 4217 code such as \"EUR\""),
            );
        }
    }

    pub(super) fn bind(&mut self, key: &str, value: &str) -> Option<SocketAddr> {
        match parse_socket_addr(value) {
            Ok(addr) => Some(addr),
            Err(message) => {
                self.problem(key, message);
                None
            }
        }
    }

    pub(super) fn mqtt_url(&mut self, key: &str, value: &str) {
        if let Err(message) = MqttEndpoint::parse(value) {
            self.problem(key, message);
        }
    }

    /// Reads the PEM files a TLS client will load, so a bad file stops the start with its key.
    pub(super) fn tls_files<S: TlsSection>(&mut self, s: &S) {
        let section = S::SECTION;
        let [ca, cert, key] = s.tls_paths();
        if let Some(ca) = ca
            && let Err(e) = crate::tls::read_certs(ca)
        {
            self.problem(format!("{section}.ca_file"), e);
        }
        match (cert, key) {
            (Some(cert), Some(key)) => {
                if let Err(e) = crate::tls::read_identity(cert, key) {
                    self.problem(format!("{section}.{}", e.key), e.message);
                }
            }
            (Some(_), None) => self.problem(
                format!("{section}.key_file"),
                "a client certificate needs its key (cert_file and key_file go together)",
            ),
            (None, Some(_)) => self.problem(
                format!("{section}.cert_file"),
                "a client key needs its certificate (cert_file and key_file go together)",
            ),
            (None, None) => {}
        }
    }

    pub(super) fn secret(
        &mut self,
        key: &str,
        name: &Option<String>,
        env: &dyn Env,
    ) -> Option<Secret> {
        let name = name.as_ref()?;
        match env.var(name) {
            Some(value) if !value.is_empty() => Some(Secret::new(value)),
            _ => {
                self.problem(key, format!("environment variable {name} is not set"));
                None
            }
        }
    }
}
