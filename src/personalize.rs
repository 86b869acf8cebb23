//! The personalisation pipeline — a row's address, its variables, the
//! rendered parts, the message — written once, so that what `check` and
//! `preview` accept is exactly what `send`, `--test-to` and the engine build.

use std::path::{Path, PathBuf};

use anyhow::Result;
use serde_json::{Map, Value};

use crate::campaign::Campaign;
use crate::message::{AttachmentError, ComposeError, Composer, HeaderError, Outgoing, Variant};
use crate::recipients::{parse_address, AddressError, Recipient, RecipientReader, Row};
use crate::store::Candidate;
use crate::template::{RenderError, Templates};

/// Why one row's message cannot be built, by kind, so that callers can tell
/// data noise (an address) from a campaign defect (the rest) and group the
/// causes that are the same for every row.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RowError {
    #[error("invalid address {address:?}: {why}")]
    Address { address: String, why: AddressError },
    #[error(transparent)]
    Render(#[from] RenderError),
    #[error(transparent)]
    Header(HeaderError),
    #[error(transparent)]
    Attachment(AttachmentError),
    /// What lettre refused after every part was checked.
    #[error(transparent)]
    Compose(ComposeError),
}

impl From<ComposeError> for RowError {
    fn from(e: ComposeError) -> RowError {
        match e {
            ComposeError::Header(h) => RowError::Header(h),
            ComposeError::Attachment(a) => RowError::Attachment(a),
            other => RowError::Compose(other),
        }
    }
}

/// Turns rows of one campaign's recipients file into messages.
pub struct Pipeline {
    templates: Templates,
    composer: Composer,
    campaign: String,
    /// The file's header row: the names the templates see.
    columns: Vec<String>,
    email_index: usize,
}

impl Pipeline {
    /// Compiles the campaign's templates and reads its DKIM key, for a file
    /// whose header is `columns`, the address in column `email_index`.
    pub fn new(campaign: &Campaign, columns: Vec<String>, email_index: usize) -> Result<Pipeline> {
        Ok(Pipeline {
            templates: Templates::compile(campaign)?,
            composer: Composer::new(campaign)?,
            campaign: campaign.name.clone(),
            columns,
            email_index,
        })
    }

    /// The pipeline of a campaign, for the header its recipients file has now.
    pub fn load(campaign: &Campaign) -> Result<Pipeline> {
        let reader = RecipientReader::open(&campaign.recipients)?;
        Pipeline::new(campaign, reader.headers().to_vec(), reader.email_index())
    }

    pub fn columns(&self) -> &[String] {
        &self.columns
    }

    /// Every template and partial file, for the content fingerprint.
    pub fn template_files(&self) -> &[PathBuf] {
        self.templates.files()
    }

    /// The row's address cell, as written.
    pub fn address_cell<'a>(&self, fields: &'a [String]) -> &'a str {
        fields
            .get(self.email_index)
            .map(String::as_str)
            .unwrap_or("")
    }

    /// The row's recipient: its address validated and in its wire form.
    pub fn recipient(&self, fields: &[String]) -> Result<Recipient, RowError> {
        let cell = self.address_cell(fields);
        parse_address(cell).map_err(|why| RowError::Address {
            address: cell.trim().to_string(),
            why,
        })
    }

    /// The message to `to` rendered from `fields`; `{{email}}` shows `email`.
    pub fn message(
        &self,
        to: &Recipient,
        email: &str,
        fields: &[String],
        variant: Variant<'_>,
    ) -> Result<Outgoing, RowError> {
        let rendered = self.templates.render(&self.variables(fields, email))?;
        Ok(self.composer.build(&rendered, to, variant)?)
    }

    /// A row of the file, from its cells to its message.
    pub fn build(
        &self,
        fields: &[String],
        variant: Variant<'_>,
    ) -> Result<(Recipient, Outgoing), RowError> {
        let to = self.recipient(fields)?;
        let message = self.message(&to, &to.written, fields, variant)?;
        Ok((to, message))
    }

    /// A recipient the store kept, as the engine sends it.
    pub fn build_stored(&self, candidate: &Candidate) -> Result<Outgoing, RowError> {
        let to = parse_address(&candidate.address).map_err(|why| RowError::Address {
            address: candidate.address.clone(),
            why,
        })?;
        self.message(&to, &candidate.email, &candidate.fields, Variant::default())
    }

    /// What a row's templates see: its columns, `email` and `campaign`.
    fn variables(&self, fields: &[String], email: &str) -> Map<String, Value> {
        let mut map = Map::with_capacity(self.columns.len() + 2);
        for (h, v) in self.columns.iter().zip(fields) {
            map.insert(h.clone(), Value::String(v.clone()));
        }
        map.insert("email".into(), Value::String(email.to_string()));
        map.insert("campaign".into(), Value::String(self.campaign.clone()));
        map
    }
}

/// Where a row is, for messages about it: `file: row N (line L)`.
pub fn row_place(file: &Path, row: &Row) -> String {
    format!("{}: row {} (line {})", file.display(), row.number, row.line)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pipeline(dir: &Path, message: &str) -> Pipeline {
        std::fs::write(dir.join("r.csv"), "email,name\n").unwrap();
        std::fs::write(dir.join("t.hbs"), "Hi {{name}}").unwrap();
        std::fs::write(
            dir.join("c.toml"),
            format!("name = \"c\"\n[recipients]\nfile = \"r.csv\"\n[message]\nfrom = \"a@acme.example\"\nsubject = \"s\"\ntext = \"t.hbs\"\n{message}\n[transport]\nkind = \"file\"\n"),
        )
        .unwrap();
        Pipeline::load(&Campaign::load(&dir.join("c.toml")).unwrap()).unwrap()
    }

    fn row(cells: &[&str]) -> Vec<String> {
        cells.iter().map(|c| c.to_string()).collect()
    }

    #[test]
    fn each_kind_of_row_error_is_told_apart() {
        let dir = tempfile::tempdir().unwrap();
        let p = pipeline(
            dir.path(),
            "attachments = [\"{{name}}.pdf\"]\nto_name = \"{{name}}\"",
        );
        std::fs::write(dir.path().join("ann.pdf"), b"%PDF").unwrap();
        let v = Variant::default();
        let (to, out) = p.build(&row(&["ann@example.com", "ann"]), v).unwrap();
        assert_eq!(to.ascii, "ann@example.com");
        assert!(String::from_utf8(out.bytes).unwrap().contains("Hi ann"));
        assert!(matches!(
            p.build(&row(&["not an address", "ann"]), v),
            Err(RowError::Address { .. })
        ));
        assert!(matches!(
            p.build(&row(&["bob@example.com", "bob"]), v),
            Err(RowError::Attachment(AttachmentError::Unreadable { .. }))
        ));
        assert!(matches!(
            p.build(&row(&["bob@example.com", "x\ny"]), v),
            Err(RowError::Header(HeaderError::LineBreak { .. }))
        ));
    }

    #[test]
    fn a_missing_variable_is_a_render_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let p = pipeline(dir.path(), "to_name = \"{{default last_name 'x'}}\"");
        let err = p
            .build(&row(&["ann@example.com", "ann"]), Variant::default())
            .unwrap_err();
        let RowError::Render(RenderError::MissingVariable { name, .. }) = &err else {
            panic!("{err:?}")
        };
        assert_eq!(name, "last_name");
    }
}
