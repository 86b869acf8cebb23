-- The state database of a large campaign (SPEC §12). The index by state
-- held an entry for every row, though nearly all rows are `pending` (0) or
-- `sent` (2), which no query looks up by state: those are left out of it.
-- Claims find the pending rows in id order by reading the table from
-- `pending_from`, below which the campaign has no pending row, so that a
-- resumed `send` does not pass over the rows sent before it.
DROP INDEX recipients_by_state;
CREATE INDEX recipients_by_state ON recipients (campaign_id, state) WHERE state NOT IN (0, 2);

-- NULL: from the campaign's first row.
ALTER TABLE campaigns ADD COLUMN pending_from INTEGER;
