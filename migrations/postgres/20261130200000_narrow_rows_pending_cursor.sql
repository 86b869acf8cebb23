-- Large recipient files (SPEC §12: on PostgreSQL the state database within
-- 2 x of SQLite's). At 1,000,000 rows the table took 157 MB and its index
-- by state 41 MB:
--
-- * Every row held six 8-byte integers. The campaign, the row's number in
--   its file and the file's read that last saw it fit in 4 bytes, the
--   attempts in 2; the columns are in an order that needs no padding
--   between them, which brings a row of a typical file from 152 bytes to
--   128 (the table to about 134 MB).
-- * The index by state held an entry for every row, with its id, though
--   nearly all rows are `pending`: pending rows are left out of it, as on
--   SQLite, and it no longer repeats the id, so that the entries of one
--   state share one key (PostgreSQL then keeps them as one list). Claims
--   find the pending rows in id order by the primary key, from
--   `campaigns.pending_from`, below which the campaign has no pending row.
-- * The unique index on keys and the primary key fill their pages: a
--   campaign's first read adds its rows in the order of their keys, and
--   ids only grow.
-- * A recipient's key compares byte for byte (collation "C"): only ever
--   looked up by equality or by a `row:` prefix, and sorted faster.
--
-- PostgreSQL cannot change a column's place: `recipients` is rebuilt with
-- the same columns and rows (ids kept, its sequence going on). No table
-- refers to it.

ALTER SEQUENCE recipients_id_seq OWNED BY NONE;

CREATE TABLE recipients_new (
    id              BIGINT NOT NULL DEFAULT nextval('recipients_id_seq'),
    updated_at      BIGINT NOT NULL,
    -- Unix milliseconds before which a deferred recipient is not retried.
    next_attempt_at BIGINT,
    -- Until when the worker that marked the row `sending` (or picked it)
    -- holds it.
    lease_until     BIGINT,
    -- No foreign key: checking one is a query per row added (2-3 s of the
    -- first read of 1,000,000 rows). Rows are only added by a read of the
    -- file, which holds its campaign's row; `reset` deletes them with it.
    campaign_id     INTEGER NOT NULL,
    row_number      INTEGER NOT NULL,
    seen_gen        INTEGER NOT NULL,
    attempts        SMALLINT NOT NULL DEFAULT 0,
    -- The lowercased address for a recipient; 'row:N' for a file row that is
    -- not one (invalid address, duplicate), re-derived at every read.
    row_key         TEXT COLLATE "C" NOT NULL,
    -- The address as written in the file; '' when it is row_key.
    email           TEXT NOT NULL,
    -- The address as sent, international domains in punycode; NULL when
    -- it is the address as written.
    address         TEXT,
    -- The row's cells, in header order (see the store for their form).
    fields          TEXT NOT NULL,
    state           TEXT NOT NULL CHECK (state IN
                        ('pending', 'sending', 'sent', 'deferred', 'failed', 'unknown', 'skipped', 'bounced')),
    reason          TEXT,
    last_reply      TEXT,
    message_id      TEXT,
    -- The worker that marked the row `sending` (or picked it).
    worker          TEXT
);

INSERT INTO recipients_new
    (id, updated_at, next_attempt_at, lease_until, campaign_id, row_number, seen_gen, attempts,
     row_key, email, address, fields, state, reason, last_reply, message_id, worker)
SELECT id, updated_at, next_attempt_at, lease_until, campaign_id, row_number, seen_gen, attempts,
       row_key, email, address, fields, state, reason, last_reply, message_id, worker
FROM recipients ORDER BY id;

DROP TABLE recipients;
ALTER TABLE recipients_new RENAME TO recipients;
ALTER SEQUENCE recipients_id_seq OWNED BY recipients.id;
ALTER TABLE recipients ADD CONSTRAINT recipients_pkey PRIMARY KEY (id) WITH (fillfactor = 100);
ALTER TABLE recipients RENAME CONSTRAINT recipients_new_state_check TO recipients_state_check;
-- A recipient's key is unique within its campaign in the database itself:
-- that no address is stored twice, and so mailed twice (SPEC §7.1), does not
-- rest on the import's lock alone.
ALTER TABLE recipients ADD CONSTRAINT recipients_campaign_id_row_key_key UNIQUE (campaign_id, row_key)
    WITH (fillfactor = 100);
-- A pending row a worker has picked (for a few seconds, while it builds
-- its message) is in it too: when nothing is due, a claim asks when the
-- rows other workers hold come free.
CREATE INDEX recipients_by_state ON recipients (campaign_id, state)
    WHERE state <> 'pending' OR worker IS NOT NULL;

-- 0: from the campaign's first row. Lowered in the same transaction as any
-- row of the campaign becomes pending again.
ALTER TABLE campaigns ADD COLUMN pending_from BIGINT NOT NULL DEFAULT 0;

-- How many rows the campaign has, written by each read of the recipients
-- file (the only writer of rows): `status` and every `send` count the
-- pending rows as those less the others, which the index by state holds,
-- instead of reading the whole table. NULL: counted when asked.
ALTER TABLE campaigns ADD COLUMN row_count BIGINT;
