//! SMTP reply classification (SPEC §8).
//!
//! Classifying by the first digit alone is wrong for Gmail: it sends some
//! account-wide pauses as 5xx (5.4.5 daily limit) and uses 4.2.1 for both a
//! busy recipient and an account-wide relay limit. So the enhanced status
//! code and the text decide.

use std::fmt;

/// What a reply means for the recipient and the run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyClass {
    /// 2xx after DATA: the message is the server's now.
    Accepted,
    /// Retry this recipient later, with backoff.
    Transient,
    /// The account is over a limit: the recipient goes back to `pending`.
    AccountPaused(Pause),
    /// Authentication or TLS policy: stop the run, change nothing.
    Fatal,
    /// This recipient will never be accepted.
    Permanent,
    /// The connection was lost after the whole message was sent and before
    /// the server answered: it may have been accepted (RFC 1047). Never
    /// retried by itself.
    Unknown,
}

/// How long an account pause lasts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pause {
    /// Daily quota (5.4.5): until the daily window frees.
    Daily,
    /// Short-term throttling (4xx): back off.
    Backoff,
}

/// Where in the conversation a reply came from (SPEC §8 classifies a lost
/// connection by the last thing that was sent).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// The server's own reply to a transaction (MAIL, RCPT, DATA, the
    /// message); without a code, a refusal made here before the message
    /// was offered.
    Server,
    /// The server's reply, or a local refusal, while a connection was being
    /// opened: greeting, EHLO, STARTTLS, AUTH. No transaction started.
    Login,
    /// The connection was lost or timed out before the message's final "."
    /// was sent: the server cannot have it, and this recipient is retried.
    Lost,
    /// The connection was lost or timed out after the final "." was sent,
    /// before the reply: the outcome is unknown.
    AfterData,
    /// No connection could be made: no transaction started, so the
    /// recipient is not at fault; the account backs off and reconnects.
    Unreachable,
    /// TLS could not be set up (certificate, protocol): a configuration
    /// problem that no retry fixes.
    Tls,
}

/// A server reply, or the lack of one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The three-digit code; `None` when the connection failed or timed out.
    pub code: Option<u16>,
    pub origin: Origin,
    /// The enhanced status code (RFC 3463), e.g. `5.1.1`, when the text starts with one.
    pub enhanced: Option<String>,
    /// The reply text without the codes (or the local error).
    pub text: String,
}

impl Reply {
    /// Splits a reply text that may start with an enhanced status code.
    pub fn new(code: Option<u16>, text: &str) -> Reply {
        let text = text.trim();
        let (enhanced, rest) = match text.split_once(char::is_whitespace) {
            Some((first, rest)) if is_enhanced(first) => (Some(first.to_string()), rest.trim()),
            _ if is_enhanced(text) => (Some(text.to_string()), ""),
            _ => (None, text),
        };
        Reply {
            code,
            origin: Origin::Server,
            enhanced,
            text: rest.to_string(),
        }
    }

    /// A failure with no reply at all.
    pub fn local(origin: Origin, text: impl Into<String>) -> Reply {
        Reply {
            code: None,
            origin,
            enhanced: None,
            text: text.into(),
        }
    }

    pub fn class(&self) -> ReplyClass {
        match self.origin {
            // Without a code, a refusal of this message made before it was
            // offered (the server lacks SMTPUTF8 or 8BITMIME).
            Origin::Server if self.code.is_none() => ReplyClass::Permanent,
            Origin::Server | Origin::Lost => {
                classify(self.code, self.enhanced.as_deref(), &self.text)
            }
            Origin::Login => match classify(self.code, self.enhanced.as_deref(), &self.text) {
                // Refused before any transaction: the account or the
                // connection is at fault, never one recipient.
                ReplyClass::Transient if self.code.is_some() => {
                    ReplyClass::AccountPaused(Pause::Backoff)
                }
                ReplyClass::AccountPaused(p) => ReplyClass::AccountPaused(p),
                _ => ReplyClass::Fatal,
            },
            Origin::AfterData => ReplyClass::Unknown,
            Origin::Unreachable => ReplyClass::AccountPaused(Pause::Backoff),
            Origin::Tls => ReplyClass::Fatal,
        }
    }

    /// Whether the message was offered to the server (a transaction
    /// started). When not, the recipient's row goes back exactly as it was.
    pub fn offered(&self) -> bool {
        matches!(
            self.origin,
            Origin::Server | Origin::Lost | Origin::AfterData
        )
    }

    /// Whether the server refused the login (as opposed to a TLS problem).
    pub fn is_authentication(&self) -> bool {
        matches!(self.code, Some(530 | 534 | 535))
    }

    /// 5.1.1 (no such user) and 5.2.1 (disabled) go to the suppression list.
    pub fn suppresses(&self) -> bool {
        matches!(self.enhanced.as_deref(), Some("5.1.1") | Some("5.2.1"))
    }

    /// A short key grouping identical failures, for the circuit breaker.
    pub fn failure_key(&self) -> String {
        format!(
            "{} {}",
            self.code.map(|c| c.to_string()).unwrap_or_default(),
            self.enhanced.as_deref().unwrap_or("")
        )
    }
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        let code = self.code.map(|c| c.to_string());
        parts.extend(code.as_deref());
        parts.extend(self.enhanced.as_deref());
        if !self.text.is_empty() {
            parts.push(&self.text);
        }
        f.write_str(&parts.join(" "))
    }
}

fn is_enhanced(word: &str) -> bool {
    let parts: Vec<&str> = word.split('.').collect();
    parts.len() == 3
        && matches!(parts[0], "2" | "4" | "5")
        && parts[1..]
            .iter()
            .all(|p| !p.is_empty() && p.len() <= 3 && p.bytes().all(|b| b.is_ascii_digit()))
}

/// Classifies one reply. `code` is `None` for a lost connection or timeout.
pub fn classify(code: Option<u16>, enhanced: Option<&str>, text: &str) -> ReplyClass {
    let Some(code) = code else {
        return ReplyClass::Transient;
    };
    let lower = text.to_ascii_lowercase();
    let enhanced = enhanced.unwrap_or("");
    match code {
        200..=399 => ReplyClass::Accepted,
        530 | 534 | 535 => ReplyClass::Fatal,
        _ if enhanced == "5.4.5" => ReplyClass::AccountPaused(Pause::Daily),
        _ if enhanced == "5.7.1"
            && (lower.contains("rate limited") || lower.contains("limit exceeded")) =>
        {
            ReplyClass::AccountPaused(Pause::Daily)
        }
        _ if enhanced == "4.2.1" && lower.contains("relay limit") => {
            ReplyClass::AccountPaused(Pause::Backoff)
        }
        421 | 454 if enhanced.starts_with("4.7.") => ReplyClass::AccountPaused(Pause::Backoff),
        421 if lower.contains("try again later") => ReplyClass::AccountPaused(Pause::Backoff),
        400..=499 => ReplyClass::Transient,
        _ => ReplyClass::Permanent,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every real Gmail reply in tests/data/gmail-replies.tsv gets the class
    /// SPEC §8 gives it.
    #[test]
    fn gmail_reply_vectors() {
        let data = include_str!("../tests/data/gmail-replies.tsv");
        let mut checked = 0;
        for line in data
            .lines()
            .filter(|l| !l.starts_with('#') && !l.starts_with("code\t"))
        {
            let cols: Vec<&str> = line.split('\t').collect();
            assert_eq!(cols.len(), 4, "{line}");
            let code: u16 = cols[0].parse().unwrap();
            let reply = Reply::new(Some(code), &format!("{} {}", cols[1], cols[2]));
            assert_eq!(reply.enhanced.as_deref(), Some(cols[1]));
            let got = match reply.class() {
                ReplyClass::Accepted => "accepted",
                ReplyClass::Transient => "transient",
                ReplyClass::AccountPaused(_) => "account-paused",
                ReplyClass::Fatal => "fatal",
                ReplyClass::Permanent => "permanent",
                ReplyClass::Unknown => "unknown",
            };
            assert_eq!(got, cols[3], "{line}");
            checked += 1;
        }
        assert!(checked >= 20, "only {checked} vectors");
    }

    #[test]
    fn daily_limit_pauses_until_the_day_frees() {
        let r = Reply::new(Some(550), "5.4.5 Daily user sending limit exceeded.");
        assert_eq!(r.class(), ReplyClass::AccountPaused(Pause::Daily));
        let r = Reply::new(Some(421), "4.7.0 Try again later, closing connection.");
        assert_eq!(r.class(), ReplyClass::AccountPaused(Pause::Backoff));
    }

    #[test]
    fn lost_connection_is_transient_unreachable_pauses_tls_is_fatal() {
        assert_eq!(
            Reply::local(Origin::Lost, "connection reset").class(),
            ReplyClass::Transient
        );
        // Nobody answered at all: not the recipient's fault.
        assert_eq!(
            Reply::local(Origin::Unreachable, "Connection error: refused").class(),
            ReplyClass::AccountPaused(Pause::Backoff)
        );
        assert_eq!(
            Reply::local(Origin::Tls, "invalid peer certificate").class(),
            ReplyClass::Fatal
        );
    }

    /// Regression: a connection lost after the final "." was retried, and a
    /// server that had stored the message received it again.
    #[test]
    fn lost_after_the_final_dot_is_unknown_before_it_transient() {
        assert_eq!(
            Reply::local(Origin::AfterData, "connection reset").class(),
            ReplyClass::Unknown
        );
        assert_eq!(
            Reply::local(Origin::Lost, "connection reset").class(),
            ReplyClass::Transient
        );
        assert!(Reply::local(Origin::AfterData, "x").offered());
        assert!(!Reply::local(Origin::Unreachable, "x").offered());
    }

    #[test]
    fn refusals_while_logging_in_never_blame_a_recipient() {
        let login = |code, text: &str| {
            let mut r = Reply::new(Some(code), text);
            r.origin = Origin::Login;
            r.class()
        };
        assert_eq!(login(535, "5.7.8 bad credentials"), ReplyClass::Fatal);
        assert_eq!(
            login(454, "4.7.0 Too many login attempts"),
            ReplyClass::AccountPaused(Pause::Backoff)
        );
        assert_eq!(
            login(421, "4.3.2 Service not available"),
            ReplyClass::AccountPaused(Pause::Backoff)
        );
        assert_eq!(login(554, "5.7.1 no service"), ReplyClass::Fatal);
        assert_eq!(
            Reply::local(Origin::Login, "no compatible AUTH mechanism").class(),
            ReplyClass::Fatal
        );
    }

    #[test]
    fn suppression_only_for_unknown_or_disabled_users() {
        assert!(Reply::new(Some(550), "5.1.1 no such user").suppresses());
        assert!(Reply::new(Some(550), "5.2.1 inactive").suppresses());
        assert!(!Reply::new(Some(552), "5.3.4 too big").suppresses());
    }

    #[test]
    fn reply_without_enhanced_code_keeps_its_text() {
        let r = Reply::new(Some(554), "Transaction failed");
        assert_eq!(r.enhanced, None);
        assert_eq!(r.text, "Transaction failed");
        assert_eq!(r.class(), ReplyClass::Permanent);
        assert_eq!(r.to_string(), "554 Transaction failed");
    }
}
