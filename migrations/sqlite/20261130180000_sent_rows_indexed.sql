-- `status` and every `send` count a campaign's rows per state. Without the
-- `sent` rows in the index by state that meant reading the whole table
-- twice per resumed `send` of a large campaign (SPEC §12: it starts within
-- 1 s); with them, only the `pending` rows are left out, which claims read
-- from the table in id order, and their number is the campaign's rows less
-- those of the index.
DROP INDEX recipients_by_state;
CREATE INDEX recipients_by_state ON recipients (campaign_id, state) WHERE state != 0;

-- How many rows the campaign has, written by each read of the recipients
-- file (the only writer of rows); NULL: counted when asked.
ALTER TABLE campaigns ADD COLUMN row_count INTEGER;
