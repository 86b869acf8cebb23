//! `hikyaku export`: every row's state as CSV, so that a user can fix and
//! re-send failures, or decide about `unknown` ones.

use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};

use super::log::OUTCOME;
use super::send::rehearsal_note;
use super::{identity, output, unstarted, Global};
use crate::campaign::Campaign;
use crate::error::Exit;
use crate::store::{ExportRow, State};
use crate::time::rfc3339;

pub async fn export(
    global: &Global,
    path: &Path,
    state: Option<State>,
    output: Option<&Path>,
) -> Result<Exit> {
    let campaign = Campaign::load(path)?;
    let store = global.store().await?;
    let id = identity(&campaign);
    let record = store.find_campaign(&id).await?;
    if id.delivery.is_rehearsal() {
        tracing::info!(
            target: OUTCOME,
            "{}: the state of a rehearsal{}",
            campaign.name,
            rehearsal_note(&campaign)
        );
    }
    let sink: Box<dyn Write> = match output {
        Some(file) => Box::new(std::io::BufWriter::new(
            std::fs::File::create(file).with_context(|| format!("creating {}", file.display()))?,
        )),
        None => Box::new(std::io::BufWriter::new(output::stdout())),
    };
    let email_column = &campaign.recipients.email_column;
    match record {
        Some(record) => {
            let mut sheet = Sheet::start(sink, &record.columns, email_column)?;
            store.export(record.id, state, |row| sheet.row(row)).await?;
            sheet.finish()?;
        }
        // Never sent: its rows as the first send would record them.
        None => {
            unstarted(path, &store, global.progress_bar, async |import, found| {
                let mut sheet = Sheet::start(sink, &found.columns, email_column)?;
                import.export(state, |row| sheet.row(row)).await?;
                sheet.finish()
            })
            .await?
        }
    }
    Ok(Exit::Done)
}

/// The CSV being written: the state columns, then the file's other columns.
struct Sheet {
    out: csv::Writer<Box<dyn Write>>,
    /// Indexes of the file's columns other than the email column.
    others: Vec<usize>,
}

impl Sheet {
    fn start(sink: Box<dyn Write>, columns: &[String], email_column: &str) -> Result<Sheet> {
        let mut out = csv::Writer::from_writer(sink);
        let others: Vec<usize> = (0..columns.len())
            .filter(|i| columns[*i] != email_column)
            .collect();
        let mut header: Vec<&str> = vec![
            "email",
            "state",
            "reason",
            "attempts",
            "last_reply",
            "updated_at",
            "message_id",
        ];
        header.extend(others.iter().map(|i| columns[*i].as_str()));
        out.write_record(&header)?;
        Ok(Sheet { out, others })
    }

    fn row(&mut self, row: ExportRow) -> Result<()> {
        let mut line = vec![
            row.email,
            row.state,
            row.reason.unwrap_or_default(),
            row.attempts.to_string(),
            row.last_reply.unwrap_or_default(),
            rfc3339(row.updated_at).unwrap_or_default(),
            row.message_id.unwrap_or_default(),
        ];
        line.extend(
            self.others
                .iter()
                .map(|i| row.fields.get(*i).cloned().unwrap_or_default()),
        );
        self.out.write_record(&line)?;
        Ok(())
    }

    fn finish(mut self) -> Result<()> {
        self.out.flush()?;
        Ok(())
    }
}
