//! `hikyaku report`: writes the campaign's HTML report.

use std::io::{IsTerminal as _, Write as _};
use std::path::Path;

use anyhow::{Context, Result};

use super::log::OUTCOME;
use super::{identity, output, Global};
use crate::campaign::Campaign;
use crate::error::{input_error, Exit};
use crate::report::{self, Subject};
use crate::time::now_ms;

pub async fn report(global: &Global, path: &Path, out: Option<&Path>) -> Result<Exit> {
    if out.is_none() && std::io::stdout().is_terminal() {
        return Err(input_error(
            "the report is an HTML page: give -o report.html (or redirect standard output to a file)",
        ));
    }
    let campaign = Campaign::load(path)?;
    let store = global.store().await?;
    let id = identity(&campaign);
    let record = store.find_campaign(&id).await?.ok_or_else(|| {
        input_error(format!(
            "campaign {:?} has no state in this database yet (run hikyaku send first)",
            campaign.name
        ))
    })?;
    let subject = Subject {
        campaign: campaign.name.clone(),
        campaign_id: record.id,
        rehearsal: id.delivery.is_rehearsal(),
        pause_keys: campaign.accounts.iter().map(|a| a.pause_key()).collect(),
        now_ms: now_ms(),
    };
    let html = report::render(&report::gather(&store, &subject).await?)?;
    match out {
        Some(file) => {
            std::fs::write(file, html).with_context(|| format!("writing {}", file.display()))?;
            tracing::info!(target: OUTCOME, "report written to {}", file.display());
        }
        None => output::stdout().write_all(html.as_bytes())?,
    }
    Ok(Exit::Done)
}
