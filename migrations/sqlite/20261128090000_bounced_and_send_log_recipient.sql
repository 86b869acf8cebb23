-- After the send: `hikyaku bounces` records a recipient whose message was
-- accepted and later came back as a delivery status notification (the
-- `bounced` state of SPEC §7), and `hikyaku report` counts the sends of one
-- campaign per hour and per account, which needs to know whose send each
-- entry of the account's log was.
--
-- SQLite cannot change a CHECK constraint in place: `recipients` is rebuilt
-- with the same columns and indexes. No table refers to it, so dropping
-- the old one removes nothing else.
CREATE TABLE recipients_new (
    id              INTEGER PRIMARY KEY,
    campaign_id     INTEGER NOT NULL REFERENCES campaigns (id) ON DELETE CASCADE,
    -- The lowercased address for a recipient; 'row:N' for a file row that is
    -- not one (invalid address, duplicate), re-derived at every read.
    row_key         TEXT NOT NULL,
    -- The address as written in the file (trimmed).
    email           TEXT NOT NULL,
    -- The address as sent: international domains in punycode.
    address         TEXT,
    row_number      INTEGER NOT NULL,
    -- JSON array of the row's cells, in header order.
    fields          TEXT NOT NULL,
    state           TEXT NOT NULL CHECK (state IN
                        ('pending', 'sending', 'sent', 'deferred', 'failed', 'unknown', 'skipped', 'bounced')),
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
SELECT id, campaign_id, row_key, email, address, row_number, fields, state, reason, attempts,
       last_reply, message_id, next_attempt_at, seen_gen, updated_at
FROM recipients;

DROP TABLE recipients;
ALTER TABLE recipients_new RENAME TO recipients;

CREATE INDEX recipients_by_state ON recipients (campaign_id, state, id);
CREATE INDEX recipients_by_row ON recipients (campaign_id, row_number);

-- The recipient whose SMTP transaction this entry is; NULL for entries
-- logged before this migration. Not a foreign key: the log outlives a
-- campaign's state, as the account's limits do.
ALTER TABLE send_log ADD COLUMN recipient_id INTEGER;
