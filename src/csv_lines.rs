//! CSV records that know the physical line they start on, whatever the line
//! ending, read under a bound on their length, with the quoting faults that
//! the csv crate accepts silently reported instead: a quote left open takes
//! in every row after it as one value, and nobody would notice.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Read};
use std::path::Path;
use std::rc::Rc;

/// The longest record read; longer is a file without line ends (or not a
/// CSV at all), which would otherwise be buffered whole.
pub const MAX_RECORD_BYTES: usize = 1 << 20;

const QUOTE: u8 = b'"';
const BOM: &[u8] = b"\xEF\xBB\xBF";

/// A fault in the file's framing, found byte by byte.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Fault {
    #[error(
        "a quote opens here and is never closed: it takes in the rest of the file as one value"
    )]
    OpenQuote,
    #[error(
        "a quote opens here and is only closed on line {closed}, taking in the lines between \
         as one value (a quote left open?)"
    )]
    QuoteSpans { closed: u64 },
    #[error(
        "a quote opens here and runs on for more than {} MiB (a quote left open?)",
        MAX_RECORD_BYTES >> 20
    )]
    QuoteTooLong,
    #[error(
        "a row longer than {} MiB: the file has no line ends here, or is not a CSV file",
        MAX_RECORD_BYTES >> 20
    )]
    TooLong,
    #[error("a NUL byte: this is not text in the declared encoding")]
    Nul,
}

/// Why a record could not be read, with the physical line it concerns.
#[derive(Debug, thiserror::Error)]
pub enum CsvError {
    #[error("line {line}: {fault}")]
    Fault { line: u64, fault: Fault },
    #[error(
        "line {line}: {found} {} where the header has {expected} \
         (unbalanced quotes or a stray delimiter?)",
        if *found == 1 { "field" } else { "fields" }
    )]
    FieldCount {
        line: u64,
        expected: u64,
        found: u64,
    },
    #[error("line {line}: bytes that are not valid UTF-8")]
    NotUtf8 { line: u64 },
    #[error("read error: {0}")]
    Io(#[source] io::Error),
}

impl CsvError {
    /// For the command line: a fault of the file is bad input (exit 2), a
    /// failing read is not.
    pub fn at(self, path: &Path) -> anyhow::Error {
        match self {
            CsvError::Io(e) => {
                anyhow::Error::new(e).context(format!("cannot read {}", path.display()))
            }
            other => crate::error::input_error(format!("{}: {other}", path.display())),
        }
    }

    /// The line the problem starts on, when it has one.
    pub fn line(&self) -> Option<u64> {
        match self {
            CsvError::Fault { line, .. }
            | CsvError::FieldCount { line, .. }
            | CsvError::NotUtf8 { line } => Some(*line),
            CsvError::Io(_) => None,
        }
    }
}

/// Why a file cannot be read as CSV at all.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("is a folder")]
    Folder,
    #[error("is not a regular file (a device or a pipe?)")]
    NotRegular,
}

/// Opens a file to read, refusing what is not a regular file: a pipe would
/// block until a writer comes, a device like /dev/zero never ends.
pub fn open_regular(path: &Path) -> Result<File, OpenError> {
    let meta = std::fs::metadata(path)?;
    if meta.is_dir() {
        return Err(OpenError::Folder);
    }
    if !meta.is_file() {
        return Err(OpenError::NotRegular);
    }
    Ok(File::open(path)?)
}

/// Whether records may differ in their number of fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fields {
    /// As many as the first record (a table with a header).
    Same,
    /// Any number (a list, one address a line).
    Any,
}

/// Reads CSV records from UTF-8 bytes. An optional UTF-8 byte-order mark
/// and Excel's `sep=X` first line are taken off before the first record.
pub struct LineReader {
    csv: csv::Reader<Tap<Box<dyn Read>>>,
    tracker: Rc<RefCell<Tracker>>,
    delimiter: u8,
}

impl LineReader {
    /// `delimiter` is used unless the file opens with a `sep=` line.
    pub fn new(
        source: Box<dyn Read>,
        delimiter: u8,
        fields: Fields,
    ) -> Result<LineReader, CsvError> {
        let (source, sep) = preamble(source).map_err(CsvError::Io)?;
        let delimiter = sep.unwrap_or(delimiter);
        let first_line = if sep.is_some() { 2 } else { 1 };
        let tracker = Rc::new(RefCell::new(Tracker::new(delimiter, first_line)));
        let csv = csv::ReaderBuilder::new()
            .delimiter(delimiter)
            .has_headers(false)
            .flexible(fields == Fields::Any)
            .from_reader(Tap {
                inner: source,
                tracker: Rc::clone(&tracker),
            });
        Ok(LineReader {
            csv,
            tracker,
            delimiter,
        })
    }

    /// The delimiter in use: the file's own `sep=` line wins.
    pub fn delimiter(&self) -> u8 {
        self.delimiter
    }

    /// The next record and the line it starts on, or `None` at the end.
    pub fn read(&mut self, record: &mut csv::StringRecord) -> Result<Option<u64>, CsvError> {
        match self.csv.read_record(record) {
            Ok(false) => Ok(None),
            Ok(true) => Ok(Some(self.record_line())),
            Err(err) => Err(self.classify(err)),
        }
    }

    fn record_line(&mut self) -> u64 {
        let mut tracker = self.tracker.borrow_mut();
        let line = tracker.line;
        tracker.starts.pop_front().unwrap_or(line)
    }

    fn classify(&mut self, err: csv::Error) -> CsvError {
        if let Some((line, fault)) = self.tracker.borrow().fault.clone() {
            return CsvError::Fault { line, fault };
        }
        match *err.kind() {
            csv::ErrorKind::UnequalLengths {
                expected_len, len, ..
            } => CsvError::FieldCount {
                line: self.record_line(),
                expected: expected_len,
                found: len,
            },
            csv::ErrorKind::Utf8 { .. } => CsvError::NotUtf8 {
                line: self.record_line(),
            },
            _ => {
                let text = err.to_string();
                match err.into_kind() {
                    csv::ErrorKind::Io(e) => CsvError::Io(e),
                    _ => CsvError::Io(io::Error::other(text)),
                }
            }
        }
    }
}

/// Takes a UTF-8 byte-order mark and a `sep=X` line off the start of the
/// stream, and gives back the rest with the delimiter that line names.
fn preamble(mut source: Box<dyn Read>) -> io::Result<(Box<dyn Read>, Option<u8>)> {
    let mut head = Vec::with_capacity(16);
    let mut chunk = [0u8; 16];
    while head.len() < 16 {
        let n = match source.read(&mut chunk[..16 - head.len()]) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        head.extend_from_slice(&chunk[..n]);
    }
    let mut start = if head.starts_with(BOM) { BOM.len() } else { 0 };
    let mut sep = None;
    let rest = &head[start..];
    if rest.len() >= 5 && rest[..4].eq_ignore_ascii_case(b"sep=") {
        let d = rest[4];
        let after = &rest[5..];
        let end = match after {
            [] => Some(0),
            [b'\r', b'\n', ..] => Some(2),
            [b'\n', ..] | [b'\r', ..] => Some(1),
            _ => None,
        };
        if let (Some(end), true) = (end, d.is_ascii() && !matches!(d, b'\r' | b'\n' | QUOTE)) {
            sep = Some(d);
            start += 5 + end;
        }
    }
    head.drain(..start);
    Ok((Box::new(io::Cursor::new(head).chain(source)), sep))
}

/// Passes bytes through to the csv reader while the tracker watches them;
/// a fault becomes a read error, so csv stops at once.
struct Tap<R> {
    inner: R,
    tracker: Rc<RefCell<Tracker>>,
}

impl<R: Read> Read for Tap<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.tracker.borrow().fault.is_some() {
            return Err(io::Error::other("malformed CSV"));
        }
        let n = self.inner.read(buf)?;
        let mut tracker = self.tracker.borrow_mut();
        let ok = if n == 0 {
            tracker.finish()
        } else {
            tracker.feed(&buf[..n])
        };
        if ok {
            Ok(n)
        } else {
            Err(io::Error::other("malformed CSV"))
        }
    }
}

/// The states of csv-core's reader (default quoting, CRLF-or-LF
/// terminator), followed in step with it so that record starts line up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    StartRecord,
    StartField,
    InField,
    InQuoted,
    QuoteInQuoted,
}

#[derive(Debug)]
struct Tracker {
    delimiter: u8,
    state: State,
    /// The physical line of the byte being read.
    line: u64,
    /// The previous byte was a CR: a line ends here unless LF follows.
    cr: bool,
    record_line: u64,
    record_bytes: usize,
    quote_line: u64,
    /// Start lines of records seen but not yet handed out by csv, which
    /// reads ahead; at most a buffer's worth.
    starts: VecDeque<u64>,
    fault: Option<(u64, Fault)>,
}

impl Tracker {
    fn new(delimiter: u8, first_line: u64) -> Tracker {
        Tracker {
            delimiter,
            state: State::StartRecord,
            line: first_line,
            cr: false,
            record_line: first_line,
            record_bytes: 0,
            quote_line: first_line,
            starts: VecDeque::new(),
            fault: None,
        }
    }

    fn fail(&mut self, line: u64, fault: Fault) -> bool {
        self.fault = Some((line, fault));
        false
    }

    /// Follows `bytes`; false once a fault is found.
    fn feed(&mut self, bytes: &[u8]) -> bool {
        for &b in bytes {
            if std::mem::take(&mut self.cr) && b != b'\n' {
                self.line += 1;
            }
            if b == 0 {
                return self.fail(self.line, Fault::Nul);
            }
            if !self.step(b) {
                return false;
            }
            match b {
                b'\n' => self.line += 1,
                b'\r' => self.cr = true,
                _ => {}
            }
        }
        true
    }

    fn finish(&mut self) -> bool {
        match self.state {
            State::InQuoted => self.fail(self.quote_line, Fault::OpenQuote),
            _ => true,
        }
    }

    fn step(&mut self, b: u8) -> bool {
        let term = b == b'\r' || b == b'\n';
        if self.state == State::StartRecord {
            if term {
                return true;
            }
            self.state = State::StartField;
            self.record_line = self.line;
            self.record_bytes = 0;
            self.starts.push_back(self.line);
        }
        self.record_bytes += 1;
        if self.record_bytes > MAX_RECORD_BYTES {
            return match self.state {
                State::InQuoted => self.fail(self.quote_line, Fault::QuoteTooLong),
                _ => self.fail(self.record_line, Fault::TooLong),
            };
        }
        self.state = match self.state {
            State::StartRecord | State::StartField => {
                if b == QUOTE {
                    self.quote_line = self.line;
                    State::InQuoted
                } else {
                    self.after_field_byte(b, term)
                }
            }
            State::InField => self.after_field_byte(b, term),
            State::InQuoted if b == QUOTE => State::QuoteInQuoted,
            State::InQuoted => State::InQuoted,
            State::QuoteInQuoted if b == QUOTE => State::InQuoted,
            State::QuoteInQuoted => {
                let next = self.after_field_byte(b, term);
                if next == State::InField && self.line > self.quote_line {
                    return self.fail(self.quote_line, Fault::QuoteSpans { closed: self.line });
                }
                next
            }
        };
        true
    }

    fn after_field_byte(&self, b: u8, term: bool) -> State {
        if b == self.delimiter {
            State::StartField
        } else if term {
            State::StartRecord
        } else {
            State::InField
        }
    }
}

/// How many line breaks `s` holds (LF, CRLF or a lone CR each count once).
pub fn line_breaks(s: &str) -> u64 {
    let b = s.as_bytes();
    let lf = b.iter().filter(|&&c| c == b'\n').count();
    let lone_cr = b
        .iter()
        .enumerate()
        .filter(|&(i, &c)| c == b'\r' && b.get(i + 1) != Some(&b'\n'))
        .count();
    (lf + lone_cr) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn records(input: &[u8]) -> Result<Vec<(u64, Vec<String>)>, CsvError> {
        let mut r = LineReader::new(
            Box::new(io::Cursor::new(input.to_vec())),
            b',',
            Fields::Same,
        )?;
        let mut record = csv::StringRecord::new();
        let mut out = Vec::new();
        while let Some(line) = r.read(&mut record)? {
            out.push((line, record.iter().map(str::to_string).collect()));
        }
        Ok(out)
    }

    fn lines(input: &[u8]) -> Vec<u64> {
        records(input).unwrap().into_iter().map(|r| r.0).collect()
    }

    fn fault(input: &[u8]) -> (u64, Fault) {
        match records(input) {
            Err(CsvError::Fault { line, fault }) => (line, fault),
            other => panic!("expected a fault, got {other:?}"),
        }
    }

    #[test]
    fn lines_are_physical_whatever_the_line_ending() {
        assert_eq!(lines(b"a,b\nc,d\ne,f\n"), [1, 2, 3]);
        assert_eq!(lines(b"a,b\r\nc,d\r\ne,f\r\n"), [1, 2, 3]);
        assert_eq!(lines(b"a,b\rc,d\re,f"), [1, 2, 3]);
        assert_eq!(
            lines(b"a,b\r\n\r\nc,d\r\n\"x\r\ny\",z\r\ne,f"),
            [1, 3, 4, 6]
        );
    }

    #[test]
    fn field_count_and_utf8_errors_name_the_physical_line() {
        match records(b"a,b\r\nc,d\r\ne\r\n") {
            Err(CsvError::FieldCount { line: 3, .. }) => {}
            other => panic!("{other:?}"),
        }
        match records(b"a,b\r\nc,d\r\ne,\xff\r\n") {
            Err(CsvError::NotUtf8 { line: 3 }) => {}
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_quote_open_at_the_end_names_its_line() {
        assert_eq!(
            fault(b"a,b\r\nc,\"d\r\ne,f\r\ng,h\r\n"),
            (2, Fault::OpenQuote)
        );
    }

    #[test]
    fn a_quote_closed_lines_later_by_another_quote_is_a_fault() {
        assert_eq!(
            fault(b"a,b\nc,\"d\ne,f\ng,\"h\"\n"),
            (2, Fault::QuoteSpans { closed: 4 })
        );
    }

    #[test]
    fn quoting_that_excel_writes_is_accepted() {
        let rows = records(b"a,b\n\"x,1\",\"two\nlines\"\n\"say \"\"hi\"\"\",\"\"\n").unwrap();
        assert_eq!(rows[1].1, ["x,1", "two\nlines"]);
        assert_eq!(rows[2].1, ["say \"hi\"", ""]);
        assert_eq!(rows[2].0, 4);
    }

    #[test]
    fn sep_line_sets_the_delimiter_and_counts_as_a_line() {
        let mut r = LineReader::new(
            Box::new(io::Cursor::new(
                b"\xEF\xBB\xBFsep=;\r\na;b\r\nc;d\r\n".to_vec(),
            )),
            b',',
            Fields::Same,
        )
        .unwrap();
        assert_eq!(r.delimiter(), b';');
        let mut record = csv::StringRecord::new();
        assert_eq!(r.read(&mut record).unwrap(), Some(2));
        assert_eq!(record.iter().collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!(r.read(&mut record).unwrap(), Some(3));
    }

    #[test]
    fn a_header_starting_with_sep_is_not_a_sep_line() {
        let rows = records(b"separator,b\n1,2\n").unwrap();
        assert_eq!(rows[0].1, ["separator", "b"]);
    }

    #[test]
    fn records_are_bounded() {
        let mut long = b"a,b\n1,".to_vec();
        long.extend(std::iter::repeat_n(b'x', MAX_RECORD_BYTES + 10));
        assert_eq!(fault(&long), (2, Fault::TooLong));
        let mut quoted = b"a,b\n1,2\n3,\"".to_vec();
        quoted.extend(std::iter::repeat_n(b'x', MAX_RECORD_BYTES + 10));
        assert_eq!(fault(&quoted), (3, Fault::QuoteTooLong));
    }

    #[test]
    fn nul_bytes_name_their_line() {
        assert_eq!(fault(b"a,b\r\nc,d\r\ne,\0\r\n"), (3, Fault::Nul));
    }

    #[test]
    fn line_breaks_count_each_ending_once() {
        assert_eq!(line_breaks("a\nb\r\nc\rd"), 3);
        assert_eq!(line_breaks("abc"), 0);
    }
}
