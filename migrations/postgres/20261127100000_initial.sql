-- The state of every campaign on PostgreSQL, where several `hikyaku send`
-- workers on several machines share one campaign (SPEC §10). The same
-- tables as on SQLite, plus who holds what: every `sending` recipient
-- names its worker and a lease that worker renews, and `workers` lists the
-- live ones, so that a dead worker's in-flight recipients become `unknown`
-- and nobody else's do.

CREATE TABLE campaigns (
    id          BIGSERIAL PRIMARY KEY,
    name        TEXT NOT NULL,
    -- 'smtp' for real delivery, whatever the account; 'file' for rehearsals.
    transport   TEXT NOT NULL DEFAULT 'smtp' CHECK (transport IN ('smtp', 'file')),
    -- Canonical path of the campaign file that owns the name.
    file        TEXT,
    -- JSON array: the CSV header row, for export.
    columns     TEXT NOT NULL DEFAULT '[]',
    -- Incremented by every read of the recipients file; rows not seen by the
    -- latest read have left the file.
    import_gen  BIGINT NOT NULL DEFAULT 0,
    -- JSON object {part: sha256}: what recipients receive, fixed when sending starts.
    fingerprint TEXT,
    created_at  BIGINT NOT NULL,
    UNIQUE (name, transport)
);

CREATE TABLE recipients (
    id              BIGSERIAL PRIMARY KEY,
    campaign_id     BIGINT NOT NULL REFERENCES campaigns (id) ON DELETE CASCADE,
    -- The lowercased address for a recipient; 'row:N' for a file row that is
    -- not one (invalid address, duplicate), re-derived at every read.
    row_key         TEXT NOT NULL,
    email           TEXT NOT NULL,
    -- The address as sent: international domains in punycode.
    address         TEXT,
    row_number      BIGINT NOT NULL,
    -- JSON array of the row's cells, in header order.
    fields          TEXT NOT NULL,
    state           TEXT NOT NULL CHECK (state IN
                        ('pending', 'sending', 'sent', 'deferred', 'failed', 'unknown', 'skipped', 'bounced')),
    reason          TEXT,
    attempts        BIGINT NOT NULL DEFAULT 0,
    last_reply      TEXT,
    message_id      TEXT,
    -- Unix milliseconds before which a deferred recipient is not retried.
    next_attempt_at BIGINT,
    seen_gen        BIGINT NOT NULL,
    updated_at      BIGINT NOT NULL,
    -- The worker that marked the row `sending`, and until when its lease runs.
    worker          TEXT,
    lease_until     BIGINT,
    UNIQUE (campaign_id, row_key)
);

CREATE INDEX recipients_by_state ON recipients (campaign_id, state, id);
CREATE INDEX recipients_by_row ON recipients (campaign_id, row_number);

-- One entry per SMTP transaction started, written in the same transaction
-- that marks its recipient `sending`: limits never lose a send, whichever
-- worker sent it.
CREATE TABLE send_log (
    id         BIGSERIAL PRIMARY KEY,
    account    TEXT NOT NULL,
    at         BIGINT NOT NULL,
    done_at    BIGINT,
    recipients BIGINT NOT NULL,
    -- The recipient whose SMTP transaction this entry is. Not a foreign
    -- key: the log outlives a campaign's state, as the account's limits do.
    recipient_id BIGINT
);

CREATE INDEX send_log_by_account ON send_log (account, at);

CREATE TABLE account_pauses (
    account TEXT PRIMARY KEY,
    "until" BIGINT NOT NULL,
    reason  TEXT NOT NULL
);

CREATE TABLE suppressions (
    email_key  TEXT PRIMARY KEY,
    email      TEXT NOT NULL,
    reason     TEXT NOT NULL,
    created_at BIGINT NOT NULL
);

-- The workers sending a campaign now; a row whose lease has run out (or
-- whose process is known gone) is a dead worker's.
CREATE TABLE workers (
    campaign_id BIGINT NOT NULL REFERENCES campaigns (id) ON DELETE CASCADE,
    token       TEXT NOT NULL,
    host        TEXT NOT NULL,
    pid         BIGINT NOT NULL,
    lease_until BIGINT NOT NULL,
    -- Its read of the recipients file is done: others arriving join it.
    ready       BOOLEAN NOT NULL DEFAULT FALSE,
    PRIMARY KEY (campaign_id, token)
);
