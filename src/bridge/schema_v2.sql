-- storelink bridge, schema version 2: the email tools. docs/bi.md ("Email tools") describes
-- both tables.

-- Who each email tool knows a customer as, and whether the customer may be mailed now.
-- Central's CRM keeps this table (the bridge only reads it): email addresses never travel
-- from the stores, and consent is checked here again when a trigger is sent, not when the
-- store saw it. `tool` is the sink's `name` in bridge.toml.
CREATE TABLE storelink.email_contacts (
    customer_id text NOT NULL,
    tool        text NOT NULL,
    external_id text NOT NULL,
    marketing   boolean NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (customer_id, tool)
);

-- The durable queue: one row per email sink and occasion, written in the same transaction
-- as the trigger's event. The key is central's de-duplication key for triggers (customer,
-- trigger, occasion), so the same occasion sent by two stores is queued, and mailed, once.
-- state: pending (next_at says when it may go), sent, no_consent, no_contact, failed.
CREATE TABLE storelink.email_queue (
    sink        text NOT NULL,
    customer_id text NOT NULL,
    trigger     text NOT NULL,
    occasion    text NOT NULL,
    event_id    text NOT NULL,
    at          timestamptz NOT NULL,
    data        jsonb NOT NULL,
    state       text NOT NULL DEFAULT 'pending',
    attempts    integer NOT NULL DEFAULT 0,
    next_at     timestamptz NOT NULL DEFAULT now(),
    last_error  text,
    enqueued_at timestamptz NOT NULL DEFAULT now(),
    done_at     timestamptz,
    PRIMARY KEY (sink, customer_id, trigger, occasion)
);
CREATE INDEX email_queue_due ON storelink.email_queue (sink, next_at) WHERE state = 'pending';
