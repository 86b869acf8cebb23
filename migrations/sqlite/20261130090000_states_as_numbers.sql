-- The state database of a large campaign (SPEC §12: at most twice the
-- recipients file). A state was a word in every row and again in every
-- entry of the index by state; it is now a number, `pending` 0, which
-- SQLite stores in the row's header alone. The numbers are `State`'s in the
-- store and never change:
--   0 pending, 1 sending, 2 sent, 3 deferred, 4 failed, 5 unknown,
--   6 skipped, 7 bounced.
-- The index by state no longer repeats the id: SQLite ends every index
-- entry with it, so the entries of one state are in id order already.
--
-- SQLite cannot change a column's type or CHECK in place: `recipients` is
-- rebuilt with the same columns. No table refers to it, so dropping the
-- old one removes nothing else.
CREATE TABLE recipients_new (
    id              INTEGER PRIMARY KEY,
    campaign_id     INTEGER NOT NULL REFERENCES campaigns (id) ON DELETE CASCADE,
    -- The lowercased address for a recipient; 'row:N' for a file row that is
    -- not one (invalid address, duplicate), re-derived at every read.
    row_key         TEXT NOT NULL,
    -- The address as written in the file (trimmed); '' when it is row_key.
    email           TEXT NOT NULL,
    -- The address as sent, international domains in punycode; NULL when
    -- it is the address as written.
    address         TEXT,
    row_number      INTEGER NOT NULL,
    -- The row's cells, in header order (see the store for their form).
    fields          TEXT NOT NULL,
    state           INTEGER NOT NULL CHECK (state IN (0, 1, 2, 3, 4, 5, 6, 7)),
    reason          TEXT,
    attempts        INTEGER NOT NULL DEFAULT 0,
    last_reply      TEXT,
    message_id      TEXT,
    -- Unix milliseconds before which a deferred recipient is not retried.
    next_attempt_at INTEGER,
    seen_gen        INTEGER NOT NULL,
    updated_at      INTEGER NOT NULL,
    UNIQUE (campaign_id, row_key)
);

INSERT INTO recipients_new
    (id, campaign_id, row_key, email, address, row_number, fields, state, reason, attempts,
     last_reply, message_id, next_attempt_at, seen_gen, updated_at)
SELECT id, campaign_id, row_key, email, address, row_number, fields,
       CASE state WHEN 'pending' THEN 0 WHEN 'sending' THEN 1 WHEN 'sent' THEN 2
                  WHEN 'deferred' THEN 3 WHEN 'failed' THEN 4 WHEN 'unknown' THEN 5
                  WHEN 'skipped' THEN 6 WHEN 'bounced' THEN 7 END,
       reason, attempts, last_reply, message_id, next_attempt_at, seen_gen, updated_at
FROM recipients;

DROP TABLE recipients;
ALTER TABLE recipients_new RENAME TO recipients;

CREATE INDEX recipients_by_state ON recipients (campaign_id, state);
