//! How a recipient row is written compactly, the same on every backend
//! (SPEC §12: the state database at most twice the CSV): the address as
//! written is left empty when it is its own key (lowercase), the address as
//! sent left NULL when it is the address as written, and the cells joined
//! by a separator, each one that is the address as written shortened to
//! [`SAME_AS_EMAIL`]. Rows written before keep their longer form (cells as
//! JSON); reading takes both ([`EMAIL`], [`ADDRESS`], [`decode_fields`]).

use anyhow::Result;

/// The address as written, from a stored row: an empty `email` of a
/// recipient (whose key holds an `@`, unlike the `row:N` key of a row that
/// is not one) is its key. PostgreSQL's; SQLite keeps both addresses with a
/// row's details.
pub(super) const EMAIL: &str =
    "(CASE WHEN email = '' AND row_key LIKE '%@%' THEN row_key ELSE email END)";
/// The address as sent, from a stored row: NULL is the address as written.
pub(super) const ADDRESS: &str =
    "COALESCE(address, CASE WHEN email = '' AND row_key LIKE '%@%' THEN row_key ELSE email END)";

/// Starts the compact form of the cells (JSON arrays start with `[`).
pub(super) const CELLS: char = '\u{1f}';
/// A cell that is the row's address as written.
const SAME_AS_EMAIL: &str = "\u{1e}";
/// Starts the compact form of two or more cells whose first is the row's
/// address as written, left out: the others follow joined by [`CELLS`]
/// (SQLite; two bytes a row less for the usual file, which starts with the
/// address).
pub(super) const EMAIL_FIRST: char = '\u{1e}';

/// A recipient's columns as stored: `(email, address, fields)` for its key,
/// its address as written and as sent, and its cells.
pub(super) fn recipient(
    key: &str,
    email: &str,
    address: &str,
    fields: &[String],
) -> (String, Option<String>, String) {
    (
        if email == key {
            String::new()
        } else {
            email.to_string()
        },
        (address != email).then(|| address.to_string()),
        encode_fields(fields, email),
    )
}

/// A row's cells as stored: separated by [`CELLS`], or as JSON when a cell
/// holds one of the two separators.
pub(super) fn encode_fields(fields: &[String], email: &str) -> String {
    let plain = !fields.is_empty()
        && fields
            .iter()
            .all(|f| !f.contains(CELLS) && !f.contains(SAME_AS_EMAIL));
    if !plain {
        return serde_json::to_string(fields).unwrap_or_else(|_| "[]".to_string());
    }
    let mut out = String::with_capacity(fields.iter().map(|f| f.len() + 1).sum());
    for field in fields {
        out.push(CELLS);
        out.push_str(if field == email { SAME_AS_EMAIL } else { field });
    }
    out
}

/// [`encode_fields`], in the shorter [`EMAIL_FIRST`] form where it applies.
pub(super) fn encode_fields_email_first(fields: &[String], email: &str) -> String {
    let stored = encode_fields(fields, email);
    // CELLS, SAME_AS_EMAIL, CELLS: the address first, then other cells.
    match stored.strip_prefix("\u{1f}\u{1e}\u{1f}") {
        Some(others) => format!("{EMAIL_FIRST}{others}"),
        None => stored,
    }
}

/// A row's cells from their stored form; `email` is the row's address as written.
pub(super) fn decode_fields(stored: &str, email: &str) -> Result<Vec<String>> {
    let cell = |c: &str| {
        if c == SAME_AS_EMAIL {
            email.to_string()
        } else {
            c.to_string()
        }
    };
    if let Some(others) = stored.strip_prefix(EMAIL_FIRST) {
        return Ok(std::iter::once(email.to_string())
            .chain(others.split(CELLS).map(cell))
            .collect());
    }
    match stored.strip_prefix(CELLS) {
        Some(cells) => Ok(cells.split(CELLS).map(cell).collect()),
        None => Ok(serde_json::from_str(stored)?),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cells_round_trip_in_both_forms() {
        let email = "A@x.example";
        for fields in [
            vec![email.to_string(), "Ann".into(), String::new()],
            vec!["x\u{1f}y".into(), email.into()],
            vec!["\u{1e}".into()],
            vec![email.into()],
            vec![email.into(), String::new()],
            vec![email.into(), email.into()],
            vec!["Ann".into(), email.into()],
            vec![email.into(), "[".into()],
        ] {
            let stored = encode_fields(&fields, email);
            assert_eq!(decode_fields(&stored, email).unwrap(), fields);
            let shorter = encode_fields_email_first(&fields, email);
            assert_eq!(
                decode_fields(&shorter, email).unwrap(),
                fields,
                "{shorter:?}"
            );
        }
        let usual = [email.to_string(), "Ann".into(), "Tokyo".into()];
        assert_eq!(
            encode_fields_email_first(&usual, email),
            "\u{1e}Ann\u{1f}Tokyo"
        );
        assert_eq!(
            recipient(
                "a@x.example",
                "a@x.example",
                "a@x.example",
                &["a@x.example".into()]
            ),
            (String::new(), None, "\u{1f}\u{1e}".to_string())
        );
    }
}
