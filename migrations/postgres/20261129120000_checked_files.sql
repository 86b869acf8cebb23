-- A resumed `send` reads the recipients file again only when it, or what
-- its rows are checked against, changed since the last complete check:
-- `checked` holds the digest of both (SPEC §12).
ALTER TABLE campaigns ADD COLUMN checked TEXT;
