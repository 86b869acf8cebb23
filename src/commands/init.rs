//! `hikyaku init`: a working campaign to start from, using the file
//! transport so that it runs before any account is set up.

use std::path::Path;

use anyhow::{Context, Result};

use super::log::OUTCOME;
use crate::error::{input_error, Exit};

/// The files `init` writes, from the repository's `templates/` folder.
const FILES: &[(&str, &str)] = &[
    (
        "campaign.toml",
        include_str!("../../templates/campaign.toml"),
    ),
    (
        "recipients.csv",
        include_str!("../../templates/recipients.csv"),
    ),
    (
        "templates/message.txt.hbs",
        include_str!("../../templates/message.txt.hbs"),
    ),
    (
        "templates/message.html.hbs",
        include_str!("../../templates/message.html.hbs"),
    ),
    (
        "templates/partials/footer.hbs",
        include_str!("../../templates/partials/footer.hbs"),
    ),
];

pub fn init(dir: &Path) -> Result<Exit> {
    if let Some((existing, _)) = FILES.iter().find(|(name, _)| dir.join(name).exists()) {
        return Err(input_error(format!(
            "{} already exists; init writes only into a folder without a campaign",
            dir.join(existing).display()
        )));
    }
    for (name, content) in FILES {
        let path = dir.join(name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
        }
        std::fs::write(&path, content).with_context(|| format!("writing {}", path.display()))?;
    }
    let campaign = dir.join("campaign.toml");
    tracing::info!(target: OUTCOME, "wrote a campaign in {}", dir.display());
    tracing::info!(
        target: OUTCOME,
        "next: hikyaku check {0}  then  hikyaku send {0}",
        campaign.display()
    );
    Ok(Exit::Done)
}
