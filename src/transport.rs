//! Transports: SMTP through lettre's connection commands and `.eml` files,
//! behind one small trait so that the engine can be driven by a recording
//! double in tests.
//!
//! The SMTP side drives each transaction step by step (MAIL, RCPT, DATA,
//! the message) rather than through lettre's one-call `send`, because what
//! a lost connection means depends on how far the transaction got (SPEC §8):
//! before the message's final "." the server cannot have it and the
//! recipient is retried; after it, the outcome is unknown.

use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use lettre::transport::smtp::authentication::{Credentials, Mechanism};
#[allow(deprecated)]
use lettre::transport::smtp::client::AsyncNetworkStream;
use lettre::transport::smtp::client::{
    AsyncSmtpConnection, AsyncTokioStream, Certificate, TlsParameters,
};
use lettre::transport::smtp::commands::{Data, Ehlo, Mail, Rcpt, Rset};
use lettre::transport::smtp::extension::{ClientId, Extension, MailBodyParameter, MailParameter};
use lettre::transport::smtp::response::Response;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::campaign::{Campaign, PasswordSource, SmtpConfig, TlsMode, TransportConfig};
use crate::error::input_error;
use crate::message::Outgoing;
use crate::reply::{Origin, Reply};

/// Something that hands a message to a server. `Ok` is the server's
/// acceptance; `Err` is its refusal, or a local failure with no reply code.
pub trait Transport: Send + Sync + 'static {
    /// Makes sure a connection is open and logged in, so that an unreachable
    /// server or a refused login is found before a recipient is claimed.
    /// Cheap when a connection is ready.
    fn connect(&self) -> impl Future<Output = Result<(), Reply>> + Send;
    /// Whether a connection is open and ready, so that sending needs no
    /// new login.
    fn has_connection(&self) -> bool {
        false
    }
    /// Sends the message of file row `row`.
    fn send(
        &self,
        row: u64,
        message: &Outgoing,
    ) -> impl Future<Output = Result<Reply, Reply>> + Send;
    /// Closes pooled connections politely (QUIT).
    fn shutdown(&self) -> impl Future<Output = ()> + Send;
}

/// Either real transport, chosen by the campaign file.
pub enum AnyTransport {
    Smtp(Box<Smtp>),
    File(FileOut),
}

impl AnyTransport {
    pub async fn new(campaign: &Campaign) -> Result<AnyTransport> {
        Ok(match &campaign.transport {
            TransportConfig::Smtp(cfg) => AnyTransport::Smtp(Box::new(
                Smtp::new(cfg)
                    .await
                    .with_context(|| campaign.path.display().to_string())?,
            )),
            TransportConfig::File { dir } => AnyTransport::File(FileOut::new(dir.clone()).await?),
        })
    }

    /// The largest message the server takes, as its EHLO SIZE says, once
    /// a connection was made. (Every message is also bounded at 25 MB,
    /// Gmail's limit, when it is built.)
    pub fn size_limit(&self) -> Option<u64> {
        match self {
            AnyTransport::Smtp(t) => t.size_limit(),
            AnyTransport::File(_) => None,
        }
    }
}

impl Transport for AnyTransport {
    async fn connect(&self) -> Result<(), Reply> {
        match self {
            AnyTransport::Smtp(t) => t.connect().await,
            AnyTransport::File(t) => t.connect().await,
        }
    }

    fn has_connection(&self) -> bool {
        match self {
            AnyTransport::Smtp(t) => t.has_connection(),
            AnyTransport::File(t) => t.has_connection(),
        }
    }

    async fn send(&self, row: u64, message: &Outgoing) -> Result<Reply, Reply> {
        match self {
            AnyTransport::Smtp(t) => t.send(row, message).await,
            AnyTransport::File(t) => t.send(row, message).await,
        }
    }

    async fn shutdown(&self) {
        match self {
            AnyTransport::Smtp(t) => t.shutdown().await,
            AnyTransport::File(t) => t.shutdown().await,
        }
    }
}

/// Whether `host` is one of Gmail's submission servers.
pub fn is_gmail(host: &str) -> bool {
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    host == "smtp.gmail.com" || host == "smtp-relay.gmail.com"
}

/// SMTP submission, one reused connection per sending worker (the engine
/// runs `connections` of them), so that the account logs in once per
/// connection, not once per message.
///
/// Connections are opened here rather than by lettre's pool so that the
/// socket gets `TCP_NODELAY` (lettre writes the message and the final `.`
/// separately, and with Nagle's algorithm that second write waits for a
/// delayed ACK, about 40 ms per message), so that a TCP failure is told
/// apart from a TLS one, and so that the stream can be watched (see
/// [`Watched`]).
pub struct Smtp {
    host: String,
    port: u16,
    tls: Option<(TlsMode, TlsParameters)>,
    credentials: Mutex<Option<Credentials>>,
    /// With XOAUTH2, the user and where a fresh access token comes from.
    token: Option<Box<(String, PasswordSource)>>,
    /// The EHLO name; `None`: an address literal of the local address.
    hello: Option<ClientId>,
    timeout: Duration,
    idle: Mutex<Vec<Conn>>,
    /// What the server's EHLO offers, learnt on the first connection.
    advertised: OnceLock<Advertised>,
}

/// What a server's EHLO reply offers beyond what lettre keeps.
#[derive(Debug, Clone, Copy)]
struct Advertised {
    /// SIZE (RFC 1870); 0: no limit.
    size: u64,
    /// PIPELINING (RFC 2920): MAIL, RCPT and DATA go in one write and
    /// their replies are read after it, one round trip instead of three.
    pipelining: bool,
}

/// An open, logged-in connection.
struct Conn {
    smtp: AsyncSmtpConnection,
    /// How many times lettre has read from the socket.
    reads: Arc<AtomicU64>,
    since: Instant,
}

/// Idle connections older than this are closed instead of reused: servers
/// drop quiet clients, and a dead connection would cost a reconnection.
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// How a transaction failed: the reply, and whether it failed on its very
/// first command because the server had closed the connection.
struct Failed {
    reply: Reply,
    at_mail: bool,
    /// The connection is out of step with the server and cannot be reset.
    broken: bool,
}

impl Smtp {
    pub async fn new(cfg: &SmtpConfig) -> Result<Smtp> {
        let tls = if cfg.tls == TlsMode::None {
            None
        } else {
            let mut params = TlsParameters::builder(cfg.host.clone());
            if let Some(ca) = &cfg.ca_file {
                // A certificate bundle is a few hundred kilobytes at most.
                let pem = crate::bounded::read(ca, 4 * 1024 * 1024).map_err(|e| {
                    input_error(format!("cannot read ca_file {}: {e}", ca.display()))
                })?;
                let cert = Certificate::from_pem(&pem).map_err(|e| {
                    input_error(format!(
                        "ca_file {} is not a PEM certificate: {e}",
                        ca.display()
                    ))
                })?;
                params = params.add_root_certificate(cert);
            }
            Some((cfg.tls, params.build_rustls().context("setting up TLS")?))
        };
        let credentials = match &cfg.username {
            Some(user) => Some(Credentials::new(
                user.clone(),
                cfg.password.read().await?.expose().to_string(),
            )),
            None => None,
        };
        let hello = match &cfg.helo_name {
            Some(name) => Some(name.clone()),
            None => fully_qualified_name().map(ClientId::Domain),
        };
        Ok(Smtp {
            host: cfg.host.clone(),
            port: cfg.port,
            tls,
            credentials: Mutex::new(credentials),
            token: match (&cfg.username, cfg.xoauth2) {
                (Some(user), true) => Some(Box::new((user.clone(), cfg.password.clone()))),
                _ => None,
            },
            hello,
            timeout: cfg.timeout,
            idle: Mutex::new(Vec::new()),
            advertised: OnceLock::new(),
        })
    }

    fn size_limit(&self) -> Option<u64> {
        self.advertised.get().map(|a| a.size).filter(|s| *s > 0)
    }

    fn take_idle(&self) -> Option<Conn> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        while let Some(conn) = idle.pop() {
            if conn.since.elapsed() < IDLE_TIMEOUT {
                return Some(conn);
            }
            // Too old to trust; dropping it closes the socket.
        }
        None
    }

    /// Keeps `conn` for the next message; `since` is when the server last
    /// heard from us on it (only traffic keeps a connection alive).
    fn put_idle(&self, conn: Conn) {
        self.idle
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(conn);
    }

    /// `step` bounded by the timeout: lettre's own covers only the TCP
    /// connect, and a stalled read or write must not hang the run.
    async fn bounded<T>(
        &self,
        what: &str,
        step: impl Future<Output = std::result::Result<T, lettre::transport::smtp::Error>>,
    ) -> std::result::Result<std::result::Result<T, lettre::transport::smtp::Error>, Reply> {
        tokio::time::timeout(self.timeout, step).await.map_err(|_| {
            Reply::local(
                Origin::Lost,
                format!(
                    "no answer to {what} within {}",
                    humantime::format_duration(self.timeout)
                ),
            )
        })
    }

    /// Opens and authenticates a connection. An OAuth 2 access token lives
    /// about an hour: when the server refuses it, a fresh one is asked for
    /// and the login tried once more.
    async fn open(&self) -> std::result::Result<Conn, Reply> {
        match self.open_once().await {
            Err(reply) if self.token.is_some() && reply.origin == Origin::Login => {
                self.refresh_token().await?;
                self.open_once().await
            }
            result => result,
        }
    }

    async fn refresh_token(&self) -> std::result::Result<(), Reply> {
        let Some((user, source)) = self.token.as_deref() else {
            return Ok(());
        };
        let token = source
            .read()
            .await
            .map_err(|e| Reply::local(Origin::Login, format!("token_command: {e:#}")))?;
        *self.credentials.lock().unwrap_or_else(|e| e.into_inner()) =
            Some(Credentials::new(user.clone(), token.expose().to_string()));
        Ok(())
    }

    async fn open_once(&self) -> std::result::Result<Conn, Reply> {
        let unreachable = |e: &dyn std::fmt::Display| {
            Reply::local(
                Origin::Unreachable,
                format!("connecting to {}:{}: {e}", self.host, self.port),
            )
        };
        let tcp = tokio::time::timeout(
            self.timeout,
            TcpStream::connect((self.host.as_str(), self.port)),
        )
        .await
        .map_err(|_| unreachable(&"timed out"))?
        .map_err(|e| unreachable(&e))?;
        tcp.set_nodelay(true).map_err(|e| unreachable(&e))?;
        let hello = match &self.hello {
            Some(name) => name.clone(),
            None => address_literal(tcp.local_addr().map_err(|e| unreachable(&e))?),
        };
        let reads = Arc::new(AtomicU64::new(0));
        let watched = Box::new(Watched {
            tcp,
            reads: reads.clone(),
        });
        // Until the greeting, a silent or closing peer is an unreachable
        // server, not a lost transaction.
        let as_unreachable = |mut r: Reply| {
            if r.origin == Origin::Lost {
                r.origin = Origin::Unreachable;
            }
            r
        };
        let stream: Box<dyn AsyncTokioStream> = match &self.tls {
            Some((TlsMode::Implicit, params)) => {
                #[allow(deprecated)]
                let mut stream = AsyncNetworkStream::use_existing_tokio1(watched);
                self.bounded("the TLS handshake", stream.upgrade_tls(params.clone()))
                    .await
                    .map_err(as_unreachable)?
                    .map_err(|e| login_failure(&e, "the TLS handshake"))?;
                Box::new(Implicit(stream))
            }
            _ => watched,
        };
        let mut smtp = self
            .bounded(
                "the greeting",
                AsyncSmtpConnection::connect_with_transport(stream, &hello),
            )
            .await
            .map_err(as_unreachable)?
            .map_err(|e| login_failure(&e, "the greeting"))?;
        if let Some((TlsMode::StartTls, params)) = &self.tls {
            // STARTTLS is required: never fall back to plain text.
            self.bounded("STARTTLS", smtp.starttls(params.clone(), &hello))
                .await
                .map_err(as_unreachable)?
                .map_err(|e| login_failure(&e, "STARTTLS"))?;
        }
        if self.advertised.get().is_none() {
            // lettre keeps no SIZE from its EHLO: ask once more, before
            // AUTH, on the first connection only.
            let ehlo = self
                .bounded("EHLO", smtp.command(Ehlo::new(hello.clone())))
                .await
                .map_err(as_unreachable)?
                .map_err(|e| login_failure(&e, "EHLO"))?;
            let _ = self.advertised.set(Advertised {
                size: advertised_size(&ehlo).unwrap_or(0),
                pipelining: offers(&ehlo, "PIPELINING"),
            });
        }
        let credentials = self
            .credentials
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if let Some(credentials) = &credentials {
            let mechanisms: &[Mechanism] = if self.token.is_some() {
                &[Mechanism::Xoauth2]
            } else {
                &[Mechanism::Plain, Mechanism::Login]
            };
            self.bounded("AUTH", smtp.auth(mechanisms, credentials))
                .await
                .map_err(as_unreachable)?
                .map_err(|e| login_failure(&e, "AUTH"))?;
        }
        Ok(Conn {
            smtp,
            reads,
            since: Instant::now(),
        })
    }

    /// One transaction on an open connection. The connection is still
    /// usable afterwards only when this returns `Ok` or a server reply to
    /// MAIL, RCPT or DATA (the caller resets it).
    async fn transaction(
        &self,
        conn: &mut Conn,
        message: &Outgoing,
    ) -> std::result::Result<Reply, Failed> {
        let envelope = &message.envelope;
        let mut options = Vec::new();
        let non_ascii = envelope
            .to()
            .iter()
            .chain(envelope.from())
            .any(|a| !AsRef::<str>::as_ref(a).is_ascii());
        let server = conn.smtp.server_info();
        if non_ascii {
            if !server.supports_feature(Extension::SmtpUtfEight) {
                return Err(Failed::later(Reply::local(
                    Origin::Server,
                    "the address is not ASCII and the server does not offer SMTPUTF8",
                )));
            }
            options.push(MailParameter::SmtpUtfEight);
        }
        if !message.bytes.is_ascii() {
            if !server.supports_feature(Extension::EightBitMime) {
                return Err(Failed::later(Reply::local(
                    Origin::Server,
                    "the message is not ASCII and the server does not offer 8BITMIME",
                )));
            }
            options.push(MailParameter::Body(MailBodyParameter::EightBitMime));
        }
        let mail = Mail::new(envelope.from().cloned(), options);
        let rcpts: Vec<Rcpt> = envelope
            .to()
            .iter()
            .map(|to| Rcpt::new(to.clone(), vec![]))
            .collect();
        if self.advertised.get().is_some_and(|a| a.pipelining) {
            self.envelope_pipelined(conn, mail, &rcpts).await?;
        } else {
            self.envelope_step_by_step(conn, mail, &rcpts).await?;
        }
        // lettre reads the reply only once the message and its final "."
        // have been flushed to the socket: a read after this mark means the
        // server may have the whole message.
        let mark = conn.reads.load(Ordering::SeqCst);
        let allowed = self
            .timeout
            .saturating_mul(1 + u32::try_from(message.bytes.len() / 1_000_000).unwrap_or(u32::MAX));
        let sent = tokio::time::timeout(allowed, conn.smtp.message(&message.bytes)).await;
        let after_dot = conn.reads.load(Ordering::SeqCst) > mark;
        let origin = if after_dot {
            Origin::AfterData
        } else {
            Origin::Lost
        };
        match sent {
            Ok(Ok(response)) => Ok(reply_of(&response)),
            Ok(Err(e)) => Err(Failed::later(transaction_failure(&e, origin))),
            Err(_) => Err(Failed::later(Reply::local(
                origin,
                if after_dot {
                    format!(
                        "no reply to the message within {}",
                        humantime::format_duration(allowed)
                    )
                } else {
                    format!(
                        "the message could not be written within {}",
                        humantime::format_duration(allowed)
                    )
                },
            ))),
        }
    }

    /// The reply to one envelope command, bounded by the timeout; no
    /// reply at all is a lost connection.
    async fn reply_to(
        &self,
        what: &str,
        step: impl Future<Output = std::result::Result<Response, lettre::transport::smtp::Error>>,
    ) -> std::result::Result<Response, Reply> {
        self.bounded(what, step)
            .await
            .and_then(|r| r.map_err(|e| transaction_failure(&e, Origin::Lost)))
    }

    /// MAIL, each RCPT and DATA, one round trip each.
    async fn envelope_step_by_step(
        &self,
        conn: &mut Conn,
        mail: Mail,
        rcpts: &[Rcpt],
    ) -> std::result::Result<(), Failed> {
        self.reply_to("MAIL FROM", conn.smtp.command(mail))
            .await
            .map_err(|reply| Failed::at(0, reply))?;
        for rcpt in rcpts {
            self.reply_to("RCPT TO", conn.smtp.command(rcpt))
                .await
                .map_err(|reply| Failed::at(1, reply))?;
        }
        self.reply_to("DATA", conn.smtp.command(Data))
            .await
            .map_err(|reply| Failed::at(1, reply))?;
        Ok(())
    }

    /// MAIL, each RCPT and DATA in one write, then their replies in order
    /// (RFC 2920): one round trip instead of two or more. Every reply is
    /// read, so that a refused MAIL or RCPT leaves the connection in step
    /// to be reset and reused.
    async fn envelope_pipelined(
        &self,
        conn: &mut Conn,
        mail: Mail,
        rcpts: &[Rcpt],
    ) -> std::result::Result<(), Failed> {
        let mut batch = mail.to_string();
        for rcpt in rcpts {
            batch.push_str(&rcpt.to_string());
        }
        batch.push_str(&Data.to_string());
        let replies = rcpts.len() + 2;
        let mut refused: Option<Failed> = None;
        for step in 0..replies {
            let what = match step {
                0 => "MAIL FROM",
                s if s + 1 == replies => "DATA",
                _ => "RCPT TO",
            };
            let reply = if step == 0 {
                // lettre writes the whole batch as one command and reads
                // the first reply.
                self.reply_to(what, conn.smtp.command(&batch)).await
            } else {
                self.reply_to(what, conn.smtp.read_response()).await
            };
            match reply {
                Ok(_) if step + 1 == replies => {
                    if let Some(mut failed) = refused {
                        // DATA was taken although MAIL or a RCPT was not: the
                        // server waits for a message that will not come, and
                        // the connection cannot be reset.
                        failed.broken = true;
                        return Err(failed);
                    }
                }
                Ok(_) => {}
                Err(reply) if reply.code.is_none() => {
                    // No reply: the connection is gone.
                    return Err(match refused {
                        Some(mut failed) => {
                            failed.broken = true;
                            failed
                        }
                        None => Failed::at(step, reply),
                    });
                }
                Err(reply) => {
                    refused.get_or_insert(Failed::at(step, reply));
                }
            }
        }
        refused.map_or(Ok(()), Err)
    }
}

impl Failed {
    /// A failure of the envelope's `step`th command (0: MAIL).
    fn at(step: usize, reply: Reply) -> Failed {
        // No answer to MAIL, or 421: the server had closed (or is closing)
        // the connection, typically one left idle.
        let at_mail = step == 0 && (reply.code.is_none() || reply.code == Some(421));
        Failed {
            reply,
            at_mail,
            broken: false,
        }
    }

    /// A failure past MAIL (or before the envelope was sent).
    fn later(reply: Reply) -> Failed {
        Failed::at(1, reply)
    }
}

impl Transport for Smtp {
    fn has_connection(&self) -> bool {
        self.idle
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .any(|c| c.since.elapsed() < IDLE_TIMEOUT)
    }

    async fn connect(&self) -> Result<(), Reply> {
        let mut idle = self.take_idle();
        if idle.is_none() {
            idle = Some(self.open().await?);
        }
        if let Some(conn) = idle {
            self.put_idle(conn);
        }
        Ok(())
    }

    async fn send(&self, _row: u64, message: &Outgoing) -> Result<Reply, Reply> {
        let (mut conn, reused) = match self.take_idle() {
            Some(conn) => (conn, true),
            None => (self.open().await?, false),
        };
        let mut result = self.transaction(&mut conn, message).await;
        if let Err(Failed { at_mail: true, .. }) = &result {
            if reused {
                // The server closed the idle connection; nothing of the
                // message was sent: try once more on a new one.
                conn = self.open().await?;
                result = self.transaction(&mut conn, message).await;
            }
        }
        match result {
            Ok(reply) => {
                conn.since = Instant::now();
                self.put_idle(conn);
                Ok(reply)
            }
            Err(Failed { reply, broken, .. }) => {
                if !broken && reply.origin == Origin::Server && reply.code.is_some() {
                    // A refused MAIL, RCPT or message leaves the
                    // connection usable once reset.
                    if let Ok(Ok(_)) = self.bounded("RSET", conn.smtp.command(Rset)).await {
                        conn.since = Instant::now();
                        self.put_idle(conn);
                    }
                }
                Err(reply)
            }
        }
    }

    async fn shutdown(&self) {
        let idle = std::mem::take(&mut *self.idle.lock().unwrap_or_else(|e| e.into_inner()));
        for mut conn in idle {
            let _ = tokio::time::timeout(self.timeout, conn.smtp.quit()).await;
        }
    }
}

fn reply_of(response: &Response) -> Reply {
    let text: Vec<&str> = response.message().collect();
    Reply::new(Some(u16::from(response.code())), &text.join(" "))
}

/// The SIZE keyword of an EHLO reply (RFC 1870).
fn advertised_size(ehlo: &Response) -> Option<u64> {
    ehlo.message().find_map(|line| {
        let mut words = line.split_whitespace();
        match (words.next(), words.next()) {
            (Some(k), Some(n)) if k.eq_ignore_ascii_case("SIZE") => n.parse().ok(),
            _ => None,
        }
    })
}

/// Whether an EHLO reply offers the extension `keyword`.
fn offers(ehlo: &Response, keyword: &str) -> bool {
    ehlo.message().any(|line| {
        line.split_whitespace()
            .next()
            .is_some_and(|k| k.eq_ignore_ascii_case(keyword))
    })
}

/// A lettre error in words: its innermost cause, which says what happened
/// (lettre's own layers only repeat "Connection error").
fn error_text(err: &lettre::transport::smtp::Error) -> String {
    let mut text = err.to_string();
    let mut source = std::error::Error::source(err);
    while let Some(s) = source {
        let part = s.to_string();
        if !part.trim().is_empty() {
            text = part;
        }
        source = s.source();
    }
    text
}

/// The server's reply carried by a lettre error, if it has one.
fn server_reply(err: &lettre::transport::smtp::Error, origin: Origin) -> Option<Reply> {
    let code = err.status()?;
    let text = std::error::Error::source(err)
        .map(|s| s.to_string())
        .unwrap_or_default();
    let mut reply = Reply::new(Some(u16::from(code)), &text);
    reply.origin = origin;
    Some(reply)
}

/// Whether the error is TLS refusing what it got (a certificate, a
/// protocol, a plain-text server), as opposed to a connection cut.
fn is_tls_refusal(err: &lettre::transport::smtp::Error) -> bool {
    if err.is_tls() {
        return true;
    }
    let mut source = std::error::Error::source(err);
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<io::Error>() {
            return io.kind() == io::ErrorKind::InvalidData;
        }
        source = s.source();
    }
    false
}

/// A failure while opening a connection: the server's refusal, TLS, or a
/// connection that went away (the server is unreachable).
fn login_failure(err: &lettre::transport::smtp::Error, step: &str) -> Reply {
    if let Some(reply) = server_reply(err, Origin::Login) {
        return reply;
    }
    let text = format!("{step}: {}", error_text(err));
    if is_tls_refusal(err) {
        Reply::local(Origin::Tls, text)
    } else if err.is_client() && step == "STARTTLS" {
        // STARTTLS is required and this server does not offer it.
        Reply::local(Origin::Tls, text)
    } else if err.is_client() {
        // lettre refuses locally: no STARTTLS offered, no usable AUTH mechanism.
        Reply::local(Origin::Login, text)
    } else {
        Reply::local(Origin::Unreachable, text)
    }
}

/// A failure inside a transaction: the server's reply, or the connection
/// lost at the point `origin` says.
fn transaction_failure(err: &lettre::transport::smtp::Error, origin: Origin) -> Reply {
    server_reply(err, Origin::Server).unwrap_or_else(|| {
        let text = match origin {
            Origin::AfterData => format!(
                "connection lost after the message was sent, before the server's reply ({})",
                error_text(err)
            ),
            _ => format!("connection lost ({})", error_text(err)),
        };
        Reply::local(origin, text)
    })
}

/// The EHLO name when no FQDN is known: the connection's own address
/// (RFC 5321 §4.1.4).
fn address_literal(local: SocketAddr) -> ClientId {
    match local.ip() {
        IpAddr::V4(ip) => ClientId::Ipv4(ip),
        IpAddr::V6(ip) => match ip.to_ipv4_mapped() {
            Some(v4) => ClientId::Ipv4(v4),
            None => ClientId::Ipv6(ip),
        },
    }
}

/// This machine's fully qualified domain name, as `hostname -f` finds it:
/// the host name through the resolver's canonical name. `None` when no
/// name with a dot is known (servers score a bare `EHLO vm` as spam).
pub fn fully_qualified_name() -> Option<String> {
    let host = dns_lookup::get_hostname().ok()?;
    let dotted = |n: &str| n.contains('.') && !n.ends_with(".localdomain") && n != "localhost.";
    #[cfg(unix)]
    {
        let hints = dns_lookup::AddrInfoHints {
            flags: libc::AI_CANONNAME,
            address: 0,
            socktype: libc::SOCK_STREAM,
            protocol: 0,
        };
        if let Ok(found) = dns_lookup::getaddrinfo(Some(&host), None, Some(hints)) {
            for info in found.flatten() {
                if let Some(name) = info.canonname.filter(|n| dotted(n)) {
                    return Some(name.trim_end_matches('.').to_string());
                }
            }
        }
    }
    dotted(&host).then(|| host.trim_end_matches('.').to_string())
}

/// The TCP stream under lettre (and under TLS), counting reads: lettre
/// reads the reply to a message only after the message and its final "."
/// were flushed to the socket, so a read after a mark tells that the
/// server may have the whole message.
#[derive(Debug)]
struct Watched {
    tcp: TcpStream,
    reads: Arc<AtomicU64>,
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        Pin::new(&mut self.tcp).poll_read(cx, buf)
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.tcp).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}

impl AsyncTokioStream for Watched {
    fn peer_addr(&self) -> io::Result<SocketAddr> {
        self.tcp.peer_addr()
    }
}

/// A stream already wrapped in TLS (implicit TLS, port 465), handed to
/// lettre as if it were plain TCP so that it reads the greeting through it.
#[allow(deprecated)]
#[derive(Debug)]
struct Implicit(AsyncNetworkStream);

impl AsyncRead for Implicit {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        use futures_util::io::AsyncRead as _;
        let unfilled = buf.initialize_unfilled();
        match Pin::new(&mut self.0).poll_read(cx, unfilled) {
            Poll::Ready(Ok(n)) => {
                buf.advance(n);
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl AsyncWrite for Implicit {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        use futures_util::io::AsyncWrite as _;
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        use futures_util::io::AsyncWrite as _;
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        use futures_util::io::AsyncWrite as _;
        Pin::new(&mut self.0).poll_close(cx)
    }
}

impl AsyncTokioStream for Implicit {
    fn peer_addr(&self) -> io::Result<SocketAddr> {
        #[allow(deprecated)]
        self.0.peer_addr()
    }
}

/// Writes each message as one `.eml` file named after its row and address
/// (`000017-ada@example.com.eml`), so that people can find a recipient's.
pub struct FileOut {
    dir: PathBuf,
}

impl FileOut {
    pub async fn new(dir: PathBuf) -> Result<FileOut> {
        tokio::fs::create_dir_all(&dir)
            .await
            .with_context(|| format!("creating the outbox folder {}", dir.display()))?;
        Ok(FileOut { dir })
    }
}

/// The file name of row `row`'s message to `address`, `n`th of its name:
/// the address reduced to characters safe in a file name on any system.
fn eml_name(row: u64, address: &str, n: u32) -> String {
    let safe: String = address
        .chars()
        .take(200)
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '@' | '.' | '-' | '_' | '+') {
                c
            } else {
                '_'
            }
        })
        .collect();
    // A leading dot would hide the file; ".." is no path here, but looks like one.
    let safe = safe.trim_start_matches('.');
    match n {
        1 => format!("{row:06}-{safe}.eml"),
        n => format!("{row:06}-{safe}-{n}.eml"),
    }
}

impl Transport for FileOut {
    async fn connect(&self) -> Result<(), Reply> {
        Ok(())
    }

    fn has_connection(&self) -> bool {
        true
    }

    async fn send(&self, row: u64, message: &Outgoing) -> Result<Reply, Reply> {
        use tokio::io::AsyncWriteExt as _;
        let address = message
            .envelope
            .to()
            .first()
            .map(|a| a.to_string())
            .unwrap_or_default();
        let failed = |path: &std::path::Path, e: io::Error| {
            Reply::local(Origin::Lost, format!("writing {}: {e}", path.display()))
        };
        // A message sent again (--resend-unknown, a new rehearsal) gets a
        // name of its own; the earlier file is never overwritten.
        let mut n = 1;
        let (path, mut file) = loop {
            let path = self.dir.join(eml_name(row, &address, n));
            match tokio::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
                .await
            {
                Ok(file) => break (path, file),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists && n < 10_000 => n += 1,
                Err(e) => return Err(failed(&path, e)),
            }
        };
        let written = async {
            file.write_all(&message.bytes).await?;
            file.flush().await
        };
        match written.await {
            Ok(()) => Ok(Reply::new(
                Some(250),
                &format!("written to {}", path.display()),
            )),
            Err(e) => Err(failed(&path, e)),
        }
    }

    async fn shutdown(&self) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gmail_hosts_are_known_case_and_dot_aside() {
        assert!(is_gmail("smtp.gmail.com"));
        assert!(is_gmail("SMTP-RELAY.gmail.com."));
        assert!(!is_gmail("mail.example.com"));
    }

    #[test]
    fn address_literal_of_the_local_address() {
        let literal = address_literal("127.0.0.1:5000".parse().unwrap());
        assert_eq!(literal.to_string(), "[127.0.0.1]");
        let literal = address_literal("[::1]:5000".parse().unwrap());
        assert_eq!(literal.to_string(), "[IPv6:::1]");
    }

    #[test]
    fn file_names_show_row_and_address_and_never_a_path() {
        assert_eq!(
            eml_name(17, "ada@example.com", 1),
            "000017-ada@example.com.eml"
        );
        assert_eq!(
            eml_name(17, "ada@example.com", 2),
            "000017-ada@example.com-2.eml"
        );
        let odd = eml_name(3, "../x/\\y\"z@ex:ample.com", 1);
        assert!(
            !odd.contains('/') && !odd.contains('\\') && !odd.contains(':'),
            "{odd}"
        );
        assert!(
            odd.starts_with("000003-") && !odd[7..].starts_with('.'),
            "{odd}"
        );
    }

    #[test]
    fn a_found_name_has_a_dot() {
        if let Some(name) = fully_qualified_name() {
            assert!(name.contains('.') && !name.ends_with('.'), "{name}");
        }
    }
}
