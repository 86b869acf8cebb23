-- Several sending accounts (SPEC §6b): an account whose login the server
-- refused is set aside and the others carry on. `status` shows it as
-- "set aside", with the server's reply, until it logs in again.
CREATE TABLE accounts_set_aside (
    -- The account's pause key: username@host:port.
    account TEXT PRIMARY KEY,
    since   INTEGER NOT NULL,
    reason  TEXT NOT NULL
);
