-- Large recipient files (SPEC §12: the state database within 2 x of
-- SQLite's). A recipient's key is only ever looked up by equality: a hash
-- index keeps a 4-byte code per row instead of the key itself (1,000,000
-- rows: 37 MB instead of 83 MB) and compares no text when a row is added.
-- Keys stay unique without the constraint: one read of a campaign's file
-- at a time writes its rows (an advisory lock held to its commit), and a
-- read writes each key once.
ALTER TABLE recipients DROP CONSTRAINT recipients_campaign_id_row_key_key;
CREATE INDEX recipients_by_key ON recipients USING hash (row_key);
