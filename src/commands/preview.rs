//! `hikyaku preview`: one recipient's message exactly as it would be sent.

use std::io::Write;
use std::path::Path;

use anyhow::Result;

use super::{load, output};
use crate::error::{input_error, Exit};
use crate::message::Variant;
use crate::recipients::{parse_address, RecipientReader};
use crate::template::row_data;

/// Which row to show.
#[derive(Debug, Clone)]
pub enum PreviewTarget {
    /// Rows count from 1, the header line not counted.
    Row(u64),
    Email(String),
}

pub fn preview(path: &Path, target: &PreviewTarget) -> Result<Exit> {
    let loaded = load(path)?;
    let campaign = &loaded.campaign;
    let mut reader = RecipientReader::open(&campaign.recipients)?;
    let columns = reader.headers().to_vec();
    let email_index = reader.email_index();
    let wanted_key = match target {
        PreviewTarget::Email(e) => Some(
            parse_address(e)
                .map_err(|why| input_error(format!("--to {e:?} is not a valid address: {why}")))?
                .key,
        ),
        PreviewTarget::Row(0) => {
            return Err(input_error(
                "rows count from 1 (the header line is not counted)",
            ))
        }
        PreviewTarget::Row(_) => None,
    };
    while let Some(row) = reader.next_row()? {
        let cell = row
            .fields
            .get(email_index)
            .map(String::as_str)
            .unwrap_or("");
        let hit = match target {
            PreviewTarget::Row(n) => row.number == *n,
            PreviewTarget::Email(_) => parse_address(cell).ok().map(|r| r.key) == wanted_key,
        };
        if !hit {
            continue;
        }
        let at = format!(
            "{}: row {} (line {})",
            reader.path().display(),
            row.number,
            row.line
        );
        let recipient = parse_address(cell)
            .map_err(|why| input_error(format!("{at}: invalid address {cell:?}: {why}")))?;
        let data = row_data(&columns, &row.fields, &recipient.written, &campaign.name);
        let out = loaded
            .templates
            .render(&data)
            .and_then(|r| loaded.composer.build(&r, &recipient, Variant::default()))
            .map_err(|why| input_error(format!("{at}: {why}")))?;
        output::stdout().write_all(&out.bytes)?;
        return Ok(Exit::Done);
    }
    Err(input_error(match target {
        PreviewTarget::Row(n) => format!("{} has no row {n}", campaign.recipients.file.display()),
        PreviewTarget::Email(e) => {
            format!("{} has no row for {e}", campaign.recipients.file.display())
        }
    }))
}
