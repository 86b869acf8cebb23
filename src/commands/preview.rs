//! `hikyaku preview`: one recipient's message exactly as it would be sent.

use std::io::Write;
use std::path::Path;

use anyhow::Result;

use super::{load, output};
use crate::error::{input_error, Exit};
use crate::message::Variant;
use crate::personalize::row_place;
use crate::recipients::{parse_address, RecipientReader};

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
    let pipeline = &loaded.pipeline;
    let mut reader = RecipientReader::open(&campaign.recipients)?;
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
        let hit = match target {
            PreviewTarget::Row(n) => row.number == *n,
            PreviewTarget::Email(_) => {
                pipeline.recipient(&row.fields).ok().map(|r| r.key) == wanted_key
            }
        };
        if !hit {
            continue;
        }
        let (_, out) = pipeline
            .build(&row.fields, Variant::default())
            .map_err(|why| input_error(format!("{}: {why}", row_place(reader.path(), &row))))?;
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
