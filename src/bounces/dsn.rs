//! Delivery status notifications read with mail-parser: the RFC 3464
//! `multipart/report` that Postfix, Exchange, Gmail and most servers send,
//! and the plain-text bounces of older mailers that only name the failed
//! address in `X-Failed-Recipients`.
//!
//! Only the structure is read here; which campaign and recipient a
//! notification is about is decided by the caller.

use mail_parser::{HeaderValue, Message, MessageParser, MimeHeaders, PartType};

/// What a message in the mailbox is, as far as delivery goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    /// A delivery status notification naming at least one recipient whose
    /// delivery failed or is delayed.
    Report(Report),
    /// Presents itself as a delivery report but names no recipient with a
    /// status: the reason, for a warning.
    Unreadable(String),
    /// Anything else: a person's reply, an auto-reply, a read receipt, a
    /// report of successful delivery.
    Other,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// The Message-ID of the message that came back, without angle
    /// brackets, when the notification quotes it.
    pub message_id: Option<String>,
    pub deliveries: Vec<Delivery>,
}

/// One recipient's fate in a report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// The recipient as the sender gave it (`Original-Recipient`), else as
    /// the reporting server saw it (`Final-Recipient`); lowercase.
    pub address: String,
    pub action: Action,
    /// The RFC 3463 status code, e.g. `5.1.1`.
    pub status: String,
    /// The remote server's reply (`Diagnostic-Code` without its type), or
    /// empty when the report gives none.
    pub diagnostic: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// The server gave up: the message will not arrive.
    Failed,
    /// Still being retried: a warning only.
    Delayed,
}

impl Delivery {
    /// A permanent failure (5.x.x): the address should not be mailed again.
    pub fn is_hard(&self) -> bool {
        self.action == Action::Failed && self.status.starts_with('5')
    }
}

/// Reads one raw message (RFC 5322 bytes).
pub fn read(raw: &[u8]) -> Notice {
    let Some(message) = MessageParser::default().parse(raw) else {
        return Notice::Other;
    };
    match message.content_type() {
        Some(ct) if is(ct.ctype(), ct.subtype(), "multipart", "report") => {
            match ct.attribute("report-type").map(str::to_ascii_lowercase) {
                // Read receipts (disposition-notification) and abuse reports
                // (feedback-report) say nothing about delivery.
                Some(kind) if kind != "delivery-status" && kind != "global-delivery-status" => {
                    Notice::Other
                }
                _ => read_report(&message),
            }
        }
        _ if looks_like_plain_bounce(&message) => read_plain_bounce(&message),
        _ => Notice::Other,
    }
}

/// Whether the headers alone say the message may be a notification worth
/// downloading whole: a report, or mail from a mailer daemon.
pub fn may_be_notice(headers: &[u8]) -> bool {
    let Some(message) = MessageParser::default().parse_headers(headers) else {
        return false;
    };
    let report = message
        .content_type()
        .is_some_and(|ct| is(ct.ctype(), ct.subtype(), "multipart", "report"));
    report || looks_like_plain_bounce(&message)
}

fn is(ctype: &str, subtype: Option<&str>, want: &str, want_sub: &str) -> bool {
    ctype.eq_ignore_ascii_case(want) && subtype.is_some_and(|s| s.eq_ignore_ascii_case(want_sub))
}

fn read_report(message: &Message<'_>) -> Notice {
    let status_part = message.parts.iter().find(|part| {
        part.content_type().is_some_and(|ct| {
            is(ct.ctype(), ct.subtype(), "message", "delivery-status")
                || is(
                    ct.ctype(),
                    ct.subtype(),
                    "message",
                    "global-delivery-status",
                )
        })
    });
    let Some(status_part) = status_part else {
        return Notice::Unreadable("a delivery report without a delivery-status part".into());
    };
    let text = String::from_utf8_lossy(status_part.contents());
    let mut groups = field_groups(&text).into_iter();
    let per_message = groups.next().unwrap_or_default();
    let mut deliveries = Vec::new();
    let mut named = 0;
    for group in groups {
        let recipient = field(&group, "original-recipient")
            .and_then(address_of)
            .or_else(|| field(&group, "final-recipient").and_then(address_of));
        let status = field(&group, "status").and_then(status_code);
        let (Some(address), Some(status)) = (recipient, status) else {
            continue;
        };
        named += 1;
        let action = match field(&group, "action").map(|a| a.to_ascii_lowercase()) {
            Some(a) if a.starts_with("failed") => Action::Failed,
            Some(a) if a.starts_with("delayed") => Action::Delayed,
            // delivered, relayed, expanded: good news, nothing to record.
            Some(_) => continue,
            None if status.starts_with('4') => Action::Delayed,
            None if status.starts_with('5') => Action::Failed,
            None => continue,
        };
        deliveries.push(Delivery {
            address,
            action,
            status,
            diagnostic: field(&group, "diagnostic-code")
                .map(diagnostic)
                .unwrap_or_default(),
        });
    }
    if named == 0 {
        return Notice::Unreadable(
            "its delivery-status part names no recipient with a status".into(),
        );
    }
    if deliveries.is_empty() {
        return Notice::Other;
    }
    let message_id = returned_message_id(message)
        .or_else(|| field(&per_message, "x-original-message-id").map(bare_id))
        .or_else(|| replied_to(message));
    Notice::Report(Report {
        message_id,
        deliveries,
    })
}

/// A bounce without a delivery-status part: from a mailer daemon or with
/// `X-Failed-Recipients` (Exim, old Gmail), and not an auto-reply.
fn looks_like_plain_bounce(message: &Message<'_>) -> bool {
    if message.header("X-Failed-Recipients").is_some() {
        return true;
    }
    let daemon = message
        .from()
        .and_then(|from| from.first())
        .and_then(|addr| addr.address())
        .and_then(|addr| addr.split('@').next())
        .is_some_and(|local| {
            local.eq_ignore_ascii_case("mailer-daemon") || local.eq_ignore_ascii_case("postmaster")
        });
    let auto_reply = message
        .header("Auto-Submitted")
        .and_then(HeaderValue::as_text)
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("auto-replied"));
    daemon && !auto_reply
}

fn read_plain_bounce(message: &Message<'_>) -> Notice {
    let failed: Vec<String> = message
        .header_values("X-Failed-Recipients")
        .filter_map(HeaderValue::as_text)
        .flat_map(|v| v.split(','))
        .filter_map(|a| address_of(a.trim()))
        .collect();
    if failed.is_empty() {
        return Notice::Unreadable(
            "a message from a mailer daemon that names no failed recipient".into(),
        );
    }
    let body: String = message
        .text_bodies()
        .filter_map(|part| part.text_contents())
        .collect::<Vec<_>>()
        .join("\n");
    // The first reply in the text that carries an enhanced code is the
    // remote server's; without one the failure is permanent but unspecified.
    let (status, diagnostic) = body
        .lines()
        .find_map(|line| {
            let line = line.trim();
            let mut words = line.split_whitespace();
            let code = words.next()?;
            let enhanced = words.next().and_then(status_code)?;
            (code.len() == 3
                && code.starts_with(['4', '5'])
                && code.bytes().all(|b| b.is_ascii_digit()))
            .then(|| (enhanced, line.to_string()))
        })
        .unwrap_or_else(|| ("5.0.0".to_string(), String::new()));
    let action = if status.starts_with('4') {
        Action::Delayed
    } else {
        Action::Failed
    };
    Notice::Report(Report {
        message_id: returned_message_id(message).or_else(|| replied_to(message)),
        deliveries: failed
            .into_iter()
            .map(|address| Delivery {
                address,
                action,
                status: status.clone(),
                diagnostic: diagnostic.clone(),
            })
            .collect(),
    })
}

/// The Message-ID of the returned message or of its returned headers.
fn returned_message_id(message: &Message<'_>) -> Option<String> {
    message.parts.iter().find_map(|part| match &part.body {
        PartType::Message(inner) => inner.message_id().map(bare_id),
        _ if part
            .content_type()
            .is_some_and(|ct| is(ct.ctype(), ct.subtype(), "text", "rfc822-headers")) =>
        {
            MessageParser::default()
                .parse_headers(part.contents())
                .and_then(|headers| headers.message_id().map(bare_id))
        }
        _ => None,
    })
}

/// The message the notification answers, as Gmail and Exchange name it.
fn replied_to(message: &Message<'_>) -> Option<String> {
    match message.in_reply_to() {
        HeaderValue::Text(id) => Some(bare_id(id)),
        HeaderValue::TextList(ids) => ids.first().map(|id| bare_id(id)),
        _ => None,
    }
}

fn bare_id(id: &str) -> String {
    id.trim()
        .trim_start_matches('<')
        .trim_end_matches('>')
        .trim()
        .to_string()
}

/// The blocks of `Name: value` fields of a delivery-status body, separated
/// by blank lines, with folded lines joined and names lowercased.
fn field_groups(text: &str) -> Vec<Vec<(String, String)>> {
    let mut groups = Vec::new();
    let mut group: Vec<(String, String)> = Vec::new();
    for line in text.lines() {
        if line.trim().is_empty() {
            if !group.is_empty() {
                groups.push(std::mem::take(&mut group));
            }
            continue;
        }
        if line.starts_with([' ', '\t']) {
            if let Some((_, value)) = group.last_mut() {
                value.push(' ');
                value.push_str(line.trim());
            }
            continue;
        }
        if let Some((name, value)) = line.split_once(':') {
            group.push((name.trim().to_ascii_lowercase(), value.trim().to_string()));
        }
    }
    if !group.is_empty() {
        groups.push(group);
    }
    groups
}

fn field<'a>(group: &'a [(String, String)], name: &str) -> Option<&'a str> {
    group
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}

/// `rfc822; <User@Example.com>` → `user@example.com`.
fn address_of(value: &str) -> Option<String> {
    let address = value.rsplit_once(';').map_or(value, |(_, a)| a);
    let address = address.trim().trim_start_matches('<').trim_end_matches('>');
    (address.contains('@') && !address.contains(char::is_whitespace))
        .then(|| address.to_lowercase())
}

/// The enhanced status code at the start of a `Status` value, e.g.
/// `5.1.1 (bad destination mailbox address)` → `5.1.1`.
fn status_code(value: &str) -> Option<String> {
    let code = value.split_whitespace().next()?;
    let parts: Vec<&str> = code.split('.').collect();
    let valid = parts.len() == 3
        && matches!(parts[0], "2" | "4" | "5")
        && parts[1..]
            .iter()
            .all(|p| !p.is_empty() && p.len() <= 3 && p.bytes().all(|b| b.is_ascii_digit()));
    valid.then(|| code.to_string())
}

/// `smtp; 550 5.1.1 ...` → `550 5.1.1 ...`, whitespace collapsed.
fn diagnostic(value: &str) -> String {
    let text = match value.split_once(';') {
        Some((kind, rest)) if !kind.contains(char::is_whitespace) => rest,
        _ => value,
    };
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> Vec<u8> {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/data/dsn")
            .join(name);
        std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    fn report(name: &str) -> Report {
        match read(&fixture(name)) {
            Notice::Report(r) => r,
            other => panic!("{name}: expected a report, got {other:?}"),
        }
    }

    #[test]
    fn postfix_hard_bounce() {
        let r = report("postfix.eml");
        assert_eq!(
            r.message_id.as_deref(),
            Some("5b0c6e2f9d1a4c3b8e7f6a5d4c3b2a19@acme.example")
        );
        assert_eq!(
            r.deliveries,
            [Delivery {
                address: "user3@example.com".into(),
                action: Action::Failed,
                status: "5.1.1".into(),
                diagnostic: "550 5.1.1 <user3@example.com>: Recipient address rejected: \
                             User unknown in virtual mailbox table"
                    .into(),
            }]
        );
        assert!(r.deliveries[0].is_hard());
    }

    #[test]
    fn exchange_ndr_with_returned_headers_and_a_four_digit_detail() {
        let r = report("exchange.eml");
        assert_eq!(
            r.message_id.as_deref(),
            Some("0a9b8c7d6e5f40312a3b4c5d6e7f8091@acme.example")
        );
        let d = &r.deliveries[0];
        assert_eq!(
            (d.address.as_str(), d.status.as_str()),
            ("user5@contoso.example", "5.1.10")
        );
        assert!(d
            .diagnostic
            .starts_with("550 5.1.10 RESOLVER.ADR.RecipientNotFound"));
        assert!(d.is_hard());
    }

    #[test]
    fn google_address_not_found() {
        let r = report("google-address-not-found.eml");
        assert_eq!(
            r.message_id.as_deref(),
            Some("c4d5e6f7a8b94c0d1e2f3a4b5c6d7e8f@acme.example")
        );
        let d = &r.deliveries[0];
        assert_eq!(
            (d.address.as_str(), d.status.as_str(), d.action),
            ("user7@example.org", "5.1.1", Action::Failed)
        );
        assert!(d.diagnostic.contains("does not exist"));
    }

    #[test]
    fn google_plain_text_bounce_without_a_report() {
        let r = report("google-plain.eml");
        assert_eq!(
            r.message_id.as_deref(),
            Some("d1e2f3a4b5c6470819a2b3c4d5e6f708@acme.example")
        );
        let d = &r.deliveries[0];
        assert_eq!(
            (d.address.as_str(), d.status.as_str()),
            ("user8@example.net", "5.2.1")
        );
        assert!(d.is_hard());
    }

    #[test]
    fn a_delay_is_a_warning_not_a_hard_bounce() {
        let r = report("postfix-delayed.eml");
        let d = &r.deliveries[0];
        assert_eq!(
            (d.address.as_str(), d.status.as_str(), d.action),
            ("user9@slow.example", "4.4.1", Action::Delayed)
        );
        assert!(!d.is_hard());
        assert!(d.diagnostic.contains("Connection timed out"), "{d:?}");
        assert_eq!(
            r.message_id.as_deref(),
            Some("9e8d7c6b5a4f40312e1d0c9b8a7f6e5d@acme.example")
        );
    }

    #[test]
    fn an_auto_reply_and_an_unsubscribe_request_are_not_notices() {
        assert_eq!(read(&fixture("auto-reply.eml")), Notice::Other);
        assert_eq!(read(&fixture("unsubscribe.eml")), Notice::Other);
        assert!(!may_be_notice(&fixture("auto-reply.eml")));
    }

    #[test]
    fn a_bounce_for_another_message_keeps_that_message_id() {
        let r = report("other-campaign.eml");
        assert_eq!(
            r.message_id.as_deref(),
            Some("0f1e2d3c4b5a49687766554433221100@acme.example")
        );
    }

    #[test]
    fn a_report_without_recipients_is_unreadable() {
        assert!(matches!(
            read(&fixture("malformed-report.eml")),
            Notice::Unreadable(_)
        ));
    }

    #[test]
    fn headers_alone_tell_candidates() {
        for name in [
            "postfix.eml",
            "exchange.eml",
            "google-address-not-found.eml",
            "google-plain.eml",
            "malformed-report.eml",
        ] {
            assert!(may_be_notice(&fixture(name)), "{name}");
        }
    }

    #[test]
    fn garbage_never_panics() {
        for raw in [
            &b""[..],
            b"\r\n\r\n",
            b"Content-Type: multipart/report; boundary=x\r\n\r\n--x\r\nContent-Type: message/delivery-status\r\n\r\nStatus: 5\r\n",
            b"Content-Type: multipart/report\r\n\r\n",
            b"From: MAILER-DAEMON@x\r\nX-Failed-Recipients: ,,, ;\r\n\r\n550",
        ] {
            let _ = read(raw);
            let _ = may_be_notice(raw);
        }
    }

    #[test]
    fn success_and_read_receipts_are_other() {
        let delivered = b"Content-Type: multipart/report; report-type=delivery-status; boundary=b\r\n\r\n\
            --b\r\nContent-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; x\r\n\r\n\
            Final-Recipient: rfc822; a@b.example\r\nAction: delivered\r\nStatus: 2.0.0\r\n\r\n--b--\r\n";
        assert_eq!(read(delivered), Notice::Other);
        let mdn = b"Content-Type: multipart/report; report-type=disposition-notification; boundary=b\r\n\r\n--b--\r\n";
        assert_eq!(read(mdn), Notice::Other);
    }

    #[test]
    fn field_values_are_unfolded_and_typed_addresses_stripped() {
        assert_eq!(
            address_of("rfc822; <User@Example.COM>").as_deref(),
            Some("user@example.com")
        );
        assert_eq!(address_of("rfc822; not an address"), None);
        assert_eq!(status_code("5.1.1 (bad mailbox)").as_deref(), Some("5.1.1"));
        assert_eq!(status_code("5.1"), None);
        assert_eq!(diagnostic("smtp;  550  no"), "550 no");
        let groups = field_groups("A: 1\r\n  2\r\n\r\nB: 3\r\n");
        assert_eq!(groups.len(), 2);
        assert_eq!(groups[0], [("a".to_string(), "1 2".to_string())]);
    }
}
