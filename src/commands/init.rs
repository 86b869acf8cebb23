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

/// The name in templates/campaign.toml, replaced by the folder's.
const TEMPLATE_NAME: &str = "my-first-campaign";

/// A campaign is named after its folder, so that two `init`s give two
/// campaigns (a name is one campaign's, SPEC §7.6): letters, digits, `.`,
/// `_` and `-` are kept, anything else becomes `-`.
fn campaign_name(dir: &Path) -> String {
    let folder = std::path::absolute(dir)
        .ok()
        .and_then(|d| std::fs::canonicalize(&d).ok().or(Some(d)))
        .and_then(|d| d.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_default();
    let mut name = String::new();
    for c in folder.chars() {
        let keep = c.is_alphanumeric() || matches!(c, '.' | '_' | '-');
        if keep {
            name.push(c);
        } else if !name.ends_with('-') {
            name.push('-');
        }
    }
    let name = name.trim_matches(['-', '.']);
    if name.is_empty() {
        TEMPLATE_NAME.to_string()
    } else {
        name.to_string()
    }
}

pub fn init(dir: &Path) -> Result<Exit> {
    if let Some((existing, _)) = FILES.iter().find(|(name, _)| dir.join(name).exists()) {
        return Err(input_error(format!(
            "{} already exists; init writes only into a folder without a campaign",
            dir.join(existing).display()
        )));
    }
    let name = campaign_name(dir);
    for (file, content) in FILES {
        let path = dir.join(file);
        let content = if *file == "campaign.toml" {
            content.replacen(
                &format!("name = \"{TEMPLATE_NAME}\""),
                &format!("name = \"{name}\""),
                1,
            )
        } else {
            content.to_string()
        };
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
        }
        std::fs::write(&path, content).with_context(|| format!("writing {}", path.display()))?;
    }
    let campaign = dir.join("campaign.toml");
    tracing::info!(target: OUTCOME, "wrote campaign {name:?} in {}", dir.display());
    tracing::info!(
        target: OUTCOME,
        "next: hikyaku check {0}  then  hikyaku send {0}",
        campaign.display()
    );
    Ok(Exit::Done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_name_comes_from_the_folder() {
        assert_eq!(campaign_name(Path::new("/x/spring-sale")), "spring-sale");
        assert_eq!(
            campaign_name(Path::new("/x/Spring Sale 2026!")),
            "Spring-Sale-2026"
        );
        assert_eq!(campaign_name(Path::new("/x/お知らせ")), "お知らせ");
        assert_eq!(campaign_name(Path::new("/x/\"quoted\"")), "quoted");
        assert_eq!(campaign_name(Path::new("/")), TEMPLATE_NAME);
    }
}
