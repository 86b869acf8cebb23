-- The state database of a large campaign (SPEC §12: within 2 x of
-- SQLite's). A row that only a read of the recipients file wrote, and that
-- nothing changed since, stores no time of its own (NULL, eight bytes a
-- row less: 1,000,000 rows take 126 MB instead of 134); its time is the
-- read's, kept once in its campaign, as SQLite keeps it since
-- migrations/sqlite/20261130120000_import_times.sql. Rows written before
-- keep their times.
ALTER TABLE recipients ALTER COLUMN updated_at DROP NOT NULL;
ALTER TABLE campaigns ADD COLUMN imported_at BIGINT;
