//! What comes back to the sending account's mailbox after the send
//! (`hikyaku bounces`, SPEC §9). Delivery status notifications are matched
//! to this campaign's recipients by the Message-ID hikyaku gave each
//! message, or by address when a notification quotes none; hard bounces
//! join the suppression list. Mail sent to the campaign's `mailto:`
//! unsubscribe address suppresses its sender.

pub mod dsn;
pub mod imap;

use std::collections::HashSet;

use anyhow::Result;
use mail_parser::{Address, HeaderValue, Message, MessageParser};

use crate::campaign::{Campaign, ImapConfig};
use crate::recipients::parse_address;
use crate::store::{message_id_key, NoticeRow, State, Store};
use crate::time::now_ms;
use dsn::{Action, Delivery, Notice, Report};

/// Larger messages are left unread: a notification quotes at most the
/// message that bounced, and hikyaku's messages stay under Gmail's 25 MB.
const MAX_MESSAGE_BYTES: u32 = 40 * 1024 * 1024;

/// The campaign's `mailto:` unsubscribe address, as mail to it is told
/// from other mail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnsubscribeAddress {
    /// Lowercase.
    pub address: String,
    /// The constant start of the `subject=` of the URI, lowercase: required
    /// in the subject when the address also receives other mail.
    pub subject: Option<String>,
}

impl UnsubscribeAddress {
    /// The address of the `mailto:` URI among the comma-separated URIs of
    /// `list_unsubscribe`; `Ok(None)` when there is none; `Err` (why) when
    /// mail to it cannot be told from other mail.
    pub fn from_list_unsubscribe(
        value: &str,
        sender: Option<&str>,
    ) -> Result<Option<Self>, String> {
        let Some(uri) = value
            .split(',')
            .filter_map(|u| url::Url::parse(u.trim()).ok())
            .find(|u| u.scheme() == "mailto")
        else {
            return Ok(None);
        };
        let address = percent_decode(uri.path()).to_lowercase();
        if address.contains("{{") || !address.contains('@') {
            return Err(format!(
                "list_unsubscribe {value:?}: the mailto: address must be one fixed address to recognise mail sent to it"
            ));
        }
        let subject = uri
            .query_pairs()
            .find(|(k, _)| k.eq_ignore_ascii_case("subject"))
            .map(|(_, v)| {
                let v = v.to_lowercase();
                v.split("{{").next().unwrap_or("").trim().to_string()
            })
            .filter(|s| !s.is_empty());
        if subject.is_none() && sender.is_some_and(|s| s.eq_ignore_ascii_case(&address)) {
            return Err(format!(
                "list_unsubscribe {value:?} is the sending address itself with no subject=: \
                 unsubscribe requests cannot be told from replies (use an address of its own, \
                 e.g. news+unsubscribe@..., or add ?subject=unsubscribe)"
            ));
        }
        Ok(Some(UnsubscribeAddress { address, subject }))
    }

    fn addressed_by(&self, message: &Message<'_>) -> bool {
        let to_it = |addr: Option<&Address<'_>>| {
            addr.is_some_and(|a| {
                a.iter()
                    .filter_map(|m| m.address())
                    .any(|m| m.eq_ignore_ascii_case(&self.address))
            })
        };
        let delivered_to = ["Delivered-To", "X-Original-To"].iter().any(|name| {
            message
                .header_values(*name)
                .filter_map(HeaderValue::as_text)
                .any(|v| {
                    v.trim()
                        .trim_matches(['<', '>'])
                        .eq_ignore_ascii_case(&self.address)
                })
        });
        let addressed = to_it(message.to()) || to_it(message.cc()) || delivered_to;
        let subject_ok = match &self.subject {
            None => true,
            Some(want) => message
                .subject()
                .is_some_and(|s| s.to_lowercase().contains(want.as_str())),
        };
        addressed && subject_ok
    }
}

/// `%40` → `@` in a mailto address.
fn percent_decode(text: &str) -> String {
    url::form_urlencoded::parse(format!("a={}", text.replace('+', "%2B")).as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_else(|| text.to_string())
}

/// One message of the mailbox, as far as this campaign goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mail {
    Report(Report),
    /// A request to unsubscribe, by the sender's address (as sent).
    Unsubscribe {
        sender: String,
    },
    /// Looks like a notification but cannot be read: why.
    Unreadable(String),
    Other,
}

/// Whether a message, by its headers alone, is worth downloading.
pub fn may_matter(headers: &[u8], unsubscribe: Option<&UnsubscribeAddress>) -> bool {
    dsn::may_be_notice(headers)
        || unsubscribe.is_some_and(|u| {
            MessageParser::default()
                .parse_headers(headers)
                .is_some_and(|m| u.addressed_by(&m))
        })
}

/// Reads one whole message.
pub fn sort(raw: &[u8], unsubscribe: Option<&UnsubscribeAddress>) -> Mail {
    match dsn::read(raw) {
        Notice::Report(report) => return Mail::Report(report),
        Notice::Unreadable(why) => {
            let subject = MessageParser::default()
                .parse_headers(raw)
                .and_then(|m| m.subject().map(str::to_string));
            return Mail::Unreadable(match subject {
                Some(subject) => format!("({subject:?}) {why}"),
                None => why,
            });
        }
        Notice::Other => {}
    }
    let Some(unsubscribe) = unsubscribe else {
        return Mail::Other;
    };
    let Some(message) = MessageParser::default().parse(raw) else {
        return Mail::Other;
    };
    let auto_reply = message
        .header("Auto-Submitted")
        .and_then(HeaderValue::as_text)
        .is_some_and(|v| !v.trim().eq_ignore_ascii_case("no"));
    if auto_reply || !unsubscribe.addressed_by(&message) {
        return Mail::Other;
    }
    let sender = message
        .from()
        .and_then(Address::first)
        .and_then(|a| a.address());
    match sender.map(parse_address) {
        Some(Ok(sender)) => Mail::Unsubscribe {
            sender: sender.ascii,
        },
        _ => Mail::Unreadable(format!(
            "mail to {} whose sender is not a valid address",
            unsubscribe.address
        )),
    }
}

/// What one delivery of a report means for this campaign.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict<'a> {
    Bounce {
        row: &'a NoticeRow,
        delivery: &'a Delivery,
    },
    Delay {
        row: &'a NoticeRow,
        delivery: &'a Delivery,
    },
    /// Not a message of this campaign (another campaign, another mailer).
    Elsewhere { delivery: &'a Delivery },
}

/// Matches a report to the campaign's rows. A report that quotes a
/// Message-ID is about that message only, whatever its addresses; one
/// that quotes none is matched by address. With `copies` (the campaign
/// sends Cc or Bcc) a quoted message also went to other addresses, so the
/// address must be the row's own.
pub fn judge<'a>(report: &'a Report, rows: &'a [NoticeRow], copies: bool) -> Vec<Verdict<'a>> {
    let own = |row: &NoticeRow, d: &Delivery| {
        row.address.eq_ignore_ascii_case(&d.address) || row.email.eq_ignore_ascii_case(&d.address)
    };
    let quoted = report.message_id.as_deref().map(message_id_key);
    report
        .deliveries
        .iter()
        .map(|delivery| {
            let row = match &quoted {
                Some(id) => rows
                    .iter()
                    .find(|r| r.message_id.as_ref() == Some(id))
                    .filter(|r| !copies || own(r, delivery)),
                None => rows.iter().find(|r| own(r, delivery)),
            };
            match (row, delivery.action) {
                (Some(row), Action::Failed) => Verdict::Bounce { row, delivery },
                (Some(row), Action::Delayed) => Verdict::Delay { row, delivery },
                (None, _) => Verdict::Elsewhere { delivery },
            }
        })
        .collect()
}

/// What a run is asked to do.
#[derive(Debug, Clone)]
pub struct Options {
    /// Messages that arrived before this day are not read.
    pub since: chrono::NaiveDate,
    /// Where processed notifications are filed.
    pub move_to: Option<String>,
}

/// One recipient a notification was about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub email: String,
    pub status: String,
    pub diagnostic: String,
    /// The address joined the suppression list (a hard bounce).
    pub suppressed: bool,
}

/// What one run found and did.
#[derive(Debug, Default)]
pub struct Summary {
    /// Messages in the folder since the day asked.
    pub messages: usize,
    /// Bounces recorded by this run.
    pub bounced: Vec<Finding>,
    /// Delays noted by this run.
    pub delayed: Vec<Finding>,
    /// Notifications about recipients whose state already says so.
    pub already: usize,
    /// Senders of unsubscribe requests newly suppressed.
    pub unsubscribed: Vec<String>,
    /// Unsubscribe requests from addresses already suppressed.
    pub unsubscribed_before: usize,
    /// Reports about messages of another campaign or mailer.
    pub elsewhere: usize,
    /// Notifications that cannot be read: uid and why.
    pub unreadable: Vec<(u32, String)>,
    /// Messages too large to read.
    pub too_large: usize,
    /// Messages filed into `move_to`.
    pub moved: usize,
}

/// A message worth a closer look, once read.
struct Read {
    uid: u32,
    mail: Mail,
}

/// Reads the mailbox and records what concerns the campaign.
pub async fn run(
    campaign: &Campaign,
    imap: &ImapConfig,
    store: &Store,
    campaign_id: i64,
    options: &Options,
) -> Result<Summary> {
    let sender = crate::message::mailbox("from", &campaign.message.from)
        .ok()
        .map(|m| m.email.to_string());
    let unsubscribe = match campaign.message.list_unsubscribe.as_deref() {
        Some(value) => UnsubscribeAddress::from_list_unsubscribe(value, sender.as_deref())
            .unwrap_or_else(|why| {
                tracing::warn!("{why}; unsubscribe requests are not read");
                None
            }),
        None => None,
    };
    let password = imap.password.read().await?;
    let mut mailbox = imap::Mailbox::open(imap, &password).await?;
    let mut summary = Summary::default();
    let read = read_mailbox(&mut mailbox, options, unsubscribe.as_ref(), &mut summary).await;
    let read = match read {
        Ok(read) => read,
        Err(e) => {
            mailbox.close().await;
            return Err(e.into());
        }
    };
    let processed = record(campaign, store, campaign_id, &read, &mut summary).await?;
    if let Some(folder) = &options.move_to {
        let moved = mailbox.move_to(&processed, folder).await;
        if let Err(e) = moved {
            mailbox.close().await;
            return Err(e.into());
        }
        summary.moved = processed.len();
    }
    mailbox.close().await;
    Ok(summary)
}

async fn read_mailbox(
    mailbox: &mut imap::Mailbox,
    options: &Options,
    unsubscribe: Option<&UnsubscribeAddress>,
    summary: &mut Summary,
) -> Result<Vec<Read>, imap::ImapError> {
    let uids = mailbox.since(options.since).await?;
    summary.messages = uids.len();
    let mut read = Vec::new();
    // Headers a batch at a time: a large inbox is never held whole.
    for batch in uids.chunks(imap::BATCH) {
        let mut wanted = Vec::new();
        for headers in mailbox.headers(batch).await? {
            if !may_matter(&headers.bytes, unsubscribe) {
                continue;
            }
            if headers.size > MAX_MESSAGE_BYTES {
                summary.too_large += 1;
                continue;
            }
            wanted.push(headers.uid);
        }
        for uid in wanted {
            if let Some(raw) = mailbox.message(uid).await? {
                read.push(Read {
                    uid,
                    mail: sort(&raw, unsubscribe),
                });
            }
        }
    }
    Ok(read)
}

/// Applies what was read to the store; returns the UIDs of the messages
/// that were about this campaign (or were unsubscribe requests).
async fn record(
    campaign: &Campaign,
    store: &Store,
    campaign_id: i64,
    read: &[Read],
    summary: &mut Summary,
) -> Result<Vec<u32>> {
    let mut ids = HashSet::new();
    let mut addresses = HashSet::new();
    for r in read {
        if let Mail::Report(report) = &r.mail {
            match &report.message_id {
                Some(id) => {
                    ids.insert(message_id_key(id));
                }
                None => addresses.extend(report.deliveries.iter().map(|d| d.address.clone())),
            }
        }
    }
    let rows = store.notice_rows(campaign_id, &ids, &addresses).await?;
    let copies = campaign.message.cc.is_some() || campaign.message.bcc.is_some();
    let mut processed = Vec::new();
    let mut seen = HashSet::new();
    for r in read {
        match &r.mail {
            Mail::Report(report) => {
                let mut ours = false;
                for verdict in judge(report, &rows, copies) {
                    ours |= !matches!(verdict, Verdict::Elsewhere { .. });
                    apply(store, verdict, &mut seen, summary).await?;
                }
                if ours {
                    processed.push(r.uid);
                }
            }
            Mail::Unsubscribe { sender } => {
                if store
                    .suppress(sender, "asked to unsubscribe by mail")
                    .await?
                {
                    summary.unsubscribed.push(sender.clone());
                } else {
                    summary.unsubscribed_before += 1;
                }
                processed.push(r.uid);
            }
            Mail::Unreadable(why) => summary.unreadable.push((r.uid, why.clone())),
            Mail::Other => {}
        }
    }
    Ok(processed)
}

async fn apply(
    store: &Store,
    verdict: Verdict<'_>,
    seen: &mut HashSet<(i64, bool)>,
    summary: &mut Summary,
) -> Result<()> {
    let finding = |row: &NoticeRow, d: &Delivery, suppressed: bool| Finding {
        email: row.email.clone(),
        status: d.status.clone(),
        diagnostic: d.diagnostic.clone(),
        suppressed,
    };
    match verdict {
        Verdict::Elsewhere { .. } => summary.elsewhere += 1,
        Verdict::Bounce { row, delivery } => {
            let first = seen.insert((row.id, true));
            let recorded = first
                && row.state != State::Bounced
                && store
                    .record_bounce(
                        row.id,
                        &row.address,
                        &delivery.status,
                        &delivery.diagnostic,
                        delivery.is_hard(),
                        now_ms(),
                    )
                    .await?;
            if recorded {
                summary
                    .bounced
                    .push(finding(row, delivery, delivery.is_hard()));
            } else {
                summary.already += 1;
            }
        }
        Verdict::Delay { row, delivery } => {
            let note = delay_note(delivery);
            let noted = seen.insert((row.id, false))
                && row.state == State::Sent
                && store.note_delay(row.id, &note).await?;
            if noted {
                summary.delayed.push(finding(row, delivery, false));
            } else {
                summary.already += 1;
            }
        }
    }
    Ok(())
}

/// The reason a delayed `sent` row shows in `status` and `export`.
fn delay_note(d: &Delivery) -> String {
    let mut note = format!("delivery delayed: {}", d.status);
    if !d.diagnostic.is_empty() {
        note.push(' ');
        note.extend(d.diagnostic.chars().take(300));
    }
    note
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

    fn row(id: i64, email: &str, message_id: &str, state: State) -> NoticeRow {
        NoticeRow {
            id,
            email: email.into(),
            address: email.into(),
            state,
            reason: None,
            message_id: Some(message_id_key(message_id)),
        }
    }

    /// The rows of "this campaign" the fixtures refer to.
    fn campaign_rows() -> Vec<NoticeRow> {
        vec![
            row(
                3,
                "user3@example.com",
                "5b0c6e2f9d1a4c3b8e7f6a5d4c3b2a19@acme.example",
                State::Sent,
            ),
            row(
                5,
                "User5@Contoso.example",
                "0a9b8c7d6e5f40312a3b4c5d6e7f8091@acme.example",
                State::Sent,
            ),
            row(
                7,
                "user7@example.org",
                "c4d5e6f7a8b94c0d1e2f3a4b5c6d7e8f@acme.example",
                State::Unknown,
            ),
            row(
                8,
                "user8@example.net",
                "d1e2f3a4b5c6470819a2b3c4d5e6f708@acme.example",
                State::Sent,
            ),
            row(
                9,
                "user9@slow.example",
                "9e8d7c6b5a4f40312e1d0c9b8a7f6e5d@acme.example",
                State::Sent,
            ),
        ]
    }

    /// What each fixture means for the campaign: (row id, bounce?, hard?).
    fn outcome(name: &str) -> Vec<(Option<i64>, &'static str)> {
        let rows = campaign_rows();
        let Mail::Report(report) = sort(&fixture(name), None) else {
            return vec![(None, "not a report")];
        };
        judge(&report, &rows, false)
            .into_iter()
            .map(|v| match v {
                Verdict::Bounce { row, delivery } if delivery.is_hard() => (Some(row.id), "hard"),
                Verdict::Bounce { row, .. } => (Some(row.id), "soft"),
                Verdict::Delay { row, .. } => (Some(row.id), "delay"),
                Verdict::Elsewhere { .. } => (None, "elsewhere"),
            })
            .collect()
    }

    #[test]
    fn every_fixture_is_classified_and_matched() {
        assert_eq!(outcome("postfix.eml"), [(Some(3), "hard")]);
        assert_eq!(outcome("exchange.eml"), [(Some(5), "hard")]);
        assert_eq!(outcome("google-address-not-found.eml"), [(Some(7), "hard")]);
        assert_eq!(outcome("google-plain.eml"), [(Some(8), "hard")]);
        assert_eq!(outcome("postfix-delayed.eml"), [(Some(9), "delay")]);
        assert_eq!(outcome("other-campaign.eml"), [(None, "elsewhere")]);
        assert_eq!(outcome("auto-reply.eml"), [(None, "not a report")]);
        assert!(matches!(
            sort(&fixture("malformed-report.eml"), None),
            Mail::Unreadable(_)
        ));
    }

    #[test]
    fn a_report_without_a_message_id_is_matched_by_address() {
        let rows = campaign_rows();
        let report = Report {
            message_id: None,
            deliveries: vec![Delivery {
                address: "user5@contoso.example".into(),
                action: Action::Failed,
                status: "5.1.1".into(),
                diagnostic: String::new(),
            }],
        };
        assert!(matches!(
            judge(&report, &rows, false)[..],
            [Verdict::Bounce { row, .. }] if row.id == 5
        ));
    }

    #[test]
    fn with_copies_a_quoted_message_bounces_only_for_its_own_address() {
        let rows = campaign_rows();
        let report = Report {
            message_id: Some("5b0c6e2f9d1a4c3b8e7f6a5d4c3b2a19@acme.example".into()),
            deliveries: vec![Delivery {
                address: "manager@example.com".into(),
                action: Action::Failed,
                status: "5.1.1".into(),
                diagnostic: String::new(),
            }],
        };
        assert!(matches!(
            judge(&report, &rows, true)[..],
            [Verdict::Elsewhere { .. }]
        ));
        // Without copies the message had one recipient: a forwarding
        // address that bounced is that recipient's.
        assert!(matches!(
            judge(&report, &rows, false)[..],
            [Verdict::Bounce { row, .. }] if row.id == 3
        ));
    }

    #[test]
    fn unsubscribe_requests_are_mail_to_the_mailto_address() {
        let target = UnsubscribeAddress::from_list_unsubscribe(
            "mailto:news+unsubscribe@acme.example?subject=unsubscribe",
            Some("news@acme.example"),
        )
        .unwrap()
        .unwrap();
        assert_eq!(target.address, "news+unsubscribe@acme.example");
        assert_eq!(
            sort(&fixture("unsubscribe.eml"), Some(&target)),
            Mail::Unsubscribe {
                sender: "User4@example.com".into()
            }
        );
        assert!(may_matter(&fixture("unsubscribe.eml"), Some(&target)));
        // A reply to the campaign is not a request.
        assert_eq!(sort(&fixture("auto-reply.eml"), Some(&target)), Mail::Other);
    }

    #[test]
    fn unsubscribe_addresses_that_cannot_be_recognised_are_refused() {
        assert_eq!(
            UnsubscribeAddress::from_list_unsubscribe("https://acme.example/u?e=x", None),
            Ok(None)
        );
        assert!(UnsubscribeAddress::from_list_unsubscribe(
            "mailto:news@acme.example",
            Some("News@acme.example")
        )
        .is_err());
        assert!(
            UnsubscribeAddress::from_list_unsubscribe("mailto:u+{{email}}@acme.example", None)
                .is_err()
        );
        let with_subject = UnsubscribeAddress::from_list_unsubscribe(
            "mailto:news@acme.example?subject=Unsubscribe%20{{email}}",
            Some("news@acme.example"),
        )
        .unwrap()
        .unwrap();
        assert_eq!(with_subject.subject.as_deref(), Some("unsubscribe"));
        let second = UnsubscribeAddress::from_list_unsubscribe(
            "https://acme.example/u?e=x, mailto:unsub%2Bnews@acme.example",
            None,
        )
        .unwrap()
        .unwrap();
        assert_eq!(second.address, "unsub+news@acme.example");
    }
}
