-- The state database of a large campaign (SPEC §12: at most twice the
-- recipients file). SQLite spends a byte of every row's header on each
-- column, even a NULL one, and most of a row's columns stay empty until it
-- is sent. They move to `recipient_details`, which holds a row only for a
-- recipient that has one of them: its address as written when that is not
-- its key, its address as sent when that is not the address as written, a
-- reason, or anything of a send. A row of `recipients` keeps what every
-- row has, and its number in the file as `row_shift`: the number less the
-- row's place among its campaign's ids (`id - campaigns.row_base`), 0 for
-- the rows of a file read in order, which SQLite stores in the header alone.
--
-- SQLite cannot drop a column that a constraint names, nor change a table
-- in place: `recipients` is rebuilt. No table refers to it before this, so
-- dropping the old one removes nothing else.
ALTER TABLE campaigns ADD COLUMN row_base INTEGER;
UPDATE campaigns SET row_base = (SELECT MIN(id) - 1 FROM recipients WHERE campaign_id = campaigns.id);

CREATE TABLE recipients_new (
    id          INTEGER PRIMARY KEY,
    campaign_id INTEGER NOT NULL REFERENCES campaigns (id) ON DELETE CASCADE,
    -- The lowercased address for a recipient; 'row:N' for a file row that is
    -- not one (invalid address, duplicate), re-derived at every read.
    row_key     TEXT NOT NULL,
    -- The row's number in the file: row_shift + id - campaigns.row_base.
    row_shift   INTEGER NOT NULL,
    -- The row's cells, in header order (see the store for their form).
    fields      TEXT NOT NULL,
    state       INTEGER NOT NULL CHECK (state IN (0, 1, 2, 3, 4, 5, 6, 7)),
    seen_gen    INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL,
    UNIQUE (campaign_id, row_key)
);

INSERT INTO recipients_new (id, campaign_id, row_key, row_shift, fields, state, seen_gen, updated_at)
SELECT r.id, r.campaign_id, r.row_key, r.row_number - r.id + COALESCE(c.row_base, 0), r.fields, r.state, r.seen_gen, r.updated_at
FROM recipients r LEFT JOIN campaigns c ON c.id = r.campaign_id;

-- The address as written was stored empty when it was the key.
CREATE TEMP TABLE details_new AS
SELECT * FROM (
    SELECT id, NULLIF(written, row_key) AS email, NULLIF(COALESCE(address, written), written) AS address,
           reason, attempts, last_reply, message_id, next_attempt_at
    FROM (SELECT *, CASE WHEN email = '' AND row_key LIKE '%@%' THEN row_key ELSE email END AS written
          FROM recipients))
WHERE email IS NOT NULL OR address IS NOT NULL OR reason IS NOT NULL OR attempts != 0
   OR last_reply IS NOT NULL OR message_id IS NOT NULL OR next_attempt_at IS NOT NULL;

DROP TABLE recipients;
ALTER TABLE recipients_new RENAME TO recipients;

CREATE INDEX recipients_by_state ON recipients (campaign_id, state) WHERE state != 0;

CREATE TABLE recipient_details (
    id              INTEGER PRIMARY KEY REFERENCES recipients (id) ON DELETE CASCADE,
    -- The address as written (trimmed); NULL when it is the row's key.
    email           TEXT,
    -- The address as sent, international domains in punycode; NULL when
    -- it is the address as written.
    address         TEXT,
    reason          TEXT,
    attempts        INTEGER NOT NULL DEFAULT 0,
    last_reply      TEXT,
    message_id      TEXT,
    -- Unix milliseconds before which a deferred recipient is not retried.
    next_attempt_at INTEGER
);

INSERT INTO recipient_details (id, email, address, reason, attempts, last_reply, message_id, next_attempt_at)
SELECT id, email, address, reason, attempts, last_reply, message_id, next_attempt_at FROM details_new;

DROP TABLE details_new;
