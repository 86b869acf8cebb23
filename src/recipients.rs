//! Recipients (SPEC §3): the CSV file read as a stream, decoded from its
//! declared encoding, with every row's number kept for the messages about it,
//! and each address validated and put in the form it is sent in.

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use anyhow::Result;
use encoding_rs_io::DecodeReaderBytesBuilder;

use crate::campaign::RecipientsConfig;
use crate::error::input_error;

/// One data row of the file.
#[derive(Debug, Clone)]
pub struct Row {
    /// 1-based, the header line not counted (what `preview --row` takes).
    pub number: u64,
    /// The file line the row starts on, for error messages.
    pub line: u64,
    pub fields: Vec<String>,
}

/// A streaming reader over the recipients file: one record in memory at a time.
pub struct RecipientReader {
    path: PathBuf,
    reader: csv::Reader<Box<dyn Read>>,
    headers: Vec<String>,
    email_index: usize,
    record: csv::StringRecord,
    rows: u64,
    check_replacement: bool,
}

impl RecipientReader {
    /// Opens the file and reads its header row. A missing email column is an
    /// input error naming the file and the columns it has.
    pub fn open(cfg: &RecipientsConfig) -> Result<RecipientReader> {
        let path = cfg.file.clone();
        let file = File::open(&path).map_err(|e| {
            input_error(format!(
                "cannot open recipients file {}: {e}",
                path.display()
            ))
        })?;
        let utf8 = cfg.encoding == encoding_rs::UTF_8;
        let source: Box<dyn Read> = if utf8 {
            // csv strips a UTF-8 BOM itself and reports invalid UTF-8 with its line.
            Box::new(BufReader::with_capacity(64 * 1024, file))
        } else {
            Box::new(
                DecodeReaderBytesBuilder::new()
                    .encoding(Some(cfg.encoding))
                    .bom_override(true)
                    .build(BufReader::with_capacity(64 * 1024, file)),
            )
        };
        let mut reader = csv::ReaderBuilder::new()
            .delimiter(cfg.delimiter)
            .has_headers(true)
            .flexible(false)
            .from_reader(source);
        let headers: Vec<String> = reader
            .headers()
            .map_err(|e| csv_error(&path, e))?
            .iter()
            .map(|h| h.trim().to_string())
            .collect();
        if !utf8 && headers.iter().any(|h| h.contains('\u{FFFD}')) {
            return Err(undecodable(&path, 1, cfg.encoding));
        }
        let email_index = headers
            .iter()
            .position(|h| h == &cfg.email_column)
            .ok_or_else(|| {
                input_error(format!(
                    "{}: line 1: there is no column {:?} for the email address (columns: {})",
                    path.display(),
                    cfg.email_column,
                    headers.join(", ")
                ))
            })?;
        Ok(RecipientReader {
            path,
            reader,
            headers,
            email_index,
            record: csv::StringRecord::new(),
            rows: 0,
            check_replacement: !utf8,
        })
    }

    pub fn headers(&self) -> &[String] {
        &self.headers
    }

    pub fn email_index(&self) -> usize {
        self.email_index
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The next row, or `None` at the end. A malformed line (wrong field
    /// count, broken quoting, undecodable bytes) is an input error naming it.
    pub fn next_row(&mut self) -> Result<Option<Row>> {
        let more = self
            .reader
            .read_record(&mut self.record)
            .map_err(|e| csv_error(&self.path, e))?;
        if !more {
            return Ok(None);
        }
        let line = self.record.position().map(|p| p.line()).unwrap_or(0);
        if self.check_replacement && self.record.iter().any(|f| f.contains('\u{FFFD}')) {
            return Err(undecodable(&self.path, line, encoding_rs::UTF_8));
        }
        self.rows += 1;
        Ok(Some(Row {
            number: self.rows,
            line,
            fields: self.record.iter().map(str::to_string).collect(),
        }))
    }
}

fn undecodable(path: &Path, line: u64, _enc: &'static encoding_rs::Encoding) -> anyhow::Error {
    input_error(format!(
        "{}: line {line}: bytes that cannot be decoded in the declared encoding (check [recipients] encoding)",
        path.display()
    ))
}

fn csv_error(path: &Path, err: csv::Error) -> anyhow::Error {
    let line = err.position().map(|p| p.line());
    let what = match err.kind() {
        csv::ErrorKind::UnequalLengths {
            expected_len, len, ..
        } => {
            format!("{len} fields where the header has {expected_len} (unbalanced quotes or a stray delimiter?)")
        }
        csv::ErrorKind::Utf8 { .. } => {
            "bytes that are not valid UTF-8 (set [recipients] encoding)".to_string()
        }
        csv::ErrorKind::Io(e) => format!("read error: {e}"),
        _ => err.to_string(),
    };
    match line {
        Some(line) => input_error(format!("{}: line {line}: {what}", path.display())),
        None => input_error(format!("{}: {what}", path.display())),
    }
}

/// A recipient address ready to be sent to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recipient {
    /// As written in the file, trimmed.
    pub written: String,
    /// The form used on the wire: international domains in punycode.
    pub ascii: String,
    /// The identity for duplicates and suppression: `ascii`, lowercased.
    pub key: String,
}

/// Why a cell is not an address hikyaku can send to.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddressError {
    #[error("empty address")]
    Empty,
    #[error("contains spaces or control characters")]
    Whitespace,
    /// Not an RFC 5321 mailbox; the reason in lettre's words.
    #[error("{0}")]
    Syntax(String),
    #[error("the domain {0:?} is not a valid international domain")]
    Idna(String),
    #[error("the domain {0:?} is not a full domain name")]
    NotFullDomain(String),
}

/// Validates one address as an RFC 5321 mailbox with a domain that has a
/// dot, and gives its wire form and identity key.
pub fn parse_address(raw: &str) -> std::result::Result<Recipient, AddressError> {
    let written = raw.trim();
    if written.is_empty() {
        return Err(AddressError::Empty);
    }
    if written.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(AddressError::Whitespace);
    }
    let address =
        lettre::Address::from_str(written).map_err(|e| AddressError::Syntax(e.to_string()))?;
    let domain = idna::domain_to_ascii(address.domain())
        .map_err(|_| AddressError::Idna(address.domain().to_string()))?;
    if !domain.contains('.') || domain.starts_with('.') || domain.ends_with('.') {
        return Err(AddressError::NotFullDomain(domain));
    }
    let ascii = format!("{}@{}", address.user(), domain);
    lettre::Address::from_str(&ascii).map_err(|e| AddressError::Syntax(e.to_string()))?;
    Ok(Recipient {
        written: written.to_string(),
        key: ascii.to_lowercase(),
        ascii,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(dir: &Path, content: &[u8], encoding: &str) -> RecipientsConfig {
        let file = dir.join("r.csv");
        std::fs::write(&file, content).unwrap();
        RecipientsConfig {
            file,
            email_column: "email".into(),
            encoding: encoding_rs::Encoding::for_label(encoding.as_bytes()).unwrap(),
            delimiter: b',',
        }
    }

    fn read_all(cfg: &RecipientsConfig) -> Result<Vec<Row>> {
        let mut r = RecipientReader::open(cfg)?;
        let mut rows = Vec::new();
        while let Some(row) = r.next_row()? {
            rows.push(row);
        }
        Ok(rows)
    }

    #[test]
    fn bom_is_stripped_and_rows_are_numbered_from_one() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(
            dir.path(),
            b"\xEF\xBB\xBFemail,name\na@x.example,A\n\"b@x.example\",\"B\nB\"\nc@x.example,C\n",
            "utf-8",
        );
        let mut r = RecipientReader::open(&cfg).unwrap();
        assert_eq!(r.headers(), ["email", "name"]);
        let rows: Vec<Row> = std::iter::from_fn(|| r.next_row().unwrap()).collect();
        assert_eq!(rows.iter().map(|r| r.number).collect::<Vec<_>>(), [1, 2, 3]);
        assert_eq!(rows.iter().map(|r| r.line).collect::<Vec<_>>(), [2, 3, 5]);
        assert_eq!(rows[1].fields[1], "B\nB");
    }

    #[test]
    fn missing_email_column_names_the_columns() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path(), b"mail,name\n", "utf-8");
        let err = RecipientReader::open(&cfg).err().unwrap().to_string();
        assert!(
            err.contains("\"email\"") && err.contains("mail, name"),
            "{err}"
        );
    }

    #[test]
    fn wrong_field_count_names_the_line() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(
            dir.path(),
            b"email,name\na@x.example,A\nb@x.example,B,extra\n",
            "utf-8",
        );
        let err = read_all(&cfg).unwrap_err().to_string();
        assert!(err.contains("line 3"), "{err}");
    }

    #[test]
    fn invalid_utf8_names_the_line() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(
            dir.path(),
            b"email,name\na@x.example,A\nb@x.example,\xff\xfe\n",
            "utf-8",
        );
        let err = read_all(&cfg).unwrap_err().to_string();
        assert!(err.contains("line 3"), "{err}");
    }

    #[test]
    fn shift_jis_is_decoded() {
        let dir = tempfile::tempdir().unwrap();
        let (bytes, _, _) = encoding_rs::SHIFT_JIS.encode("email,名前\ntaro@x.example,山田太郎\n");
        let cfg = config(dir.path(), &bytes, "shift_jis");
        let rows = read_all(&cfg).unwrap();
        assert_eq!(rows[0].fields[1], "山田太郎");
    }

    #[test]
    fn undecodable_shift_jis_names_the_line() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(
            dir.path(),
            b"email,name\na@x.example,ok\nb@x.example,\x82\n",
            "shift_jis",
        );
        let err = read_all(&cfg).unwrap_err().to_string();
        assert!(err.contains("line 3"), "{err}");
    }

    #[test]
    fn addresses_are_trimmed_validated_and_punycoded() {
        let r = parse_address("  Bob@Example.COM ").unwrap();
        assert_eq!(
            (r.written.as_str(), r.key.as_str()),
            ("Bob@Example.COM", "bob@example.com")
        );
        let idn = parse_address("info@bücher.example").unwrap();
        assert_eq!(idn.ascii, "info@xn--bcher-kva.example");
        for bad in [
            "",
            "no-at-sign",
            "a@b",
            "a b@example.com",
            "a@exa mple.com",
            "a@@example.com",
            "a@example.com\r\nBcc: x@y.z",
        ] {
            assert!(parse_address(bad).is_err(), "{bad:?} accepted");
        }
    }
}
