-- Two rules of SPEC §7 need more than one state per campaign name:
-- a rehearsal through the file transport is recorded (so that it resumes)
-- but never counts as delivered when the campaign goes out through SMTP
-- (§7.5), so each name has one state per kind of transport; and a name is
-- bound to the campaign file it was first sent from (§7.6), kept as that
-- file's canonical path. The file's application id marks the database as
-- hikyaku's, so that a foreign SQLite file is recognised before anything
-- is written to it.
--
-- SQLite cannot change a UNIQUE constraint in place: `campaigns` is
-- rebuilt. Dropping the old table must not cascade to the recipients, so
-- this runs only with foreign keys off; the guard below fails the
-- migration (and changes nothing) if they are on.
CREATE TEMP TABLE migration_guard (foreign_keys INTEGER CHECK (foreign_keys = 0));
INSERT INTO migration_guard SELECT foreign_keys FROM pragma_foreign_keys;
DROP TABLE migration_guard;

CREATE TABLE campaigns_new (
    id          INTEGER PRIMARY KEY,
    name        TEXT NOT NULL,
    -- 'smtp' for real delivery, whatever the account; 'file' for rehearsals.
    transport   TEXT NOT NULL DEFAULT 'smtp' CHECK (transport IN ('smtp', 'file')),
    -- Canonical path of the campaign file that owns the name; NULL until
    -- the next use for campaigns recorded before names were bound.
    file        TEXT,
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
    created_at  INTEGER NOT NULL,
    UNIQUE (name, transport)
);

-- A campaign whose every attempted row was written to a file by the file
-- transport was a rehearsal recorded as delivery: it becomes one, so that
-- its SMTP run sends to everyone. Anything else stays delivery.
INSERT INTO campaigns_new
    (id, name, transport, columns, import_gen, fingerprint, lock_pid, lock_host, lock_token, lock_at, created_at)
SELECT c.id, c.name,
       CASE WHEN EXISTS (SELECT 1 FROM recipients r WHERE r.campaign_id = c.id AND r.attempts > 0)
             AND NOT EXISTS (SELECT 1 FROM recipients r WHERE r.campaign_id = c.id AND r.attempts > 0
                             AND (r.last_reply IS NULL OR r.last_reply NOT LIKE '250 written to %.eml'))
            THEN 'file' ELSE 'smtp' END,
       c.columns, c.import_gen, c.fingerprint, c.lock_pid, c.lock_host, c.lock_token, c.lock_at, c.created_at
FROM campaigns c;

DROP TABLE campaigns;
ALTER TABLE campaigns_new RENAME TO campaigns;

-- 'hiky'
PRAGMA application_id = 1751739257;
