-- The state database of a large campaign (SPEC §12): a row the latest
-- read of the recipients file wrote, and nothing changed since, no longer
-- stores that read's time (six bytes a row) but 0, which SQLite keeps in
-- the row's header alone. The time is kept once per campaign: `imported_at`
-- for the rows of the latest read (seen_gen = import_gen), `imported_before`
-- for those of the read before, while a new read is under way.
ALTER TABLE campaigns ADD COLUMN imported_at INTEGER;
ALTER TABLE campaigns ADD COLUMN imported_before INTEGER;
