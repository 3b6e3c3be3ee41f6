-- storelink bridge, schema version 1: the raw feed, de-duplicated by CloudEvent id, and the
-- star the BI tool reads. Money is integer minor units (bigint), quantities exact (numeric).
-- docs/bi.md describes every table; the bridge applies this once, in one transaction.

CREATE SCHEMA IF NOT EXISTS storelink;

-- Every valid event once: the primary key is the exactly-once.
CREATE TABLE storelink.events (
    id          text PRIMARY KEY,
    type        text NOT NULL,
    store       text NOT NULL,
    time        timestamptz NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now(),
    event       jsonb NOT NULL
);
CREATE INDEX events_type_time ON storelink.events (type, time);

-- What could not be used, with its raw bytes and the reason; never dropped silently. Once
-- per topic and bytes (`digest`, SHA-256 of topic, NUL, bytes): a redelivery is not a second.
CREATE TABLE storelink.dead_letters (
    seq         bigserial PRIMARY KEY,
    digest      bytea NOT NULL UNIQUE,
    topic       text NOT NULL,
    reason      text NOT NULL,
    raw         bytea NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE storelink.stores (
    store      text PRIMARY KEY,
    last_seen  timestamptz NOT NULL,
    status     jsonb
);

CREATE TABLE storelink.sales (
    transaction_id text PRIMARY KEY,
    store          text NOT NULL,
    register       text NOT NULL,
    lane           text,
    sequence       numeric(20, 0),
    business_day   date NOT NULL,
    started_at     timestamptz NOT NULL,
    ended_at       timestamptz NOT NULL,
    kind           text NOT NULL CHECK (kind IN ('sale', 'return', 'void')),
    currency       text NOT NULL,
    total          bigint NOT NULL,
    loyalty_id     text,
    source_format  text NOT NULL
);
CREATE INDEX sales_store_day ON storelink.sales (store, business_day);
CREATE INDEX sales_loyalty ON storelink.sales (loyalty_id) WHERE loyalty_id IS NOT NULL;

CREATE TABLE storelink.sales_lines (
    transaction_id text NOT NULL REFERENCES storelink.sales ON DELETE CASCADE,
    line           integer NOT NULL,
    sku            text NOT NULL,
    gtin           text,
    description    text NOT NULL,
    category       text,
    quantity       numeric NOT NULL,
    unit           text,
    unit_price     bigint NOT NULL,
    amount         bigint NOT NULL,
    discount       bigint NOT NULL,
    cost           bigint,
    voided         boolean NOT NULL DEFAULT false,
    PRIMARY KEY (transaction_id, line)
);
CREATE INDEX sales_lines_category ON storelink.sales_lines (category);

-- One row per campaign a decision chose (group 'exposed', per channel) or held out
-- (group 'control').
CREATE TABLE storelink.offers (
    event_id    text NOT NULL,
    campaign    text NOT NULL,
    grp         text NOT NULL CHECK (grp IN ('exposed', 'control')),
    channel     text NOT NULL,
    variant     text,
    offer       text NOT NULL,
    store       text NOT NULL,
    customer_id text NOT NULL,
    lane        text,
    triggers    text[] NOT NULL,
    at          timestamptz NOT NULL,
    PRIMARY KEY (event_id, campaign, channel)
);
CREATE INDEX offers_campaign ON storelink.offers (campaign, grp);

CREATE TABLE storelink.prompts (
    event_id    text PRIMARY KEY,
    prompt_id   text NOT NULL,
    store       text NOT NULL,
    lane        text NOT NULL,
    customer_id text NOT NULL,
    action      text NOT NULL,
    campaign    text,
    variant     text,
    offer       text,
    at          timestamptz NOT NULL
);

CREATE TABLE storelink.redemptions (
    event_id       text PRIMARY KEY,
    store          text NOT NULL,
    customer_id    text NOT NULL,
    campaign       text NOT NULL,
    variant        text,
    offer          text,
    grp            text NOT NULL,
    offered_at     timestamptz,
    transaction_id text NOT NULL,
    transaction_at timestamptz NOT NULL,
    currency       text NOT NULL,
    revenue        bigint NOT NULL,
    margin         bigint
);
CREATE INDEX redemptions_campaign ON storelink.redemptions (campaign, grp);

CREATE TABLE storelink.triggers (
    event_id     text PRIMARY KEY,
    store        text NOT NULL,
    customer_id  text NOT NULL,
    trigger      text NOT NULL,
    occasion     text NOT NULL,
    grp          text,
    due          date,
    days_overdue integer,
    activity     text,
    as_of        date NOT NULL,
    detected     text NOT NULL,
    at           timestamptz NOT NULL
);
CREATE INDEX triggers_kind ON storelink.triggers (trigger, grp, as_of);

-- The latest snapshot per customer and store (an older one arriving late changes nothing).
CREATE TABLE storelink.customer_kpis (
    store         text NOT NULL,
    customer_id   text NOT NULL,
    at            timestamptz NOT NULL,
    as_of         date NOT NULL,
    activity      text,
    overdue_groups text[] NOT NULL,
    revenue_12m   bigint,
    revenue_prev_12m bigint,
    snapshot      jsonb NOT NULL,
    PRIMARY KEY (store, customer_id)
);

CREATE TABLE storelink.presence_daily (
    store  text NOT NULL,
    day    date NOT NULL,
    event  text NOT NULL,
    zone   text NOT NULL DEFAULT '',
    events bigint NOT NULL,
    PRIMARY KEY (store, day, event, zone)
);
