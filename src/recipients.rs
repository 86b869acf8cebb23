//! Recipients (SPEC §3): the CSV file read as a stream, decoded from its
//! declared encoding, with every row's number kept for the messages about it,
//! and each address validated and put in the form it is sent in.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use anyhow::Result;
use encoding_rs::Encoding;
use encoding_rs_io::DecodeReaderBytesBuilder;

use crate::campaign::RecipientsConfig;
use crate::csv_lines::{self, line_breaks, CsvError, Fault, Fields, LineReader, OpenError};
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
    lines: LineReader,
    encoding: &'static Encoding,
    headers: Vec<String>,
    email_index: usize,
    record: csv::StringRecord,
    rows: u64,
    notes: Vec<String>,
}

impl RecipientReader {
    /// Opens the file and reads its header row. A missing or repeated email
    /// column is an input error naming the file and the columns it has.
    pub fn open(cfg: &RecipientsConfig) -> Result<RecipientReader> {
        let path = cfg.file.clone();
        let file = open_regular(&path)?;
        let utf8 = cfg.encoding == encoding_rs::UTF_8;
        let source: Box<dyn Read> = if utf8 {
            // csv reports invalid UTF-8 itself, with its record.
            Box::new(BufReader::with_capacity(64 * 1024, file))
        } else {
            Box::new(
                DecodeReaderBytesBuilder::new()
                    .encoding(Some(cfg.encoding))
                    .bom_override(true)
                    .build(BufReader::with_capacity(64 * 1024, file)),
            )
        };
        let lines = LineReader::new(source, cfg.delimiter, Fields::Same)
            .map_err(|e| file_error(&path, cfg.encoding, e))?;
        let mut reader = RecipientReader {
            path,
            lines,
            encoding: cfg.encoding,
            headers: Vec::new(),
            email_index: 0,
            record: csv::StringRecord::new(),
            rows: 0,
            notes: Vec::new(),
        };
        let line = match reader.lines.read(&mut reader.record) {
            Ok(Some(line)) => line,
            Ok(None) => {
                return Err(input_error(format!(
                    "{}: the file is empty; its first line must name the columns, one of them {:?}",
                    reader.path.display(),
                    cfg.email_column
                )))
            }
            Err(e) => return Err(reader.error(e)),
        };
        reader.undecodable_in_record(line)?;
        reader.headers = reader.record.iter().map(|h| h.trim().to_string()).collect();
        reader.email_index = reader.email_column(line, &cfg.email_column)?;
        Ok(reader)
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

    /// Warnings about the header row that do not stop a run.
    pub fn notes(&self) -> &[String] {
        &self.notes
    }

    /// The next row, or `None` at the end. A malformed line (wrong field
    /// count, broken quoting, undecodable bytes) is an input error naming it.
    pub fn next_row(&mut self) -> Result<Option<Row>> {
        let line = match self.lines.read(&mut self.record) {
            Ok(Some(line)) => line,
            Ok(None) => return Ok(None),
            Err(e) => return Err(self.error(e)),
        };
        self.undecodable_in_record(line)?;
        self.swallowed_rows(line)?;
        self.rows += 1;
        Ok(Some(Row {
            number: self.rows,
            line,
            fields: self.record.iter().map(str::to_string).collect(),
        }))
    }

    fn error(&self, err: CsvError) -> anyhow::Error {
        file_error(&self.path, self.encoding, err)
    }

    /// Finds the email column; says what to set when the header shows
    /// another name for it, or shows that the delimiter is wrong.
    fn email_column(&mut self, line: u64, email_column: &str) -> Result<usize> {
        let at = format!("{}: line {line}", self.path.display());
        let mut columns: HashMap<&str, Vec<usize>> = HashMap::new();
        for (i, h) in self.headers.iter().enumerate() {
            columns.entry(h).or_default().push(i + 1);
        }
        let mut repeated: Vec<(&str, Vec<usize>)> = columns
            .into_iter()
            .filter(|(name, at)| at.len() > 1 && !name.is_empty())
            .collect();
        repeated.sort_by_key(|(_, at)| at[0]);
        let mut notes = Vec::new();
        for (name, at_columns) in &repeated {
            let mut numbers: Vec<String> =
                at_columns.iter().take(5).map(usize::to_string).collect();
            if at_columns.len() > 5 {
                numbers.push("...".to_string());
            }
            let numbers = numbers.join(", ");
            if *name == email_column {
                return Err(input_error(format!(
                    "{at}: the email column {name:?} appears more than once (columns {numbers}); \
                     rename the ones that do not hold the addresses"
                )));
            }
            notes.push(format!(
                "{at}: the column {name:?} appears more than once (columns {numbers}); \
                 templates see only the last one"
            ));
        }
        self.notes.extend(notes);
        match self.headers.iter().position(|h| h == email_column) {
            Some(i) => Ok(i),
            None => {
                let hint = column_hint(&self.headers, email_column, self.lines.delimiter())
                    .map(|h| format!("; {h}"))
                    .unwrap_or_default();
                Err(input_error(format!(
                    "{at}: there is no column {email_column:?} for the email address (columns: {}){hint}",
                    shown_columns(&self.headers)
                )))
            }
        }
    }

    /// With a decoder, bytes it could not decode arrive as U+FFFD.
    fn undecodable_in_record(&self, line: u64) -> Result<()> {
        if self.encoding == encoding_rs::UTF_8 {
            return Ok(());
        }
        let mut at = line;
        for field in self.record.iter() {
            if let Some(pos) = field.find('\u{FFFD}') {
                at += line_breaks(&field[..pos]);
                return Err(undecodable(&self.path, at, self.encoding));
            }
            at += line_breaks(field);
        }
        Ok(())
    }

    /// A quoted value over several lines, one of which has the shape of a
    /// whole row (as many fields as the header, an address in the email
    /// column), is a quote left open that took in the rows after it.
    fn swallowed_rows(&self, line: u64) -> Result<()> {
        let delimiter = char::from(self.lines.delimiter());
        let mut open = line;
        for field in self.record.iter() {
            let breaks = line_breaks(field);
            if breaks == 0 {
                continue;
            }
            let normalized = field.replace("\r\n", "\n").replace('\r', "\n");
            let inner = normalized.split('\n').enumerate().skip(1).find(|(_, l)| {
                let cells: Vec<&str> = l.split(delimiter).collect();
                cells.len() == self.headers.len()
                    && cells
                        .get(self.email_index)
                        .is_some_and(|c| parse_address(c).is_ok())
            });
            if let Some((n, _)) = inner {
                return Err(input_error(format!(
                    "{}: line {open}: a quoted value opens here and takes in line {}, \
                     which looks like a row of its own (a quote left open?)",
                    self.path.display(),
                    open + n as u64
                )));
            }
            open += breaks;
        }
        Ok(())
    }
}

fn open_regular(path: &Path) -> Result<File> {
    csv_lines::open_regular(path).map_err(|e| match e {
        OpenError::Io(e) => input_error(format!(
            "cannot open recipients file {}: {e}",
            path.display()
        )),
        other => input_error(format!(
            "recipients file {} {other}; [recipients] file must name a CSV file",
            path.display()
        )),
    })
}

fn file_error(path: &Path, encoding: &'static Encoding, err: CsvError) -> anyhow::Error {
    match err {
        CsvError::NotUtf8 { line } => undecodable(path, line, encoding),
        CsvError::Fault {
            line,
            fault: Fault::Nul,
        } => input_error(format!(
            "{}: line {line}: {}{}",
            path.display(),
            Fault::Nul,
            encoding_hint(path, encoding)
        )),
        other => other.at(path),
    }
}

fn undecodable(path: &Path, line: u64, encoding: &'static Encoding) -> anyhow::Error {
    let hint = encoding_hint(path, encoding);
    input_error(format!(
        "{}: line {line}: bytes that are not valid {}{}",
        path.display(),
        encoding.name(),
        if hint.is_empty() {
            "; set [recipients] encoding to the file's encoding".to_string()
        } else {
            hint
        }
    ))
}

/// The longest start of the file read to guess its encoding.
const SNIFF_BYTES: u64 = 1 << 20;

/// `; the file looks like X: set encoding = "X"`, when a guess from the
/// start of the file differs from what was declared.
fn encoding_hint(path: &Path, declared: &'static Encoding) -> String {
    let mut sample = Vec::new();
    let read = File::open(path).and_then(|f| f.take(SNIFF_BYTES).read_to_end(&mut sample));
    match read.ok().and_then(|_| likely_encoding(&sample)) {
        Some(guess) if guess != declared => format!(
            "; the file looks like {0}: set encoding = \"{0}\" in [recipients]",
            guess.name()
        ),
        _ => String::new(),
    }
}

/// The encoding the bytes most likely are in: a byte-order mark, the NULs
/// of UTF-16 text without one (Excel's "Unicode text"), else chardetng's
/// guess.
fn likely_encoding(sample: &[u8]) -> Option<&'static Encoding> {
    if let Some((encoding, _)) = Encoding::for_bom(sample) {
        return Some(encoding);
    }
    let pairs = sample.len() / 2;
    if pairs > 0 {
        let nul_at = |parity: usize| {
            sample
                .iter()
                .skip(parity)
                .step_by(2)
                .filter(|&&b| b == 0)
                .count()
        };
        let (even, odd) = (nul_at(0), nul_at(1));
        if odd * 3 > pairs && even * 20 < pairs {
            return Some(encoding_rs::UTF_16LE);
        }
        if even * 3 > pairs && odd * 20 < pairs {
            return Some(encoding_rs::UTF_16BE);
        }
    }
    let mut detector = chardetng::EncodingDetector::new(chardetng::Iso2022JpDetection::Allow);
    let whole = (sample.len() as u64) < SNIFF_BYTES;
    if !detector.feed(sample, whole) {
        return None;
    }
    Some(detector.guess(None, chardetng::Utf8Detection::Allow))
}

/// Names people give the email column, compared without case, spaces or
/// punctuation.
const EMAIL_NAMES: &[&str] = &[
    "email",
    "emailaddress",
    "mail",
    "mailaddress",
    "メール",
    "メールアドレス",
    "電子メール",
];

/// What to set when the email column is not found: the delimiter when the
/// header is one column holding another delimiter (a semicolon file from
/// Excel), or `email_column` when a column is another spelling of "email".
fn column_hint(headers: &[String], email_column: &str, delimiter: u8) -> Option<String> {
    if let [only] = headers {
        let found = [
            (';', ";", "semicolons"),
            ('\t', "\\t", "tabs"),
            (',', ",", "commas"),
            ('|', "|", "bars"),
        ]
        .into_iter()
        .find(|(c, _, _)| *c != char::from(delimiter) && only.contains(*c));
        if let Some((_, setting, name)) = found {
            return Some(format!(
                "the header is one column holding {name}: set delimiter = \"{setting}\" in [recipients]"
            ));
        }
    }
    let squash = |s: &str| -> String {
        s.chars()
            .filter(|c| c.is_alphanumeric())
            .flat_map(char::to_lowercase)
            .collect()
    };
    headers
        .iter()
        .find(|h| *h != email_column && EMAIL_NAMES.contains(&squash(h).as_str()))
        .map(|h| format!("set email_column = {h:?} in [recipients]"))
}

/// The header names for a message, cut short so that a runaway header
/// does not flood the terminal.
fn shown_columns(headers: &[String]) -> String {
    const MAX_COLUMNS: usize = 20;
    const MAX_CHARS: usize = 40;
    let mut shown: Vec<String> = headers
        .iter()
        .take(MAX_COLUMNS)
        .map(|h| match h.char_indices().nth(MAX_CHARS) {
            Some((cut, _)) => format!("{}...", &h[..cut]),
            None => h.clone(),
        })
        .collect();
    if headers.len() > MAX_COLUMNS {
        shown.push(format!("... {} more", headers.len() - MAX_COLUMNS));
    }
    shown.join(", ")
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
    #[error("the domain {} is not a valid international domain", crate::error::quote(.0))]
    Idna(String),
    #[error("the domain {} is not a full domain name", crate::error::quote(.0))]
    NotFullDomain(String),
    #[error("the domain {} is an address literal, which mail is not sent to", crate::error::quote(.0))]
    Literal(String),
    #[error("the domain {} is a number, not a domain name", crate::error::quote(.0))]
    NumericDomain(String),
    #[error("the message cannot carry this address in its To header")]
    Unsendable,
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
    if domain.starts_with('[') {
        return Err(AddressError::Literal(domain));
    }
    if !domain.contains('.') || domain.starts_with('.') || domain.ends_with('.') {
        return Err(AddressError::NotFullDomain(domain));
    }
    if domain
        .rsplit('.')
        .next()
        .is_some_and(|tld| tld.bytes().all(|b| b.is_ascii_digit()))
    {
        return Err(AddressError::NumericDomain(domain));
    }
    let ascii = format!("{}@{}", address.user(), domain);
    let wire =
        lettre::Address::from_str(&ascii).map_err(|e| AddressError::Syntax(e.to_string()))?;
    if !reads_back(&wire) {
        return Err(AddressError::Unsendable);
    }
    Ok(Recipient {
        written: written.to_string(),
        key: ascii.to_lowercase(),
        ascii,
    })
}

/// lettre takes a message's envelope from its To header read back as text:
/// an address it writes but cannot read back (a domain literal, an escaped
/// quote) would leave the message with no recipient at all.
fn reads_back(address: &lettre::Address) -> bool {
    use lettre::message::header::{Headers, To};
    use lettre::message::{Mailbox, Mailboxes};
    let mut headers = Headers::new();
    headers.set(To::from(Mailboxes::from(Mailbox::new(
        None,
        address.clone(),
    ))));
    headers
        .get::<To>()
        .map(Mailboxes::from)
        .is_some_and(|m| m.iter().count() == 1)
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
            "a@[127.0.0.1]",
            "a@[IPv6:::1]",
            "\"a\\\"b\"@example.com",
            "a@123.123.123.123",
            "a@1.2",
        ] {
            assert!(parse_address(bad).is_err(), "{bad:?} accepted");
        }
        for good in [
            "\"a\"@example.com",
            "o'brien@example.com",
            "ada+news@example.com",
            "a@xn--bcher-kva.example",
        ] {
            assert!(parse_address(good).is_ok(), "{good:?} refused");
        }
    }

    #[test]
    fn crlf_rows_name_their_physical_lines() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(
            dir.path(),
            b"email,name\r\na@x.example,A\r\nb@x.example,\"B\r\nB\"\r\nc@x.example\r\n",
            "utf-8",
        );
        let mut r = RecipientReader::open(&cfg).unwrap();
        assert_eq!(r.next_row().unwrap().unwrap().line, 2);
        assert_eq!(r.next_row().unwrap().unwrap().line, 3);
        let err = r.next_row().unwrap_err().to_string();
        assert!(err.contains("line 5: 1 field where"), "{err}");
    }

    #[test]
    fn a_quoted_value_holding_a_row_is_a_quote_left_open() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(
            dir.path(),
            b"email,name\na@x.example,\"Ann\nb@x.example,Bob\nc@x.example,Cee\"\nd@x.example,D\n",
            "utf-8",
        );
        let err = read_all(&cfg).unwrap_err().to_string();
        assert!(
            err.contains("line 2: a quoted value opens here and takes in line 3"),
            "{err}"
        );
        let legit = config(
            dir.path(),
            b"email,name\na@x.example,\"12 Main St,\nSpringfield\"\n",
            "utf-8",
        );
        assert_eq!(read_all(&legit).unwrap().len(), 1);
    }

    #[test]
    fn sep_line_sets_the_delimiter() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(
            dir.path(),
            b"sep=;\r\nemail;name\r\na@x.example;A\r\n",
            "utf-8",
        );
        let rows = read_all(&cfg).unwrap();
        assert_eq!((rows[0].line, rows[0].fields[1].as_str()), (3, "A"));
    }

    #[test]
    fn a_repeated_column_is_noted_and_a_repeated_email_column_refused() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(
            dir.path(),
            b"email,name,name,,\na@x.example,A,B,,\n",
            "utf-8",
        );
        let r = RecipientReader::open(&cfg).unwrap();
        assert_eq!(r.notes().len(), 1, "{:?}", r.notes());
        assert!(r.notes()[0].contains("\"name\" appears more than once (columns 2, 3)"));
        let cfg = config(dir.path(), b"email,name,email\n", "utf-8");
        let err = RecipientReader::open(&cfg).err().unwrap().to_string();
        assert!(err.contains("columns 1, 3"), "{err}");
    }

    #[test]
    fn hints_for_the_email_column_and_the_delimiter() {
        let cols = |h: &[&str]| h.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        for (header, want) in [
            (&["E-Mail", "Name"][..], "email_column = \"E-Mail\""),
            (&["Email Address"][..], "email_column = \"Email Address\""),
            (&["email;name"][..], "delimiter = \";\""),
            (&["email\tname"][..], "delimiter = \"\\t\""),
        ] {
            let hint = column_hint(&cols(header), "email", b',').unwrap();
            assert!(hint.contains(want), "{header:?}: {hint}");
        }
        assert_eq!(column_hint(&cols(&["name", "city"]), "email", b','), None);
    }

    #[test]
    fn likely_encodings() {
        let (latin, _, _) = encoding_rs::WINDOWS_1252
            .encode("email,name\nr@x.example,Ren\u{e9}e M\u{fc}ller, Fran\u{e7}ois\n");
        assert_eq!(likely_encoding(&latin), Some(encoding_rs::WINDOWS_1252));
        let (sjis, _, _) = encoding_rs::SHIFT_JIS
            .encode("email,名前\ntaro@x.example,山田太郎\nhanako@x.example,鈴木花子\n");
        assert_eq!(likely_encoding(&sjis), Some(encoding_rs::SHIFT_JIS));
        let utf16: Vec<u8> = "email,name\na@x.example,A\n"
            .encode_utf16()
            .flat_map(u16::to_le_bytes)
            .collect();
        assert_eq!(likely_encoding(&utf16), Some(encoding_rs::UTF_16LE));
        assert_eq!(likely_encoding(b"email,name\n"), None);
    }

    #[test]
    fn a_long_header_is_cut_short_in_messages() {
        let headers: Vec<String> = (0..30).map(|i| format!("{i}{}", "x".repeat(100))).collect();
        let shown = shown_columns(&headers);
        assert!(
            shown.len() < 1200 && shown.ends_with("... 10 more"),
            "{shown}"
        );
    }
}
