-- Large recipient files (SPEC §12). A resumed `send` reads the recipients
-- file again only when it, or what its rows are checked against, changed
-- since the last complete check: `checked` holds the digest of both, written
-- when a send's import committed with every row to send checked.
ALTER TABLE campaigns ADD COLUMN checked TEXT;

-- Rows are written compactly from now on (see the store); the file order
-- index was only used by export, which sorts its rows instead, and cost
-- about a tenth of the database.
DROP INDEX recipients_by_row;
