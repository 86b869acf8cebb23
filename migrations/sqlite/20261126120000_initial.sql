-- The state of every campaign, so that an interrupted run resumes exactly
-- where it stopped: one row per recipient (and per file row that is not one)
-- with its delivery state, the per-account send log that limits are counted
-- from across runs and processes, account pauses decided from server
-- replies, and the suppression list shared by all campaigns.

CREATE TABLE campaigns (
    id          INTEGER PRIMARY KEY,
    name        TEXT NOT NULL UNIQUE,
    -- JSON array: the CSV header row, for export.
    columns     TEXT NOT NULL DEFAULT '[]',
    -- Incremented by every read of the recipients file; rows not seen by the
    -- latest read have left the file.
    import_gen  INTEGER NOT NULL DEFAULT 0,
    -- JSON object {part: sha256}: what recipients receive, fixed when sending starts.
    fingerprint TEXT,
    -- The one runner (SQLite): process id, host and a token of the holder.
    lock_pid    INTEGER,
    lock_host   TEXT,
    lock_token  TEXT,
    lock_at     INTEGER,
    created_at  INTEGER NOT NULL
);

CREATE TABLE recipients (
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
                        ('pending', 'sending', 'sent', 'deferred', 'failed', 'unknown', 'skipped')),
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

CREATE INDEX recipients_by_state ON recipients (campaign_id, state, id);
CREATE INDEX recipients_by_row ON recipients (campaign_id, row_number);

-- One entry per SMTP transaction started, written in the same transaction
-- that marks its recipient `sending`: limits never lose a send. `at` is when
-- the transaction started (pacing counts from it), `done_at` when it ended
-- (windows count from it, as the server counts the message in between).
CREATE TABLE send_log (
    id         INTEGER PRIMARY KEY,
    account    TEXT NOT NULL,
    at         INTEGER NOT NULL,
    done_at    INTEGER,
    recipients INTEGER NOT NULL
);

CREATE INDEX send_log_by_account ON send_log (account, at);

CREATE TABLE account_pauses (
    account TEXT PRIMARY KEY,
    until   INTEGER NOT NULL,
    reason  TEXT NOT NULL
);

CREATE TABLE suppressions (
    email_key  TEXT PRIMARY KEY,
    email      TEXT NOT NULL,
    reason     TEXT NOT NULL,
    created_at INTEGER NOT NULL
);
