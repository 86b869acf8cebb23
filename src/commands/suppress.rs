//! `hikyaku suppress`: the suppression list shared by every campaign of a
//! state database. Addresses on it are skipped (`suppressed`).

use std::io::BufReader;
use std::path::PathBuf;

use anyhow::Result;

use super::log::{plural, OUTCOME};
use super::{output, Global};
use crate::csv_lines::{open_regular, Fields, LineReader};
use crate::error::{input_error, Exit};
use crate::recipients::parse_address;
use crate::time::rfc3339;

#[derive(Debug, Clone)]
pub enum SuppressAction {
    Add(Vec<String>),
    Remove(Vec<String>),
    List,
    /// A CSV file with an `email` column, or one address per line.
    Import(PathBuf),
}

pub async fn suppress(global: &Global, action: &SuppressAction) -> Result<Exit> {
    let store = global.store().await?;
    match action {
        SuppressAction::Add(addresses) => {
            // Every address is checked before the first is added: a typo
            // in the tenth leaves the list as it was, not half updated.
            let mut valid = Vec::new();
            let mut keys = std::collections::HashSet::new();
            let mut invalid = Vec::new();
            for a in addresses {
                match parse_address(a) {
                    Ok(r) if keys.insert(r.key.clone()) => valid.push(r.ascii),
                    Ok(_) => {}
                    Err(why) => invalid.push(format!("{a:?} is not a valid address: {why}")),
                }
            }
            if !invalid.is_empty() {
                return Err(input_error(format!(
                    "{}; nothing was added",
                    invalid.join("; ")
                )));
            }
            let added = store.suppress_all(&valid, "added by hand").await?;
            let already = valid.len() as u64 - added;
            let already = if already > 0 {
                format!(" ({already} already on it)")
            } else {
                String::new()
            };
            tracing::info!(
                target: OUTCOME,
                "{} added to the suppression list{already}",
                plural(added, "address")
            );
        }
        SuppressAction::Remove(addresses) => {
            let mut removed = 0;
            for a in addresses {
                let key = parse_address(a)
                    .map(|r| r.key)
                    .unwrap_or_else(|_| a.trim().to_lowercase());
                removed += usize::from(store.unsuppress(&key).await?);
            }
            tracing::info!(
                target: OUTCOME,
                "{} removed from the suppression list",
                plural(removed as u64, "address")
            );
        }
        SuppressAction::List => {
            let mut out = csv::Writer::from_writer(std::io::BufWriter::new(output::stdout()));
            out.write_record(["email", "reason", "added_at"])?;
            for (email, reason, at) in store.suppressions().await? {
                out.write_record([email, reason, rfc3339(at).unwrap_or_default()])?;
            }
            out.flush()?;
        }
        SuppressAction::Import(file) => {
            let source = open_regular(file)
                .map_err(|e| input_error(format!("cannot read {}: {e}", file.display())))?;
            let mut reader = LineReader::new(Box::new(BufReader::new(source)), b',', Fields::Any)
                .map_err(|e| e.at(file))?;
            let mut column = 0;
            let mut added = 0;
            let mut record = csv::StringRecord::new();
            let mut first = true;
            while let Some(line) = reader.read(&mut record).map_err(|e| e.at(file))? {
                if std::mem::take(&mut first) {
                    if let Some(i) = record
                        .iter()
                        .position(|f| f.trim().eq_ignore_ascii_case("email"))
                    {
                        column = i;
                        continue;
                    }
                }
                let cell = record.get(column).unwrap_or("").trim();
                if cell.is_empty() {
                    continue;
                }
                match parse_address(cell) {
                    Ok(r) => {
                        added += usize::from(
                            store
                                .suppress(&r.ascii, &format!("imported from {}", file.display()))
                                .await?,
                        )
                    }
                    Err(why) => tracing::warn!(
                        "{}: line {line}: {cell:?} is not a valid address: {why}",
                        file.display()
                    ),
                }
            }
            tracing::info!(
                target: OUTCOME,
                "{} added to the suppression list",
                plural(added as u64, "address")
            );
        }
    }
    Ok(Exit::Done)
}
