//! `hikyaku check`: everything `send` would refuse, found without sending.

use std::io::Write as _;
use std::path::Path;

use anyhow::Result;

use super::log::OUTCOME;
use super::{load, output, scan, Global};
use crate::error::Exit;

pub async fn check(global: &Global, path: &Path) -> Result<Exit> {
    let loaded = load(path)?;
    let store = global.store().await?;
    let record = store.campaign(&loaded.campaign.name).await?;
    let scanned = scan(&loaded, &store, &record, false).await;
    let counted = match scanned {
        Ok((mut import, found)) => {
            let counts = import.counts().await;
            import.rollback().await?;
            counts.map(|c| (c, found))
        }
        Err(e) => Err(e),
    };
    store.forget_if_empty(record.id).await?;
    let (counts, found) = counted?;
    found.warnings.warn(50);
    if loaded.campaign.message.list_unsubscribe.is_none() {
        tracing::warn!(
            "{}: [message] has no list_unsubscribe; Gmail expects bulk mail to offer one-click unsubscribe",
            path.display()
        );
    }
    if !found.problems.is_empty() {
        for line in found.problems.lines(found.checked, 200) {
            tracing::error!("{line}");
        }
        tracing::info!(target: OUTCOME, "{}", found.problems.advice(found.checked));
        return Ok(Exit::Usage);
    }
    writeln!(
        output::stdout(),
        "{}: {} rows, {} to send, {} already sent, {} skipped",
        path.display(),
        found.rows,
        counts["pending"] + counts["deferred"],
        counts["sent"],
        counts["skipped"],
    )?;
    Ok(Exit::Done)
}
