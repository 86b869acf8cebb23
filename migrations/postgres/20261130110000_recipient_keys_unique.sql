-- A recipient's key is unique within its campaign in the database itself
-- again, whatever writes the rows: that no address is stored twice, and so
-- mailed twice (SPEC §7.1), does not rest on the import's lock alone. It
-- costs about 46 MB at 1,000,000 rows over the hash index it replaces.
DROP INDEX recipients_by_key;
ALTER TABLE recipients ADD CONSTRAINT recipients_campaign_id_row_key_key UNIQUE (campaign_id, row_key);
