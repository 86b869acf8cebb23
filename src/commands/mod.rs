//! The commands of SPEC §9. Each takes ready-made options from `main`,
//! talks to the user, and returns the exit status; the work itself lives in
//! the library modules.

mod check;
mod export;
mod init;
pub mod output;
mod preview;
mod progress;
mod send;
mod status;
mod suppress;

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Result;
use sha2::{Digest, Sha256};

pub use check::check;
pub use export::export;
pub use init::init;
pub use preview::{preview, PreviewTarget};
pub use send::{send, SendOptions};
pub use status::status;
pub use suppress::{suppress, SuppressAction};

use crate::campaign::Campaign;
use crate::message::Variant;
use crate::personalize::{row_place, Pipeline};
use crate::recipients::RecipientReader;
use crate::store::{self, CampaignRecord, Import, RowStatus, Store};

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
        Store::open(&store::resolve_db(self.db.as_deref())?).await
    }
}

/// A campaign file with its pipeline ready.
pub struct Loaded {
    pub campaign: Campaign,
    pub pipeline: Pipeline,
}

pub fn load(path: &Path) -> Result<Loaded> {
    let campaign = Campaign::load(path)?;
    let pipeline = Pipeline::load(&campaign)?;
    Ok(Loaded { campaign, pipeline })
}

/// What reading the recipients file found.
#[derive(Debug, Default)]
pub struct Scan {
    /// Rows whose message cannot be built: they block a send.
    pub problems: Lines,
    /// Data noise (invalid, duplicate, suppressed addresses): skipped.
    pub warnings: Lines,
    pub rows: u64,
    /// The file's header row: the names the templates see.
    pub columns: Vec<String>,
}

/// Reads the recipients file into the store (not yet committed) and builds
/// the message of every row still to be sent, so that every problem is known
/// before the first message goes out (SPEC §3).
pub async fn scan(
    loaded: &Loaded,
    store: &Store,
    record: &CampaignRecord,
    skip_invalid: bool,
) -> Result<(Import, Scan)> {
    let campaign = &loaded.campaign;
    let pipeline = &loaded.pipeline;
    let mut reader = RecipientReader::open(&campaign.recipients)?;
    let mut scan = Scan {
        columns: reader.headers().to_vec(),
        ..Scan::default()
    };
    let mut import = store.import(record, &scan.columns).await?;
    loop {
        let row = match reader.next_row() {
            Ok(Some(row)) => row,
            Ok(None) => break,
            Err(e) => {
                import.rollback().await?;
                return Err(e);
            }
        };
        scan.rows += 1;
        let at = row_place(reader.path(), &row);
        let recipient = match pipeline.recipient(&row.fields) {
            Ok(r) => r,
            Err(why) => {
                scan.warnings.push(format!("{at}: {why}; skipped"));
                let cell = pipeline.address_cell(&row.fields).trim();
                import.invalid_row(row.number, cell, &row.fields).await?;
                continue;
            }
        };
        match import
            .row(
                row.number,
                &recipient.written,
                &recipient.ascii,
                &recipient.key,
                &row.fields,
            )
            .await?
        {
            RowStatus::Settled => {}
            RowStatus::Duplicate { first_row } => scan.warnings.push(format!(
                "{at}: {} duplicates row {first_row}; skipped",
                recipient.written
            )),
            RowStatus::Suppressed => scan.warnings.push(format!(
                "{at}: {} is on the suppression list; skipped",
                recipient.written
            )),
            RowStatus::ToSend { id } => {
                let built = pipeline.message(
                    &recipient,
                    &recipient.written,
                    &row.fields,
                    Variant::default(),
                );
                if let Err(why) = built {
                    if skip_invalid {
                        scan.warnings
                            .push(format!("{at} ({}): {why}; skipped", recipient.written));
                        import.skip_invalid_message(id, &why.to_string()).await?;
                    } else {
                        scan.problems
                            .push(format!("{at} ({}): {why}", recipient.written));
                    }
                }
            }
        }
    }
    Ok((import, scan))
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

    /// Prints at most `max` lines to stderr, then how many more there were.
    pub fn print(&self, max: usize, prefix: &str) {
        for line in self.kept.iter().take(max) {
            eprintln!("{prefix}{line}");
        }
        if self.total > max {
            eprintln!(
                "{prefix}... and {} more",
                self.total - max.min(self.kept.len())
            );
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
