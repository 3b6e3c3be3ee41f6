//! The BI sink: PostgreSQL, a star schema the bridge creates and migrates (`schema_v1.sql`,
//! described in `docs/bi.md`).
//!
//! Invariants:
//! - One batch is one transaction: the raw events (`storelink.events`, keyed by CloudEvent
//!   id), their rows in the star and the batch's dead letters commit together or not at all.
//! - Exactly once: an event whose id is already held inserts nothing, anywhere; the star is
//!   filled only from the ids this batch inserted, so a resend never counts twice.
//! - The mapping from event to rows is SQL over the stored event, in one place (below), so
//!   the star can be rebuilt from `storelink.events` by the same statements.
//! - Migrations are numbered, applied in order, each in its own transaction, under an
//!   advisory lock, so several bridges starting at once apply each exactly once.

use std::path::Path;

use tokio_postgres::Client;

use super::contract::Envelope;
use crate::config::Secret;

/// The schema's migrations, in order; the position is the version.
const MIGRATIONS: [&str; 2] = [include_str!("schema_v1.sql"), include_str!("schema_v2.sql")];

/// Serialises migrations across bridges (an arbitrary, fixed key).
const MIGRATION_LOCK: i64 = 0x5354_4f52_454c_4e4b;

#[derive(Debug, thiserror::Error)]
pub enum PgError {
    #[error("postgres: {0}")]
    Db(#[from] tokio_postgres::Error),
    /// TLS cannot be set up (`postgres.ca_file`), or the server's certificate is refused: no
    /// retry mends that.
    #[error("postgres: {0}")]
    Tls(String),
}

impl PgError {
    /// Whether retrying the same batch can succeed (the server or the connection), as opposed
    /// to a statement the data makes fail every time.
    pub fn transient(&self) -> bool {
        let PgError::Db(e) = self else {
            return false;
        };
        e.is_closed()
            || e.code().is_none_or(|c| {
                let c = c.code();
                // Connection exceptions, insufficient resources, operator intervention,
                // serialisation failures and deadlocks.
                c.starts_with("08")
                    || c.starts_with("53")
                    || c.starts_with("57")
                    || c == "40001"
                    || c == "40P01"
            })
    }
}

/// A dead letter for the table: where it came from, why, and its bytes.
#[derive(Debug, Clone)]
pub struct Refused {
    pub topic: String,
    pub reason: String,
    pub raw: Vec<u8>,
}

impl Refused {
    /// What makes a dead letter the same one again: its topic and bytes.
    fn digest(&self) -> Vec<u8> {
        use sha2::Digest;
        let mut h = sha2::Sha256::new();
        h.update(self.topic.as_bytes());
        h.update([0]);
        h.update(&self.raw);
        h.finalize().to_vec()
    }
}

/// What one batch did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Written {
    /// Events new to the database.
    pub new: u64,
    /// Events it already held (resends).
    pub duplicates: u64,
    pub dead_letters: u64,
}

/// Which email sink takes which trigger: pairs, as two columns for `unnest`. A trigger event
/// queues one row per sink that takes its trigger, in the batch's own transaction.
#[derive(Debug, Clone, Default)]
pub struct Routes {
    sinks: Vec<String>,
    triggers: Vec<String>,
}

impl Routes {
    pub fn add(&mut self, sink: &str, trigger: &str) {
        self.sinks.push(sink.to_string());
        self.triggers.push(trigger.to_string());
    }
}

/// A connection to the BI database.
pub struct Sink {
    client: Client,
    routes: Routes,
    /// [`write_statement`], prepared on this connection.
    write: tokio_postgres::Statement,
    connection: tokio::task::JoinHandle<()>,
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.connection.abort();
    }
}

impl Sink {
    /// Connects, and brings the schema up to date.
    pub async fn connect(
        url: &str,
        password: Option<&Secret>,
        ca_file: Option<&Path>,
        routes: &Routes,
    ) -> Result<Sink, PgError> {
        let (mut client, connection) = connect(url, password, ca_file).await?;
        migrate(&mut client).await?;
        let write = client.prepare(write_statement()).await?;
        Ok(Sink {
            client,
            routes: routes.clone(),
            connection,
            write,
        })
    }

    /// Whether the connection is gone (the next batch needs a new one).
    pub fn is_closed(&self) -> bool {
        self.client.is_closed()
    }

    /// Writes one batch in one transaction; see the module invariants.
    pub async fn write(
        &mut self,
        events: &[Envelope],
        refused: &[Refused],
    ) -> Result<Written, PgError> {
        let mut ids = Vec::with_capacity(events.len());
        let mut types = Vec::with_capacity(events.len());
        let mut stores = Vec::with_capacity(events.len());
        let mut times = Vec::with_capacity(events.len());
        let mut bodies = Vec::with_capacity(events.len());
        for e in events {
            ids.push(e.id.as_str());
            types.push(e.kind.cloudevent_type());
            stores.push(e.store.as_str());
            times.push(e.time.as_str());
            bodies.push(e.raw.to_string());
        }
        let tx = self.client.transaction().await?;
        let new: i64 = if events.is_empty() {
            0
        } else {
            let (sinks, triggers) = (&self.routes.sinks, &self.routes.triggers);
            tx.query_one(
                &self.write,
                &[&ids, &types, &stores, &times, &bodies, sinks, triggers],
            )
            .await?
            .get(0)
        };
        if !refused.is_empty() {
            let topics: Vec<&str> = refused.iter().map(|r| r.topic.as_str()).collect();
            let reasons: Vec<&str> = refused.iter().map(|r| r.reason.as_str()).collect();
            let raws: Vec<&[u8]> = refused.iter().map(|r| r.raw.as_slice()).collect();
            let digests: Vec<Vec<u8>> = refused.iter().map(Refused::digest).collect();
            tx.execute(
                "INSERT INTO storelink.dead_letters (digest, topic, reason, raw)
                 SELECT * FROM unnest($1::bytea[], $2::text[], $3::text[], $4::bytea[])
                 ON CONFLICT (digest) DO NOTHING",
                &[&digests, &topics, &reasons, &raws],
            )
            .await?;
        }
        tx.commit().await?;
        let new = new as u64;
        Ok(Written {
            new,
            duplicates: events.len() as u64 - new,
            dead_letters: refused.len() as u64,
        })
    }
}

/// A connection (its driver task to be aborted by the handle's owner): TLS as the URL's
/// `sslmode` says, the server verified against `ca_file` or the system's roots.
pub async fn connect(
    url: &str,
    password: Option<&Secret>,
    ca_file: Option<&Path>,
) -> Result<(Client, tokio::task::JoinHandle<()>), PgError> {
    let mut config: tokio_postgres::Config = url.parse()?;
    if let Some(p) = password {
        config.password(p.expose());
    }
    config.application_name("storelink-bridge");
    let files = crate::tls::TlsFiles {
        ca_file,
        cert_file: None,
        key_file: None,
    };
    let tls = crate::tls::client_config(&files, &[])
        .map_err(|e| PgError::Tls(format!("postgres.{}: {}", e.key, e.message)))?;
    let tls = tokio_postgres_rustls::MakeRustlsConnect::new(tls);
    let (client, connection) = config.connect(tls).await.map_err(|e| {
        // A certificate the CA does not vouch for is mended by the config, not by a retry.
        let host = match config.get_hosts().first() {
            Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
            _ => "the server".to_string(),
        };
        match crate::tls::explain(&e, &host, "postgres") {
            Some(why) => PgError::Tls(why),
            None => PgError::Db(e),
        }
    })?;
    let connection = tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::warn!(error = %e, "postgres connection ended");
        }
    });
    Ok((client, connection))
}

/// Brings the schema up to date; see the module invariants.
async fn migrate(client: &mut Client) -> Result<(), PgError> {
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS public.storelink_migrations (
                version integer PRIMARY KEY,
                applied_at timestamptz NOT NULL DEFAULT now())",
    )
    .await?;
    let applied: i32 = tx
        .query_one(
            "SELECT coalesce(max(version), 0) FROM public.storelink_migrations",
            &[],
        )
        .await?
        .get(0);
    for (i, sql) in MIGRATIONS.iter().enumerate() {
        let version = i as i32 + 1;
        if version <= applied {
            continue;
        }
        tx.batch_execute(sql).await?;
        tx.execute(
            "INSERT INTO public.storelink_migrations (version) VALUES ($1)",
            &[&version],
        )
        .await?;
        tracing::info!(version, "bridge schema migrated");
    }
    tx.commit().await?;
    Ok(())
}

/// The batch in one statement: the events are inserted (a held id inserts nothing), and the
/// rows they return feed every projection, so the database reads each event once and the
/// batch costs one round trip. The projections write to distinct tables, which is what
/// data-modifying CTEs in one statement allow.
fn write_statement() -> &'static str {
    static STATEMENT: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
        let mut sql = String::from(
            "WITH new AS (
                INSERT INTO storelink.events (id, type, store, time, event)
                SELECT i, t, s, tm::timestamptz, b::jsonb
                FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[])
                     AS u(i, t, s, tm, b)
                ON CONFLICT (id) DO NOTHING
                RETURNING id, type, store, time, event)",
        );
        for (i, projection) in PROJECTIONS.iter().enumerate() {
            sql.push_str(&format!(",\n p{i} AS ({projection})"));
        }
        sql.push_str("\nSELECT count(*) FROM new");
        sql
    });
    &STATEMENT
}

/// Event → star rows, each over `new`: the events a batch inserted, as `storelink.events`
/// rows. The same statements over `storelink.events` itself rebuild the star. A row whose key
/// is already there is left alone, except the customer's latest snapshot and the store's last
/// sighting.
const PROJECTIONS: [&str; 10] = [
    // sales: one row per transaction.
    "INSERT INTO storelink.sales (transaction_id, store, register, lane, sequence, business_day,
         started_at, ended_at, kind, currency, total, loyalty_id, source_format)
     SELECT d->>'id', d->>'store', d->>'register', d->>'lane', (d->>'sequence')::numeric,
         (d->>'business_day')::date, (d->>'started_at')::timestamptz,
         (d->>'ended_at')::timestamptz, d->>'kind', d->>'currency', (d->>'total')::bigint,
         d->>'loyalty_id', d->>'source_format'
     FROM new e, LATERAL (SELECT e.event->'data' AS d) x
     WHERE e.type = 'storelink.transaction.v1'
     ON CONFLICT (transaction_id) DO NOTHING",
    // sales_lines: numbered from 0 in the register's order.
    "INSERT INTO storelink.sales_lines (transaction_id, line, sku, gtin, description, category,
         quantity, unit, unit_price, amount, discount, cost, voided)
     SELECT e.event->'data'->>'id', (l.n - 1)::int, l.v->>'sku', l.v->>'gtin',
         l.v->>'description', l.v->>'category', (l.v->>'quantity')::numeric, l.v->>'unit',
         (l.v->>'unit_price')::bigint, (l.v->>'amount')::bigint, (l.v->>'discount')::bigint,
         (l.v->>'cost')::bigint, coalesce((l.v->>'voided')::boolean, false)
     FROM new e,
         jsonb_array_elements(e.event->'data'->'lines') WITH ORDINALITY AS l(v, n)
     WHERE e.type = 'storelink.transaction.v1'
     ON CONFLICT DO NOTHING",
    // offers: the chosen per channel, and the held-out controls.
    "INSERT INTO storelink.offers (event_id, campaign, grp, channel, variant, offer, store,
         customer_id, lane, triggers, at)
     SELECT e.id, o.v->>'campaign', 'exposed', o.v->>'channel', o.v->>'variant',
         o.v->>'offer', e.store, e.event->'data'->>'customer_id', e.event->'data'->>'lane',
         ARRAY(SELECT jsonb_array_elements_text(e.event->'data'->'triggers')), e.time
     FROM new e, jsonb_array_elements(e.event->'data'->'offers') AS o(v)
     WHERE e.type = 'storelink.offer.v1'
     UNION ALL
     SELECT e.id, c.v->>'campaign', 'control', 'none', c.v->>'variant', c.v->>'offer',
         e.store, e.event->'data'->>'customer_id', e.event->'data'->>'lane',
         ARRAY(SELECT jsonb_array_elements_text(e.event->'data'->'triggers')), e.time
     FROM new e, jsonb_array_elements(e.event->'data'->'controls') AS c(v)
     WHERE e.type = 'storelink.offer.v1'
     ON CONFLICT DO NOTHING",
    "INSERT INTO storelink.prompts (event_id, prompt_id, store, lane, customer_id, action,
         campaign, variant, offer, at)
     SELECT e.id, d->>'prompt_id', e.store, d->>'lane', d->>'customer_id', d->>'action',
         d->>'campaign', d->>'variant', d->>'offer', e.time
     FROM new e, LATERAL (SELECT e.event->'data' AS d) x
     WHERE e.type = 'storelink.prompt.v1'
     ON CONFLICT DO NOTHING",
    "INSERT INTO storelink.redemptions (event_id, store, customer_id, campaign, variant, offer,
         grp, offered_at, transaction_id, transaction_at, currency, revenue, margin)
     SELECT e.id, e.store, d->>'customer_id', d->>'campaign', d->>'variant', d->>'offer',
         d->>'group', (d->>'offered_at')::timestamptz, d->>'transaction_id',
         (d->>'transaction_at')::timestamptz, d->>'currency', (d->>'revenue')::bigint,
         (d->>'margin')::bigint
     FROM new e, LATERAL (SELECT e.event->'data' AS d) x
     WHERE e.type = 'storelink.redemption.v1'
     ON CONFLICT DO NOTHING",
    "INSERT INTO storelink.triggers (event_id, store, customer_id, trigger, occasion, grp, due,
         days_overdue, activity, as_of, detected, at)
     SELECT e.id, e.store, d->>'customer_id', d->>'trigger', d->>'occasion', d->>'group',
         (d->>'due')::date, (d->>'days_overdue')::int, d->>'activity', (d->>'as_of')::date,
         d->>'detected', e.time
     FROM new e, LATERAL (SELECT e.event->'data' AS d) x
     WHERE e.type = 'storelink.trigger.v1'
     ON CONFLICT DO NOTHING",
    // email_queue: each trigger for each email sink that takes it ($6, $7: sink and trigger
    // pairs). Keyed by customer, trigger and occasion: the same occasion from another store,
    // or again, queues nothing.
    "INSERT INTO storelink.email_queue (sink, customer_id, trigger, occasion, event_id, at,
         data)
     SELECT r.sink, d->>'customer_id', d->>'trigger', d->>'occasion', e.id, e.time, d
     FROM new e, LATERAL (SELECT e.event->'data' AS d) x,
         unnest($6::text[], $7::text[]) AS r(sink, trigger)
     WHERE e.type = 'storelink.trigger.v1' AND r.trigger = d->>'trigger'
     ON CONFLICT DO NOTHING",
    // customer_kpis: the newest snapshot per customer and store wins, whatever the order
    // of arrival.
    "INSERT INTO storelink.customer_kpis AS k (store, customer_id, at, as_of, activity,
         overdue_groups, revenue_12m, revenue_prev_12m, snapshot)
     SELECT DISTINCT ON (e.store, d->>'customer_id') e.store, d->>'customer_id', e.time,
         (d->>'as_of')::date, d->>'activity',
         ARRAY(SELECT jsonb_array_elements_text(coalesce(d->'overdue_groups', '[]'))),
         (d->>'revenue_12m')::bigint, (d->>'revenue_prev_12m')::bigint, d
     FROM new e, LATERAL (SELECT e.event->'data' AS d) x
     WHERE e.type = 'storelink.customer.v1'
     ORDER BY e.store, d->>'customer_id', e.time DESC
     ON CONFLICT (store, customer_id) DO UPDATE SET at = EXCLUDED.at, as_of = EXCLUDED.as_of,
         activity = EXCLUDED.activity, overdue_groups = EXCLUDED.overdue_groups,
         revenue_12m = EXCLUDED.revenue_12m, revenue_prev_12m = EXCLUDED.revenue_prev_12m,
         snapshot = EXCLUDED.snapshot
     WHERE k.at < EXCLUDED.at",
    // presence_daily: counts per store, UTC day, kind and zone; no customer.
    "INSERT INTO storelink.presence_daily AS p (store, day, event, zone, events)
     SELECT e.store, (e.time AT TIME ZONE 'UTC')::date, e.event->'data'->>'event',
         coalesce(e.event->'data'->>'zone', ''), count(*)
     FROM new e
     WHERE e.type = 'storelink.presence.v1'
     GROUP BY 1, 2, 3, 4
     ON CONFLICT (store, day, event, zone) DO UPDATE SET events = p.events + EXCLUDED.events",
    // stores: the last event seen, and the last status.
    "INSERT INTO storelink.stores AS s (store, last_seen, status)
     SELECT e.store, max(e.time),
         (array_agg(e.event->'data' ORDER BY e.time DESC)
             FILTER (WHERE e.type = 'storelink.status.v1'))[1]
     FROM new e
     GROUP BY e.store
     ON CONFLICT (store) DO UPDATE SET last_seen = greatest(s.last_seen, EXCLUDED.last_seen),
         status = coalesce(EXCLUDED.status, s.status)",
];
