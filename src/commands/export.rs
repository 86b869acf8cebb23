//! `hikyaku export`: every row's state as CSV, so that a user can fix and
//! re-send failures, or decide about `unknown` ones.

use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};

use super::log::OUTCOME;
use super::send::rehearsal_note;
use super::{identity, output, Global};
use crate::campaign::Campaign;
use crate::error::{input_error, Exit};
use crate::store::{rfc3339, State};

pub async fn export(
    global: &Global,
    path: &Path,
    state: Option<State>,
    output: Option<&Path>,
) -> Result<Exit> {
    let campaign = Campaign::load(path)?;
    let store = global.store().await?;
    let id = identity(&campaign);
    let record = store.find_campaign(&id).await?.ok_or_else(|| {
        input_error(format!(
            "campaign {:?} has no state in this database yet (run hikyaku send first)",
            campaign.name
        ))
    })?;
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
    let mut out = csv::Writer::from_writer(sink);
    let email_column = &campaign.recipients.email_column;
    let others: Vec<usize> = (0..record.columns.len())
        .filter(|i| &record.columns[*i] != email_column)
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
    header.extend(others.iter().map(|i| record.columns[*i].as_str()));
    out.write_record(&header)?;
    store
        .export(record.id, state, |row| {
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
                others
                    .iter()
                    .map(|i| row.fields.get(*i).cloned().unwrap_or_default()),
            );
            out.write_record(&line)?;
            Ok(())
        })
        .await?;
    out.flush()?;
    Ok(Exit::Done)
}
