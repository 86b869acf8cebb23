//! The sending account's mailbox over IMAP: async-imap on tokio, TLS by
//! rustls (implicit on port 993 or STARTTLS on 143, certificates always
//! verified), every step bounded in time.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_imap::{Client, Session};
use futures_util::TryStreamExt;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls;
use tokio_rustls::TlsConnector;

use crate::campaign::{ImapConfig, Secret, TlsMode};

/// What can go wrong with the mailbox, each naming the server.
#[derive(Debug, thiserror::Error)]
pub enum ImapError {
    #[error("connecting to the IMAP server {server}: {detail}")]
    Connect { server: String, detail: String },
    #[error("TLS with the IMAP server {server}: {detail}")]
    Tls { server: String, detail: String },
    #[error("ca_file {path}: {detail}")]
    CaFile { path: String, detail: String },
    #[error("the IMAP server {server} refused the login of {user}: {detail}{hint}")]
    Login {
        server: String,
        user: String,
        detail: String,
        hint: &'static str,
    },
    #[error("the IMAP server {server} has no folder {folder:?} (or refused it): {detail}")]
    Folder {
        server: String,
        folder: String,
        detail: String,
    },
    #[error("the IMAP server {server}: {what} failed: {detail}")]
    Command {
        server: String,
        what: &'static str,
        detail: String,
    },
    #[error("the IMAP server {server}: {what} took longer than {}", humantime::format_duration(*.timeout))]
    Timeout {
        server: String,
        what: &'static str,
        timeout: Duration,
    },
}

/// What a login failure most likely means on Gmail.
const GMAIL_HINT: &str = " (Gmail: IMAP is on by default for Gmail accounts; a Workspace \
    administrator may have turned it off. Use the same app password as for SMTP, \
    created with 2-step verification on)";
const GMAIL_OAUTH_HINT: &str = " (Gmail: the access token needs the https://mail.google.com/ \
    scope, which covers IMAP as well as SMTP)";

type Stream = TlsStream<TcpStream>;

/// One message's headers and size, before deciding to download it whole.
#[derive(Debug)]
pub struct Headers {
    pub uid: u32,
    pub size: u32,
    pub bytes: Vec<u8>,
}

/// An open, selected mailbox folder.
pub struct Mailbox {
    session: Session<Stream>,
    server: String,
    timeout: Duration,
    can_move: bool,
    uidplus: bool,
}

/// UIDs per FETCH: a long command line is refused by some servers.
pub const BATCH: usize = 200;

impl Mailbox {
    /// Connects, logs in and selects the configured folder.
    pub async fn open(cfg: &ImapConfig, password: &Secret) -> Result<Mailbox, ImapError> {
        let server = format!("{}:{}", cfg.host, cfg.port);
        let timeout = cfg.timeout;
        let tls_error = |detail: String| ImapError::Tls {
            server: server.clone(),
            detail,
        };
        let connector = connector(cfg)?;
        let name = ServerName::try_from(cfg.host.clone()).map_err(|e| tls_error(e.to_string()))?;
        let tcp = within(
            &server,
            timeout,
            "the connection",
            TcpStream::connect((cfg.host.as_str(), cfg.port)),
        )
        .await
        .map_err(|e| match e {
            ImapError::Command { detail, .. } => ImapError::Connect {
                server: server.clone(),
                detail,
            },
            other => other,
        })?;
        let tcp = if cfg.tls == TlsMode::StartTls {
            let mut plain = Client::new(tcp);
            within(&server, timeout, "the greeting", greeting(&mut plain)).await?;
            within(
                &server,
                timeout,
                "STARTTLS",
                plain.run_command_and_check_ok("STARTTLS", None),
            )
            .await?;
            plain.into_inner()
        } else {
            tcp
        };
        let tls = within(
            &server,
            timeout,
            "the TLS handshake",
            connector.connect(name, tcp),
        )
        .await
        .map_err(|e| match e {
            ImapError::Command { detail, .. } => tls_error(detail),
            other => other,
        })?;
        let mut client = Client::new(tls);
        if cfg.tls != TlsMode::StartTls {
            within(&server, timeout, "the greeting", greeting(&mut client)).await?;
        }
        let login = async {
            if cfg.xoauth2 {
                let sasl = XOAuth2 {
                    user: &cfg.user,
                    token: password.expose(),
                    sent: false,
                };
                client.authenticate("XOAUTH2", sasl).await
            } else {
                client.login(&cfg.user, password.expose()).await
            }
        };
        let mut session = match tokio::time::timeout(timeout, login).await {
            Ok(Ok(session)) => session,
            Ok(Err((e, _))) => {
                let google = cfg.host.ends_with(".gmail.com") || cfg.host.ends_with(".google.com");
                return Err(ImapError::Login {
                    server,
                    user: cfg.user.clone(),
                    detail: server_words(&e.to_string()),
                    hint: match (google, cfg.xoauth2) {
                        (true, false) => GMAIL_HINT,
                        (true, true) => GMAIL_OAUTH_HINT,
                        (false, _) => "",
                    },
                });
            }
            Err(_) => {
                return Err(ImapError::Timeout {
                    server,
                    what: "the login",
                    timeout,
                })
            }
        };
        let capabilities = within(&server, timeout, "CAPABILITY", session.capabilities()).await?;
        let can_move = capabilities.has_str("MOVE");
        let uidplus = capabilities.has_str("UIDPLUS");
        within(&server, timeout, "SELECT", session.select(&cfg.folder))
            .await
            .map_err(|e| match e {
                ImapError::Command { detail, .. } => ImapError::Folder {
                    server: server.clone(),
                    folder: cfg.folder.clone(),
                    detail,
                },
                other => other,
            })?;
        Ok(Mailbox {
            session,
            server,
            timeout,
            can_move,
            uidplus,
        })
    }

    /// The UIDs of the messages that arrived on or after `since`, in order.
    pub async fn since(&mut self, since: chrono::NaiveDate) -> Result<Vec<u32>, ImapError> {
        let query = format!("SINCE {}", since.format("%-d-%b-%Y"));
        let (server, timeout) = (self.server.clone(), self.timeout);
        let found = within(&server, timeout, "SEARCH", self.session.uid_search(query)).await?;
        let mut uids: Vec<u32> = found.into_iter().collect();
        uids.sort_unstable();
        Ok(uids)
    }

    /// The headers and sizes of these messages, without marking them read.
    pub async fn headers(&mut self, uids: &[u32]) -> Result<Vec<Headers>, ImapError> {
        let mut out = Vec::with_capacity(uids.len());
        for chunk in uids.chunks(BATCH) {
            let fetched = self
                .fetch_all(&uid_set(chunk), "(UID RFC822.SIZE BODY.PEEK[HEADER])")
                .await?;
            out.extend(fetched.into_iter().filter_map(|f| {
                Some(Headers {
                    uid: f.uid?,
                    size: f.size.unwrap_or(0),
                    bytes: f.header()?.to_vec(),
                })
            }));
        }
        Ok(out)
    }

    /// One message whole, without marking it read.
    pub async fn message(&mut self, uid: u32) -> Result<Option<Vec<u8>>, ImapError> {
        let fetched = self
            .fetch_all(&uid.to_string(), "(UID BODY.PEEK[])")
            .await?;
        Ok(fetched
            .into_iter()
            .find(|f| f.uid == Some(uid))
            .and_then(|f| f.body().map(<[u8]>::to_vec)))
    }

    async fn fetch_all(
        &mut self,
        set: &str,
        query: &str,
    ) -> Result<Vec<async_imap::types::Fetch>, ImapError> {
        let (server, timeout) = (self.server.clone(), self.timeout);
        let work = async {
            let stream = self.session.uid_fetch(set, query).await?;
            stream.try_collect::<Vec<_>>().await
        };
        within(&server, timeout, "FETCH", work).await
    }

    /// Files these messages into `folder`, creating it when missing.
    pub async fn move_to(&mut self, uids: &[u32], folder: &str) -> Result<(), ImapError> {
        if uids.is_empty() {
            return Ok(());
        }
        let (server, timeout) = (self.server.clone(), self.timeout);
        let in_folder = |e: ImapError| match e {
            ImapError::Command { what, detail, .. } => ImapError::Folder {
                server: server.clone(),
                folder: folder.to_string(),
                detail: format!("{what}: {detail}"),
            },
            other => other,
        };
        // An existing folder makes CREATE fail, which is fine; a folder
        // that cannot be made makes the MOVE below fail and say so.
        let _ = within(&server, timeout, "CREATE", self.session.create(folder)).await;
        for chunk in uids.chunks(BATCH) {
            let set = uid_set(chunk);
            if self.can_move {
                within(&server, timeout, "MOVE", self.session.uid_mv(&set, folder))
                    .await
                    .map_err(in_folder)?;
                continue;
            }
            within(
                &server,
                timeout,
                "COPY",
                self.session.uid_copy(&set, folder),
            )
            .await
            .map_err(in_folder)?;
            let work = async {
                let stream = self
                    .session
                    .uid_store(&set, "+FLAGS.SILENT (\\Deleted)")
                    .await?;
                stream.try_collect::<Vec<_>>().await
            };
            within(&server, timeout, "STORE", work).await?;
            // Without UIDPLUS an EXPUNGE would also remove messages the user
            // deleted elsewhere: the originals then stay, marked deleted.
            if self.uidplus {
                let work = async {
                    let stream = self.session.uid_expunge(&set).await?;
                    stream.try_collect::<Vec<_>>().await
                };
                within(&server, timeout, "EXPUNGE", work).await?;
            }
        }
        Ok(())
    }

    /// Logs out politely; a server that does not answer is left.
    pub async fn close(mut self) {
        let timeout = self.timeout;
        let _ = tokio::time::timeout(timeout, self.session.logout()).await;
    }
}

/// One step under the time limit, naming it and the server in errors.
async fn within<T, E: std::fmt::Display>(
    server: &str,
    timeout: Duration,
    what: &'static str,
    work: impl Future<Output = Result<T, E>>,
) -> Result<T, ImapError> {
    match tokio::time::timeout(timeout, work).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(ImapError::Command {
            server: server.to_string(),
            what,
            detail: server_words(&e.to_string()),
        }),
        Err(_) => Err(ImapError::Timeout {
            server: server.to_string(),
            what,
            timeout,
        }),
    }
}

/// SASL XOAUTH2 (Gmail, Outlook): the user and an OAuth 2 access token.
struct XOAuth2<'a> {
    user: &'a str,
    token: &'a str,
    sent: bool,
}

impl async_imap::Authenticator for XOAuth2<'_> {
    type Response = Vec<u8>;

    fn process(&mut self, _challenge: &[u8]) -> Vec<u8> {
        // A second challenge carries the server's error; RFC 7628 answers
        // it with an empty response, after which the server says NO.
        if std::mem::replace(&mut self.sent, true) {
            return Vec::new();
        }
        format!("user={}\x01auth=Bearer {}\x01\x01", self.user, self.token).into_bytes()
    }
}

/// The server's first line, before anything is sent.
async fn greeting<T>(client: &mut Client<T>) -> Result<(), String>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + std::fmt::Debug + Send,
{
    match client.read_response().await {
        Ok(Some(_)) => Ok(()),
        Ok(None) => Err("the connection closed".into()),
        Err(e) => Err(e.to_string()),
    }
}

/// rustls with the web's roots, plus `ca_file` when given.
fn connector(cfg: &ImapConfig) -> Result<TlsConnector, ImapError> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = &cfg.ca_file {
        let shown = path.display().to_string();
        let problem = |detail: String| ImapError::CaFile {
            path: shown.clone(),
            detail,
        };
        let certs = CertificateDer::pem_file_iter(path)
            .map_err(|e| problem(e.to_string()))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| problem(e.to_string()))?;
        if certs.is_empty() {
            return Err(problem("holds no PEM certificate".into()));
        }
        for cert in certs {
            roots.add(cert).map_err(|e| problem(e.to_string()))?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ImapError::Tls {
            server: format!("{}:{}", cfg.host, cfg.port),
            detail: e.to_string(),
        })?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(TlsConnector::from(Arc::new(config)))
}

/// The server's own text of a NO or BAD reply, which async-imap wraps in
/// the debug form of its response (`no response: code: None, info:
/// Some("[AUTHENTICATIONFAILED] Authentication failed.")`).
fn server_words(error: &str) -> String {
    match error.split_once("Some(\"") {
        Some((_, rest)) => rest
            .rsplit_once("\")")
            .map_or(rest, |(words, _)| words)
            .replace("\\\"", "\""),
        None => error.to_string(),
    }
}

/// `1,2,5` for a FETCH or MOVE.
fn uid_set(uids: &[u32]) -> String {
    uids.iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uid_sets_are_comma_lists() {
        assert_eq!(uid_set(&[1, 5, 7]), "1,5,7");
    }

    #[test]
    fn xoauth2_sends_the_token_once_then_an_empty_answer() {
        use async_imap::Authenticator as _;
        let mut sasl = XOAuth2 {
            user: "me@gmail.com",
            token: "ya29.token",
            sent: false,
        };
        assert_eq!(
            sasl.process(b""),
            b"user=me@gmail.com\x01auth=Bearer ya29.token\x01\x01"
        );
        assert!(sasl.process(b"{\"status\":\"400\"}").is_empty());
    }

    #[test]
    fn a_refusal_reads_as_the_server_wrote_it() {
        assert_eq!(
            server_words(
                "no response: code: None, info: Some(\"[AUTHENTICATIONFAILED] Authentication failed.\")"
            ),
            "[AUTHENTICATIONFAILED] Authentication failed."
        );
        assert_eq!(
            server_words("no response: outcome: Outcome { code: None, information: Some(\"Mailbox doesn't exist: Nope\") }"),
            "Mailbox doesn't exist: Nope"
        );
        assert_eq!(server_words("connection lost"), "connection lost");
    }
}
