//! The commands of SPEC §9. Each takes ready-made options from `main`,
//! talks to the user, and returns the exit status; the work itself lives in
//! the library modules.

mod bounces;
mod campaigns;
mod check;
mod export;
mod init;
pub mod log;
pub mod output;
mod preview;
mod progress;
mod report;
mod send;
mod status;
mod suppress;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};

pub use bounces::bounces;
pub use campaigns::{campaigns, reset};
pub use check::check;
pub use export::export;
pub use init::init;
pub use preview::{preview, PreviewTarget};
pub use report::report;
pub use send::{send, SendOptions};
pub use status::status;
pub use suppress::{suppress, SuppressAction};

use crate::campaign::{Campaign, TransportConfig};
use tokio::sync::mpsc;

use crate::personalize::{row_place, Pipeline, RowError};
use crate::recipients::{Recipient, RecipientReader, Row};
use crate::store::{
    self, CampaignRecord, Delivery, Identity, Import, ImportInto, ImportRow, RowStatus, Store,
};

/// Options every command shares.
#[derive(Debug, Clone, Default)]
pub struct Global {
    /// `--db` or `HIKYAKU_DB`.
    pub db: Option<String>,
    /// Draw a progress bar (stderr is a terminal that can show one).
    pub progress_bar: bool,
}

impl Global {
    pub async fn store(&self) -> Result<Store> {
        let db = store::resolve_db(self.db.as_deref())?;
        tracing::debug!("state database {}", db.shown());
        match db {
            store::DbLocation::Postgres { url } => Store::open_postgres(&url).await,
            store::DbLocation::Sqlite { path, default } => {
                if default {
                    if let Some(parent) = path.parent() {
                        std::fs::create_dir_all(parent).with_context(|| {
                            format!(
                                "creating the folder of the state database {}",
                                parent.display()
                            )
                        })?;
                    }
                }
                Store::open(&path).await
            }
        }
    }

    /// Names the state database in an error that came from it.
    pub fn name_database(&self, err: anyhow::Error) -> anyhow::Error {
        match store::resolve_db(self.db.as_deref()) {
            Ok(db) => store::name_in_error(&db.shown(), err),
            Err(_) => err,
        }
    }
}

/// What names the campaign's state in the store: its name, its file, and
/// whether its transport delivers or rehearses (SPEC §7.5, §7.6).
pub fn identity(campaign: &Campaign) -> Identity {
    let file = std::fs::canonicalize(&campaign.path).unwrap_or_else(|_| campaign.path.clone());
    Identity {
        name: campaign.name.clone(),
        file: file.display().to_string(),
        delivery: match campaign.transport {
            TransportConfig::Smtp(_) => Delivery::Smtp,
            TransportConfig::File { .. } => Delivery::File,
        },
    }
}

/// A campaign file with its pipeline ready.
pub struct Loaded {
    pub campaign: Campaign,
    pub pipeline: Arc<Pipeline>,
}

pub fn load(path: &Path) -> Result<Loaded> {
    let campaign = Campaign::load(path)?;
    let pipeline = Arc::new(Pipeline::load(&campaign)?);
    Ok(Loaded { campaign, pipeline })
}

/// What reading the recipients file found.
#[derive(Debug, Default)]
pub struct Scan {
    /// Rows whose message cannot be built: they block a send.
    pub problems: Problems,
    /// Data noise (invalid, duplicate, suppressed addresses): skipped.
    pub warnings: Lines,
    pub rows: u64,
    /// Rows whose message was built to check it: the ones still to send.
    pub checked: u64,
    /// The file's header row: the names the templates see.
    pub columns: Vec<String>,
}

/// What [`scan`] does with each row still to be sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rows {
    /// Builds its message; a row whose message cannot be built is a problem.
    Build,
    /// Builds it; one that cannot be built is skipped (`--skip-invalid`).
    BuildOrSkip,
    /// Only reads it: where a campaign not started yet stands.
    Read,
}

/// Rows read, written to the store and checked together.
const SCAN_BATCH: usize = 2000;

/// Rows of the file on their way through [`scan`].
struct Batch {
    rows: Vec<Row>,
    recipients: Vec<Result<Recipient, RowError>>,
    statuses: Vec<RowStatus>,
}

/// What the check of the rows found.
#[derive(Default)]
struct Checked {
    warnings: Lines,
    problems: Problems,
    checked: u64,
}

/// Reads the recipients file into the store (not yet committed) and checks
/// the message of every row still to be sent, so that every problem is
/// known before the first message goes out (SPEC §3). Three stages run at
/// once, a batch of rows apart: this task reads the file, a task writes the
/// rows to the store, and a thread checks the rows the store says are
/// still to send, so that the database and the templates share the cores.
pub async fn scan(
    loaded: &Loaded,
    store: &Store,
    into: ImportInto<'_>,
    rows: Rows,
    progress_bar: bool,
) -> Result<(Import, Scan)> {
    let campaign = &loaded.campaign;
    let pipeline = &loaded.pipeline;
    let mut reader = RecipientReader::open(&campaign.recipients)?;
    let mut scan = Scan {
        columns: reader.headers().to_vec(),
        ..Scan::default()
    };
    for note in reader.notes() {
        scan.warnings.push(note.clone());
    }
    let import = store.import(into, &scan.columns).await?;
    if import.joined() {
        tracing::info!("another worker read the recipients file: this one shares its sending");
        return Ok((import, scan));
    }
    let (to_store, orders) = mpsc::channel::<Batch>(2);
    let (to_check, mut written) = mpsc::channel::<Batch>(2);
    let (skip_tx, skips) = mpsc::unbounded_channel::<(i64, String)>();
    let writer = tokio::spawn(write_rows(import, orders, to_check, skips));
    let checker = {
        let (pipeline, file) = (pipeline.clone(), reader.path().to_path_buf());
        let mut found = Checked {
            warnings: std::mem::take(&mut scan.warnings),
            ..Checked::default()
        };
        tokio::task::spawn_blocking(move || {
            while let Some(batch) = written.blocking_recv() {
                for skip in check_batch(&pipeline, &file, &mut found, rows, &batch) {
                    // The writer is gone only after an error it reports itself.
                    let _ = skip_tx.send(skip);
                }
            }
            found
        })
    };
    let read = read_rows(pipeline, &mut reader, &mut scan, progress_bar, &to_store).await;
    drop(to_store);
    let (import, written) = writer
        .await
        .map_err(|e| anyhow::anyhow!("writing the recipients to the store failed: {e}"))?;
    let found = checker
        .await
        .map_err(|e| anyhow::anyhow!("checking the recipients failed: {e}"))?;
    if let Err(e) = read.and(written) {
        import.rollback().await?;
        return Err(e);
    }
    scan.warnings = found.warnings;
    scan.problems = found.problems;
    scan.checked = found.checked;
    if scan.rows == 0 {
        scan.warnings.push(format!(
            "{}: there are no rows under the header",
            reader.path().display()
        ));
    }
    Ok((import, scan))
}

/// The store's stage of [`scan`]: writes each batch and passes it on with
/// the rows' states; marks the rows the check skips (`--skip-invalid`).
/// Returns the import with the first error met.
async fn write_rows(
    mut import: Import,
    mut orders: mpsc::Receiver<Batch>,
    to_check: mpsc::Sender<Batch>,
    mut skips: mpsc::UnboundedReceiver<(i64, String)>,
) -> (Import, Result<()>) {
    let mut to_check = Some(to_check);
    loop {
        tokio::select! {
            biased;
            Some((id, why)) = skips.recv() => {
                if let Err(e) = import.skip_invalid_message(id, &why).await {
                    return (import, Err(e));
                }
            }
            order = orders.recv(), if to_check.is_some() => {
                let Some(mut batch) = order else {
                    // Read to the end: the check finishes what it has.
                    to_check = None;
                    continue;
                };
                let rows: Vec<ImportRow> = batch
                    .rows
                    .iter()
                    .zip(&batch.recipients)
                    .map(|(row, recipient)| ImportRow {
                        number: row.number,
                        email: match recipient {
                            Ok(r) => &r.written,
                            Err(RowError::Address { address, .. }) => address,
                            Err(_) => "",
                        },
                        valid: recipient.as_ref().ok().map(|r| (r.ascii.as_str(), r.key.as_str())),
                        fields: &row.fields,
                    })
                    .collect();
                let statuses = import.rows(&rows).await;
                drop(rows);
                match statuses {
                    Ok(statuses) => batch.statuses = statuses,
                    Err(e) => return (import, Err(e)),
                }
                if let Some(to_check) = &to_check {
                    let _ = to_check.send(batch).await;
                }
            }
            else => return (import, Ok(())),
        }
    }
}

/// The reading stage of [`scan`]: the file a batch at a time, each row's
/// address parsed, handed to the store's stage.
async fn read_rows(
    pipeline: &Pipeline,
    reader: &mut RecipientReader,
    scan: &mut Scan,
    progress_bar: bool,
    to_store: &mpsc::Sender<Batch>,
) -> Result<()> {
    let mut checking = progress::Checking::start(progress_bar, reader.path());
    loop {
        let mut read = Vec::with_capacity(SCAN_BATCH);
        while read.len() < SCAN_BATCH {
            match reader.next_row()? {
                Some(row) => read.push(row),
                None => break,
            }
        }
        if read.is_empty() {
            return Ok(());
        }
        scan.rows += read.len() as u64;
        checking.rows(scan.rows);
        let recipients = read.iter().map(|r| pipeline.recipient(&r.fields)).collect();
        let batch = Batch {
            rows: read,
            recipients,
            statuses: Vec::new(),
        };
        if to_store.send(batch).await.is_err() {
            // The store's stage stopped on an error, which it reports.
            return Ok(());
        }
    }
}

/// Warns about the rows of a batch that are data noise and checks the
/// message of each one still to send; returns the rows to skip
/// (`--skip-invalid`) with why.
fn check_batch(
    pipeline: &Pipeline,
    file: &Path,
    scan: &mut Checked,
    rows: Rows,
    batch: &Batch,
) -> Vec<(i64, String)> {
    let mut skip = Vec::new();
    let entries = batch
        .rows
        .iter()
        .zip(&batch.recipients)
        .zip(&batch.statuses);
    for ((row, recipient), status) in entries {
        let at = || row_place(file, row);
        let recipient = match recipient {
            Ok(r) => r,
            Err(why) => {
                scan.warnings.push(format!("{}: {why}; skipped", at()));
                continue;
            }
        };
        match status {
            RowStatus::Settled => {}
            RowStatus::Duplicate { first_row } => scan.warnings.push(format!(
                "{}: {} duplicates row {first_row}; skipped",
                at(),
                recipient.written
            )),
            RowStatus::Suppressed => scan.warnings.push(format!(
                "{}: {} is on the suppression list; skipped",
                at(),
                recipient.written
            )),
            RowStatus::ToSend { .. } if rows == Rows::Read => {}
            RowStatus::ToSend { id } => {
                scan.checked += 1;
                if let Err(why) = pipeline.check(recipient, &recipient.written, &row.fields) {
                    if rows == Rows::BuildOrSkip {
                        scan.warnings.push(format!(
                            "{} ({}): {why}; skipped",
                            at(),
                            recipient.written
                        ));
                        skip.push((*id, why.to_string()));
                    } else {
                        scan.problems
                            .push(format!("{} ({})", at(), recipient.written), &why);
                    }
                }
            }
        }
    }
    skip
}

/// Where a campaign not started yet would stand: the recipients file read
/// into a transaction that is rolled back, so that the store keeps no trace
/// (and no other process ever sees a row for it). `look` sees the rows (and
/// the file's columns) before the rollback.
pub async fn unstarted<T>(
    path: &Path,
    store: &Store,
    progress_bar: bool,
    look: impl AsyncFnOnce(&mut Import, &Scan) -> Result<T>,
) -> Result<T> {
    let loaded = load(path)?;
    let id = identity(&loaded.campaign);
    let (mut import, found) = scan(
        &loaded,
        store,
        ImportInto::Found(&id),
        Rows::Read,
        progress_bar,
    )
    .await?;
    let seen = look(&mut import, &found).await;
    import.rollback().await?;
    seen
}

/// What recipients receive, part by part: the `[message]` section, the
/// email column and every template and partial file (SPEC §7.5).
pub fn fingerprint(loaded: &Loaded) -> Result<BTreeMap<String, String>> {
    let hash = |bytes: &[u8]| format!("{:x}", Sha256::digest(bytes));
    let campaign = &loaded.campaign;
    let mut parts = BTreeMap::new();
    parts.insert(
        "[message]".to_string(),
        hash(serde_json::to_string(&campaign.message)?.as_bytes()),
    );
    parts.insert(
        "[recipients] email_column".to_string(),
        hash(campaign.recipients.email_column.as_bytes()),
    );
    for file in loaded.pipeline.template_files() {
        let bytes = std::fs::read(file)?;
        let shown = file
            .strip_prefix(&campaign.dir)
            .unwrap_or(file)
            .display()
            .to_string();
        parts.insert(shown, hash(&bytes));
    }
    Ok(parts)
}

/// What a complete check of the campaign's rows depends on, as one digest:
/// the recipients file's bytes (streamed, never held), how it is read,
/// what recipients receive (`parts`, the fingerprint), the server's size
/// limit and this program's version. `None` when a row's check depends on
/// more than that: attachments, whose files may change on their own.
pub fn checked_digest(loaded: &Loaded, parts: &BTreeMap<String, String>) -> Result<Option<String>> {
    use std::io::Read as _;
    let campaign = &loaded.campaign;
    if !campaign.message.attachments.is_empty() {
        return Ok(None);
    }
    let recipients = &campaign.recipients;
    let mut digest = Sha256::new();
    digest.update(
        serde_json::json!({
            "version": env!("CARGO_PKG_VERSION"),
            "parts": parts,
            "file": recipients.file.display().to_string(),
            "email_column": recipients.email_column,
            "encoding": recipients.encoding.name(),
            "delimiter": recipients.delimiter,
            "size_limit": loaded.pipeline.size_limit(),
        })
        .to_string()
        .as_bytes(),
    );
    let mut file = std::fs::File::open(&recipients.file)
        .with_context(|| format!("reading {}", recipients.file.display()))?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file
            .read(&mut buf)
            .with_context(|| format!("reading {}", recipients.file.display()))?;
        if n == 0 {
            break;
        }
        digest.update(&buf[..n]);
    }
    Ok(Some(format!("{:x}", digest.finalize())))
}

/// What changed since the campaign started sending, in words, if anything
/// did (SPEC §7.7); `parts` is the fingerprint of the campaign as it is now.
pub fn content_changed(
    record: &CampaignRecord,
    parts: &BTreeMap<String, String>,
) -> Result<Option<String>> {
    let Some(before) = &record.fingerprint else {
        return Ok(None);
    };
    let changes = fingerprint_changes(&serde_json::from_str(before)?, parts);
    if changes.is_empty() {
        return Ok(None);
    }
    Ok(Some(format!(
        "what recipients receive changed since this campaign started sending: {}. \
         Recipients already sent got the old version; send again with --force to send the new one to the rest",
        changes.join("; ")
    )))
}

/// The parts that differ between two fingerprints, in words.
pub fn fingerprint_changes(
    before: &BTreeMap<String, String>,
    now: &BTreeMap<String, String>,
) -> Vec<String> {
    let mut changes = Vec::new();
    for (part, hash) in now {
        match before.get(part) {
            None => changes.push(format!("{part} was added")),
            Some(old) if old != hash => changes.push(format!("{part} changed")),
            _ => {}
        }
    }
    for part in before.keys().filter(|p| !now.contains_key(*p)) {
        changes.push(format!("{part} was removed"));
    }
    changes
}

/// Messages about rows: the first few kept, all counted, so that a file
/// full of bad rows does not grow memory.
#[derive(Debug, Default)]
pub struct Lines {
    kept: Vec<String>,
    total: usize,
}

impl Lines {
    const KEPT: usize = 200;

    pub fn push(&mut self, line: String) {
        if self.kept.len() < Self::KEPT {
            self.kept.push(line);
        }
        self.total += 1;
    }

    pub fn len(&self) -> usize {
        self.total
    }

    pub fn is_empty(&self) -> bool {
        self.total == 0
    }

    /// Logs at most `max` lines as warnings, then how many more there were.
    pub fn warn(&self, max: usize) {
        self.log(max, |line| tracing::warn!("{line}"));
    }

    /// Logs at most `max` lines as errors, then how many more there were.
    pub fn error(&self, max: usize) {
        self.log(max, |line| tracing::error!("{line}"));
    }

    fn log(&self, max: usize, emit: impl Fn(&str)) {
        for line in self.kept.iter().take(max) {
            emit(line);
        }
        if self.total > max {
            emit(&format!(
                "... and {} more",
                self.total - max.min(self.kept.len())
            ));
        }
    }
}

/// Rows whose message cannot be built, grouped by cause: a cause many rows
/// share is said once with a count, and one that every row to send shares
/// is said once without rows, so that one defect reads as one message.
/// Memory stays flat: a few rows per cause and a bounded number of causes.
#[derive(Debug, Default)]
pub struct Problems {
    causes: Vec<Cause>,
    index: HashMap<String, usize>,
    /// Rows whose cause was not kept, there being too many causes.
    others: usize,
    total: u64,
}

#[derive(Debug)]
struct Cause {
    text: String,
    rows: Vec<String>,
    count: u64,
}

impl Problems {
    const CAUSES: usize = 200;
    const ROWS_PER_CAUSE: usize = 3;

    /// One row (`at`: where it is) that fails for `why`.
    pub fn push(&mut self, at: String, why: &RowError) {
        self.total += 1;
        let text = why.to_string();
        let i = match self.index.get(&text) {
            Some(&i) => i,
            None if self.causes.len() < Self::CAUSES => {
                self.index.insert(text.clone(), self.causes.len());
                self.causes.push(Cause {
                    text,
                    rows: Vec::new(),
                    count: 0,
                });
                self.causes.len() - 1
            }
            None => {
                self.others += 1;
                return;
            }
        };
        let cause = &mut self.causes[i];
        cause.count += 1;
        if cause.rows.len() < Self::ROWS_PER_CAUSE {
            cause.rows.push(at);
        }
    }

    pub fn len(&self) -> u64 {
        self.total
    }

    pub fn is_empty(&self) -> bool {
        self.total == 0
    }

    /// The cause of every failure when all `checked` rows fail alike.
    pub fn same_for_all(&self, checked: u64) -> Option<&str> {
        match self.causes.as_slice() {
            // One row is better shown with its row number.
            [only] if checked > 1 && only.count == checked && self.others == 0 => Some(&only.text),
            _ => None,
        }
    }

    /// The lines that describe the problems of `checked` rows, at most
    /// about `max` of them, each meant to follow `error: `.
    pub fn lines(&self, checked: u64, max: usize) -> Vec<String> {
        if let Some(text) = self.same_for_all(checked) {
            return vec![format!("{text} (the same for all {checked} rows to send)")];
        }
        let mut out = Vec::new();
        let mut shown = 0u64;
        for cause in &self.causes {
            if out.len() >= max {
                break;
            }
            for at in &cause.rows {
                out.push(format!("{at}: {}", cause.text));
            }
            let more = cause.count - cause.rows.len() as u64;
            if more > 0 {
                out.push(format!(
                    "... and {} with the same problem: {}",
                    log::plural(more, "more row"),
                    cause.text
                ));
            }
            shown += cause.count;
        }
        if self.total > shown {
            out.push(format!(
                "... and {}",
                log::plural(self.total - shown, "more row")
            ));
        }
        out
    }

    /// What to do about them, said after the lines.
    pub fn advice(&self, checked: u64) -> String {
        if self.total >= checked {
            "no row can be sent as the campaign stands; fix the problem above".to_string()
        } else {
            format!(
                "{} of {checked} rows cannot be sent; fix them, or send with --skip-invalid to skip them",
                self.total
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_messages_are_counted_but_only_the_first_are_kept() {
        let mut lines = Lines::default();
        for i in 0..500 {
            lines.push(format!("row {i}"));
        }
        assert_eq!(lines.len(), 500);
        assert_eq!(lines.kept.len(), Lines::KEPT);
        assert_eq!(lines.kept[0], "row 0");
    }

    fn header_error() -> RowError {
        RowError::Header(crate::message::HeaderError::LineBreak {
            what: "subject".into(),
        })
    }

    #[test]
    fn a_cause_of_every_row_is_said_once_without_rows() {
        let mut p = Problems::default();
        for i in 0..5000 {
            p.push(format!("row {i}"), &header_error());
        }
        let lines = p.lines(5000, 200);
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert!(lines[0].contains("all 5000 rows"), "{lines:?}");
        assert!(!p.advice(5000).contains("--skip-invalid"));
    }

    #[test]
    fn a_cause_of_some_rows_lists_a_few_and_counts_the_rest() {
        let mut p = Problems::default();
        for i in 0..10 {
            p.push(format!("row {i}"), &header_error());
        }
        let lines = p.lines(20, 200);
        assert_eq!(lines.len(), 4, "{lines:?}");
        assert!(lines[0].starts_with("row 0: subject"), "{lines:?}");
        assert!(lines[3].contains("7 more rows"), "{lines:?}");
        assert!(p.advice(20).contains("--skip-invalid"));
    }

    #[test]
    fn distinct_causes_are_bounded() {
        let mut p = Problems::default();
        for i in 0..1000 {
            let why = RowError::Header(crate::message::HeaderError::BadName {
                name: format!("h{i}"),
            });
            p.push(format!("row {i}"), &why);
        }
        assert_eq!(p.causes.len(), Problems::CAUSES);
        assert_eq!(p.len(), 1000);
        let lines = p.lines(1000, 200);
        assert!(lines.len() <= 201);
        assert_eq!(lines.last().unwrap(), "... and 800 more rows");
    }

    #[test]
    fn fingerprint_changes_name_the_part() {
        let a: BTreeMap<String, String> = [("[message]", "1"), ("t.hbs", "2")]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let mut b = a.clone();
        b.insert("t.hbs".into(), "3".into());
        b.insert("p.hbs".into(), "4".into());
        assert_eq!(
            fingerprint_changes(&a, &b),
            ["p.hbs was added", "t.hbs changed"]
        );
        assert!(fingerprint_changes(&a, &a).is_empty());
    }
}
