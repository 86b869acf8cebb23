//! The personalisation pipeline — a row's address, its variables, the
//! rendered parts, the message — written once, so that what `check` and
//! `preview` accept is exactly what `send`, `--test-to` and the engine build.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::Result;
use serde_json::{Map, Value};

use crate::bounded::MAX_MESSAGE_BYTES;
use crate::campaign::Campaign;
use crate::error::input_error;
use crate::message::{
    mailbox, AttachmentError, ComposeError, Composer, HeaderError, Outgoing, Variant,
};
use crate::recipients::{parse_address, AddressError, Recipient, RecipientReader, Row};
use crate::store::Candidate;
use crate::template::{Place, RenderError, Templates};

/// Missing variables reported per probe: enough to fix a template in one go.
const MAX_REPORTED: usize = 50;

/// Why one row's message cannot be built, by kind, so that callers can tell
/// data noise (an address) from a campaign defect (the rest) and group the
/// causes that are the same for every row.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RowError {
    #[error("invalid address {}: {why}", crate::error::quote(address))]
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
    /// The `timezone_column` cell names no time zone.
    #[error("[schedule] timezone_column {}: {} is not an IANA time zone such as \"Europe/Berlin\" (an empty cell means the campaign's timezone)", crate::error::quote(column), crate::error::quote(value))]
    TimeZone { column: String, value: String },
    /// Larger than the server takes (its EHLO SIZE).
    #[error("the message is {size} bytes, more than the {limit} bytes the server takes; make the attachments or the body smaller")]
    TooLarge { size: u64, limit: u64 },
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
    /// `[schedule] timezone_column` and where it is among `columns`.
    zone_column: Option<(String, Option<usize>)>,
    /// The largest message the server takes, when known (`u64::MAX`: not
    /// known). Set once the server answered, while the pipeline is shared.
    size_limit: AtomicU64,
}

impl Pipeline {
    /// Compiles the campaign's templates and reads its DKIM key, for a file
    /// whose header is `columns`, the address in column `email_index`.
    pub fn new(campaign: &Campaign, columns: Vec<String>, email_index: usize) -> Result<Pipeline> {
        Ok(Pipeline {
            templates: Templates::compile(campaign)?,
            composer: Composer::new(campaign)?,
            campaign: campaign.name.clone(),
            zone_column: campaign
                .timezone_column
                .as_ref()
                .map(|name| (name.clone(), columns.iter().position(|c| c == name))),
            columns,
            email_index,
            size_limit: AtomicU64::new(u64::MAX),
        })
    }

    /// Refuses messages larger than `limit` bytes from now on (SPEC §11:
    /// a row over the server's size is found before anything is sent).
    pub fn limit_size(&self, limit: Option<u64>) {
        self.size_limit
            .store(limit.unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    /// The pipeline of a campaign, for the header its recipients file has
    /// now. A problem that would fail every row the same way (a variable
    /// that is not a column, a constant `from` that is not a mailbox) is an
    /// input error here, said once, before any row is read (SPEC §4).
    pub fn load(campaign: &Campaign) -> Result<Pipeline> {
        let reader = RecipientReader::open(&campaign.recipients)?;
        let pipeline = Pipeline::new(campaign, reader.headers().to_vec(), reader.email_index())?;
        let problems = pipeline.constant_problems(campaign);
        if problems.is_empty() {
            Ok(pipeline)
        } else {
            Err(input_error(problems.join("\nerror: ")))
        }
    }

    /// What fails every row alike, in words: each variable the templates
    /// reach that the file has no column for, and a `from` without any
    /// variable that is not a mailbox.
    fn constant_problems(&self, campaign: &Campaign) -> Vec<String> {
        let file = campaign
            .recipients
            .file
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut problems = Vec::new();
        let mut named = HashSet::new();
        // With every cell filled and with every cell empty, so that both
        // sides of an `{{#if column}}` are reached.
        for (cell, email) in [("x", "a@example.com"), ("", "b@example.com")] {
            for (at, name) in self.missing_variables(cell, email) {
                if named.insert(name.clone()) {
                    problems.push(format!(
                        "{at}: {{{{{name}}}}} is not a column of {file} (its columns: {}; built-ins: email, campaign)",
                        self.columns.join(", ")
                    ));
                }
            }
        }
        if let Some((name, None)) = &self.zone_column {
            problems.push(format!(
                "[schedule] timezone_column {} is not a column of {file} (its columns: {})",
                crate::error::quote(name),
                self.columns.join(", ")
            ));
        }
        let from = &campaign.message.from;
        if !from.contains("{{") {
            if let Err(why) = mailbox("from", from) {
                problems.push(format!("{}: [message] {why}", campaign.path.display()));
            }
        }
        problems
    }

    /// Renders a row whose cells all hold `cell` until no variable is
    /// missing; each missing one is then given a value to find the next.
    fn missing_variables(&self, cell: &str, email: &str) -> Vec<(Place, String)> {
        let fields = vec![cell.to_string(); self.columns.len()];
        let mut data = self.variables(&fields, email);
        let mut missing = Vec::new();
        while missing.len() < MAX_REPORTED {
            match self.templates.render(data.clone()) {
                Err(RenderError::MissingVariable { at, name }) if !data.contains_key(&name) => {
                    data.insert(name.clone(), Value::String(cell.to_string()));
                    missing.push((at, name));
                }
                _ => break,
            }
        }
        missing
    }

    pub fn columns(&self) -> &[String] {
        &self.columns
    }

    /// Which field holds each recipient's time zone (`timezone_column`).
    pub fn zone_field(&self) -> Option<usize> {
        self.zone_column.as_ref().and_then(|(_, at)| *at)
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
        self.zone_ok(fields)?;
        let rendered = self.templates.render(self.variables(fields, email))?;
        let message = self.composer.build(&rendered, to, variant)?;
        self.within_limit(message)
    }

    /// Whether the message to `to` rendered from `fields` can be built, as
    /// [`Pipeline::message`] decides it, without building its MIME body
    /// when it is certain to be small enough (the pre-send check of every row).
    pub fn check(&self, to: &Recipient, email: &str, fields: &[String]) -> Result<(), RowError> {
        self.zone_ok(fields)?;
        let rendered = self.templates.render(self.variables(fields, email))?;
        let limit = self.size_limit().unwrap_or(u64::MAX).min(MAX_MESSAGE_BYTES);
        match self.composer.check(&rendered, to, limit)? {
            None => Ok(()),
            Some(message) => self.within_limit(message).map(drop),
        }
    }

    /// A `timezone_column` cell that names no time zone is a row error.
    fn zone_ok(&self, fields: &[String]) -> Result<(), RowError> {
        if let Some((column, Some(at))) = &self.zone_column {
            let cell = fields.get(*at).map(|f| f.trim()).unwrap_or("");
            if !cell.is_empty() && crate::schedule::SendingHours::parse_zone(cell).is_err() {
                return Err(RowError::TimeZone {
                    column: column.clone(),
                    value: cell.to_string(),
                });
            }
        }
        Ok(())
    }

    /// The largest message the server takes, when known.
    pub fn size_limit(&self) -> Option<u64> {
        match self.size_limit.load(Ordering::Relaxed) {
            u64::MAX => None,
            limit => Some(limit),
        }
    }

    fn within_limit(&self, message: Outgoing) -> Result<Outgoing, RowError> {
        let size = u64::try_from(message.bytes.len()).unwrap_or(u64::MAX);
        match self.size_limit() {
            Some(limit) if size > limit => Err(RowError::TooLarge { size, limit }),
            _ => Ok(message),
        }
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
    fn a_missing_variable_is_found_before_any_row_and_named_once() {
        let dir = tempfile::tempdir().unwrap();
        let campaign = |message: &str| {
            pipeline(dir.path(), "");
            let text = std::fs::read_to_string(dir.path().join("c.toml")).unwrap();
            let text = text.replace("[transport]", &format!("{message}\n[transport]"));
            std::fs::write(dir.path().join("c.toml"), text).unwrap();
            Campaign::load(&dir.path().join("c.toml")).unwrap()
        };
        let c = campaign(
            "to_name = \"{{default last_name 'x'}} {{last_name}} {{#if name}}{{nick}}{{/if}}\"",
        );
        let p = Pipeline::new(&c, vec!["email".into(), "name".into()], 0).unwrap();
        let err = p
            .build(&row(&["ann@example.com", "ann"]), Variant::default())
            .unwrap_err();
        let RowError::Render(RenderError::MissingVariable { name, .. }) = &err else {
            panic!("{err:?}")
        };
        assert_eq!(name, "last_name");
        let problems = p.constant_problems(&c);
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problems[0].starts_with("[message] to_name:1:1: {{last_name}} is not a column of r.csv (its columns: email, name;"), "{problems:?}");
        assert!(problems[1].contains("{{nick}}"), "{problems:?}");

        let c = campaign("to_name = \"{{#unless name}}{{nick}}{{/unless}}\"");
        let p = Pipeline::new(&c, vec!["email".into(), "name".into()], 0).unwrap();
        assert_eq!(
            p.constant_problems(&c).len(),
            1,
            "the empty side of an if is reached too"
        );
    }

    /// The pre-send check builds no MIME body for a message certain to be
    /// small enough, and accepts and refuses exactly what building does.
    #[test]
    fn check_decides_as_building_does() {
        let dir = tempfile::tempdir().unwrap();
        let p = pipeline(dir.path(), "to_name = \"{{name}}\"");
        let good = row(&["ann@example.com", "Ann"]);
        let to = p.recipient(&good).unwrap();
        p.check(&to, &to.written, &good).unwrap();
        let bad = row(&["bob@example.com", "Bob\nBcc: x@example.com"]);
        let to = p.recipient(&bad).unwrap();
        assert_eq!(
            p.check(&to, &to.written, &bad).unwrap_err(),
            p.build(&bad, Variant::default()).unwrap_err()
        );
        // Near the server's size, the message is built and measured.
        let to = p.recipient(&good).unwrap();
        let size = p.build(&good, Variant::default()).unwrap().1.bytes.len() as u64;
        p.limit_size(Some(size + 40));
        p.check(&to, &to.written, &good).unwrap();
        p.limit_size(Some(size - 40));
        assert!(matches!(
            p.check(&to, &to.written, &good),
            Err(RowError::TooLarge { .. })
        ));
    }
}
