//! `hikyaku preview`: one recipient's message exactly as it would be sent,
//! decoded for reading by default: the composed bytes are parsed back, so
//! that what is shown is what goes out, not a second rendering of it.

use std::io::Write;
use std::path::Path;

use anyhow::{anyhow, Result};
use mail_parser::{HeaderValue, MessageParser, MimeHeaders, PartType};

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

/// Prints the target row's message: decoded, or its source with `raw`;
/// `html_file` receives the HTML part.
pub fn preview(
    path: &Path,
    target: &PreviewTarget,
    raw: bool,
    html_file: Option<&Path>,
) -> Result<Exit> {
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
        let place = row_place(reader.path(), &row);
        let (_, out) = pipeline
            .build(&row.fields, Variant::default())
            .map_err(|why| input_error(format!("{place}: {why}")))?;
        if let Some(file) = html_file {
            let html = html_part(&out.bytes)?.ok_or_else(|| {
                input_error(format!("--html: {place}: the message has no HTML part"))
            })?;
            std::fs::write(file, html)
                .map_err(|e| input_error(format!("--html {}: {e}", file.display())))?;
            tracing::info!("HTML part written to {}", file.display());
        }
        if raw {
            output::stdout().write_all(&out.bytes)?;
        } else {
            output::stdout().write_all(decoded(&out.bytes)?.as_bytes())?;
        }
        return Ok(Exit::Done);
    }
    Err(input_error(match target {
        PreviewTarget::Row(n) => format!("{} has no row {n}", campaign.recipients.file.display()),
        PreviewTarget::Email(e) => {
            format!("{} has no row for {e}", campaign.recipients.file.display())
        }
    }))
}

/// Headers that describe the MIME structure, which the decoded view shows
/// as its sections instead.
const STRUCTURE: &[&str] = &["MIME-Version", "Content-Type", "Content-Transfer-Encoding"];

/// Parses a composed message back; every header but the MIME ones as
/// unstructured text, which decodes RFC 2047 words and unfolds lines.
fn parse(bytes: &[u8]) -> Result<mail_parser::Message<'_>> {
    MessageParser::new()
        .with_mime_headers()
        .default_header_text()
        .parse(bytes)
        .ok_or_else(|| anyhow!("the composed message cannot be parsed back"))
}

/// The message as a reader sees it: headers in plain text, the text part,
/// the HTML part as text, and the attachments with their sizes.
fn decoded(bytes: &[u8]) -> Result<String> {
    let message = parse(bytes)?;
    let mut out = String::new();
    for header in message.headers() {
        let name = header.name.as_str();
        if STRUCTURE.iter().any(|h| h.eq_ignore_ascii_case(name)) {
            continue;
        }
        let value = match &header.value {
            HeaderValue::Text(text) => text.to_string(),
            HeaderValue::TextList(list) => list.join(", "),
            _ => String::from_utf8_lossy(
                bytes
                    .get(header.offset_start as usize..header.offset_end as usize)
                    .unwrap_or_default(),
            )
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" "),
        };
        let value = if name.eq_ignore_ascii_case("DKIM-Signature") {
            without_signature_data(&value)
        } else {
            value
        };
        out.push_str(&format!("{name}: {value}\n"));
    }
    for part in message.text_bodies() {
        if let PartType::Text(text) = &part.body {
            section(&mut out, "text part", text);
        }
    }
    for part in message.html_bodies() {
        if let PartType::Html(html) = &part.body {
            let text = html2text::from_read(html.as_bytes(), 78)
                .map_err(|e| anyhow!("the HTML part cannot be shown as text: {e}"))?;
            section(&mut out, "HTML part, as text", &text);
        }
    }
    for part in message.attachments() {
        let name = part.attachment_name().unwrap_or("(no name)");
        let mime = part
            .content_type()
            .map(|ct| match ct.subtype() {
                Some(sub) => format!("{}/{sub}", ct.ctype()),
                None => ct.ctype().to_string(),
            })
            .unwrap_or_else(|| "application/octet-stream".to_string());
        let size = part.contents().len();
        out.push_str(&format!(
            "\n--- attachment {name} ({mime}, {size} {}) ---\n",
            if size == 1 { "byte" } else { "bytes" }
        ));
    }
    Ok(out)
}

/// A part under its title, with the message's CRLF line ends made the
/// terminal's.
fn section(out: &mut String, title: &str, body: &str) {
    out.push_str(&format!(
        "\n--- {title} ---\n{}",
        body.replace("\r\n", "\n")
    ));
    if !body.ends_with('\n') {
        out.push('\n');
    }
}

/// A DKIM-Signature's tags without its hashes (`bh=`, `b=`): the domain,
/// selector and signed headers are what a reader checks.
fn without_signature_data(value: &str) -> String {
    value
        .split(';')
        .map(str::trim)
        .filter(|tag| !tag.is_empty() && !tag.starts_with("b=") && !tag.starts_with("bh="))
        .collect::<Vec<_>>()
        .join("; ")
}

/// The HTML part as it is sent, decoded, if the message has one.
fn html_part(bytes: &[u8]) -> Result<Option<String>> {
    let message = parse(bytes)?;
    let html = message.html_bodies().find_map(|part| match &part.body {
        PartType::Html(html) => Some(html.to_string()),
        _ => None,
    });
    Ok(html)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MESSAGE: &str = "From: =?utf-8?b?6aOb6ISa?= <news@acme.example>\r\n\
        To: ada@example.com\r\n\
        Subject: =?utf-8?b?44GK55+l44KJ44Gb?=\r\n\
        DKIM-Signature: v=1; a=ed25519-sha256; d=acme.example; s=news;\r\n \
        h=from:to:subject; bh=AAAA; b=BBBB\r\n\
        MIME-Version: 1.0\r\n\
        Content-Type: multipart/alternative; boundary=\"b\"\r\n\
        \r\n\
        --b\r\n\
        Content-Type: text/plain; charset=utf-8\r\n\
        Content-Transfer-Encoding: base64\r\n\
        \r\n\
        44GT44KT44Gr44Gh44Gv\r\n\
        --b\r\n\
        Content-Type: text/html; charset=utf-8\r\n\
        \r\n\
        <p>Hello <b>Ada</b></p>\r\n\
        --b--\r\n";

    #[test]
    fn decoded_view_has_plain_headers_and_both_parts() {
        let view = decoded(MESSAGE.as_bytes()).unwrap();
        for needle in [
            "From: 飛脚 <news@acme.example>\n",
            "Subject: お知らせ\n",
            "DKIM-Signature: v=1; a=ed25519-sha256; d=acme.example; s=news; h=from:to:subject\n",
            "--- text part ---\nこんにちは\n",
            "--- HTML part, as text ---\nHello Ada\n",
        ] {
            assert!(view.contains(needle), "{needle:?} not in\n{view}");
        }
        for absent in ["=?utf-8?", "Content-Type", "MIME-Version", "BBBB"] {
            assert!(!view.contains(absent), "{absent:?} in\n{view}");
        }
    }

    #[test]
    fn the_html_part_is_extracted_decoded() {
        assert_eq!(
            html_part(MESSAGE.as_bytes()).unwrap().as_deref(),
            Some("<p>Hello <b>Ada</b></p>")
        );
        let text_only = "From: a@acme.example\r\nContent-Type: text/plain\r\n\r\nhi\r\n";
        assert_eq!(html_part(text_only.as_bytes()).unwrap(), None);
    }
}
