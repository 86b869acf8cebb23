//! Transports: lettre's pooled async SMTP client and lettre's file
//! transport, behind one small trait so that the engine can be driven by a
//! recording double in tests.

use std::future::Future;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use lettre::transport::smtp::authentication::{Credentials, Mechanism};
use lettre::transport::smtp::client::{AsyncSmtpConnection, Certificate, TlsParameters};
use lettre::transport::smtp::extension::ClientId;
use lettre::{AsyncFileTransport, AsyncTransport, Tokio1Executor};
use tokio::net::TcpStream;
use tokio::sync::Mutex;

use crate::campaign::{Campaign, SmtpConfig, TlsMode, TransportConfig};
use crate::error::input_error;
use crate::message::Outgoing;
use crate::reply::{Origin, Reply};

/// Something that hands a message to a server. `Ok` is the server's
/// acceptance; `Err` is its refusal, or a local failure with no reply code.
pub trait Transport: Send + Sync + 'static {
    fn send(&self, message: &Outgoing) -> impl Future<Output = Result<Reply, Reply>> + Send;
    /// Closes pooled connections politely (QUIT).
    fn shutdown(&self) -> impl Future<Output = ()> + Send;
}

/// Either real transport, chosen by the campaign file.
pub enum AnyTransport {
    Smtp(Smtp),
    File(FileOut),
}

impl AnyTransport {
    pub async fn new(campaign: &Campaign) -> Result<AnyTransport> {
        Ok(match &campaign.transport {
            TransportConfig::Smtp(cfg) => AnyTransport::Smtp(
                Smtp::new(cfg)
                    .await
                    .with_context(|| campaign.path.display().to_string())?,
            ),
            TransportConfig::File { dir } => AnyTransport::File(FileOut::new(dir.clone()).await?),
        })
    }
}

impl Transport for AnyTransport {
    async fn send(&self, message: &Outgoing) -> Result<Reply, Reply> {
        match self {
            AnyTransport::Smtp(t) => t.send(message).await,
            AnyTransport::File(t) => t.send(message).await,
        }
    }

    async fn shutdown(&self) {
        match self {
            AnyTransport::Smtp(t) => t.shutdown().await,
            AnyTransport::File(t) => t.shutdown().await,
        }
    }
}

/// SMTP submission with lettre's SMTP client, one reused connection per
/// sending worker (the engine runs `connections` of them), so that the
/// account logs in once per connection, not once per message.
///
/// Connections are opened here rather than by lettre's pool so that the
/// socket gets `TCP_NODELAY`: lettre writes the message and the final
/// `.` separately, and with Nagle's algorithm that second write waits for a
/// delayed ACK, about 40 ms per message. (Implicit TLS on port 465 still
/// goes through lettre's own connect, which offers no such option.)
pub struct Smtp {
    host: String,
    port: u16,
    tls: Option<(TlsMode, TlsParameters)>,
    credentials: Option<Credentials>,
    hello: ClientId,
    timeout: Duration,
    idle: Mutex<Vec<(AsyncSmtpConnection, Instant)>>,
}

/// Idle connections older than this are closed instead of reused: servers
/// drop quiet clients, and a dead connection would cost a recipient an attempt.
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

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
        Ok(Smtp {
            host: cfg.host.clone(),
            port: cfg.port,
            tls,
            credentials,
            hello: ClientId::default(),
            timeout: cfg.timeout,
            idle: Mutex::new(Vec::new()),
        })
    }

    /// Opens and authenticates a connection.
    async fn connect(&self) -> std::result::Result<AsyncSmtpConnection, Reply> {
        let failed = |e: lettre::transport::smtp::Error| smtp_error_reply(&e, true);
        let mut conn = match &self.tls {
            Some((TlsMode::Implicit, params)) => AsyncSmtpConnection::connect_tokio1(
                (self.host.as_str(), self.port),
                Some(self.timeout),
                &self.hello,
                Some(params.clone()),
                None,
            )
            .await
            .map_err(failed)?,
            _ => {
                let unreachable = |e: std::io::Error| {
                    Reply::local(
                        Origin::Unreachable,
                        format!("connecting to {}:{}: {e}", self.host, self.port),
                    )
                };
                let stream = tokio::time::timeout(
                    self.timeout,
                    TcpStream::connect((self.host.as_str(), self.port)),
                )
                .await
                .map_err(|_| unreachable(std::io::ErrorKind::TimedOut.into()))?
                .map_err(unreachable)?;
                stream.set_nodelay(true).map_err(unreachable)?;
                let mut conn =
                    AsyncSmtpConnection::connect_with_transport(Box::new(stream), &self.hello)
                        .await
                        .map_err(failed)?;
                if let Some((_, params)) = &self.tls {
                    // STARTTLS is required: never fall back to plain text.
                    conn.starttls(params.clone(), &self.hello)
                        .await
                        .map_err(failed)?;
                }
                conn
            }
        };
        if let Some(credentials) = &self.credentials {
            conn.auth(&[Mechanism::Plain, Mechanism::Login], credentials)
                .await
                .map_err(failed)?;
        }
        Ok(conn)
    }

    async fn transaction(&self, message: &Outgoing) -> std::result::Result<Reply, Reply> {
        let idle = self.idle.lock().await.pop();
        let mut conn = match idle {
            Some((conn, since)) if since.elapsed() < IDLE_TIMEOUT => conn,
            Some((mut stale, _)) => {
                let _ = tokio::time::timeout(Duration::from_secs(1), stale.quit()).await;
                self.connect().await?
            }
            None => self.connect().await?,
        };
        match conn.send(&message.envelope, &message.bytes).await {
            Ok(response) => {
                self.idle.lock().await.push((conn, Instant::now()));
                let text: Vec<&str> = response.message().collect();
                Ok(Reply::new(
                    Some(u16::from(response.code())),
                    &text.join(" "),
                ))
            }
            // Any error leaves the connection in an unknown state: drop it.
            Err(e) => Err(smtp_error_reply(&e, false)),
        }
    }
}

impl Transport for Smtp {
    async fn send(&self, message: &Outgoing) -> Result<Reply, Reply> {
        // lettre's timeout covers only the connect; a stalled read or write
        // must not hang the run, so the whole transaction is bounded here.
        match tokio::time::timeout(self.timeout.saturating_mul(2), self.transaction(message)).await
        {
            Ok(result) => result,
            Err(_) => Err(Reply::local(
                Origin::Lost,
                format!(
                    "no reply within {}",
                    humantime::format_duration(self.timeout.saturating_mul(2))
                ),
            )),
        }
    }

    async fn shutdown(&self) {
        let idle = std::mem::take(&mut *self.idle.lock().await);
        for (mut conn, _) in idle {
            let _ = tokio::time::timeout(self.timeout, conn.quit()).await;
        }
    }
}

/// A lettre error as a [`Reply`]. `connecting`: it happened while the
/// connection was being opened, before any transaction could start.
fn smtp_error_reply(err: &lettre::transport::smtp::Error, connecting: bool) -> Reply {
    if let Some(code) = err.status() {
        let text = std::error::Error::source(err)
            .map(|s| s.to_string())
            .unwrap_or_default();
        return Reply::new(Some(u16::from(code)), &text);
    }
    let mut text = err.to_string();
    let mut source = std::error::Error::source(err);
    while let Some(s) = source {
        let part = s.to_string();
        if !text.contains(&part) {
            text = format!("{text}: {part}");
        }
        source = s.source();
    }
    // A refused certificate arrives wrapped in a connection error.
    let lower = text.to_lowercase();
    let tls = err.is_tls()
        || ["certificate", "handshake", "starttls"]
            .iter()
            .any(|w| lower.contains(w));
    let origin = match (tls, connecting) {
        (true, _) => Origin::Tls,
        (false, true) => Origin::Unreachable,
        (false, false) => Origin::Lost,
    };
    Reply::local(origin, text)
}

/// Writes each message as one `.eml` file (lettre names it `<uuid>.eml`).
pub struct FileOut {
    inner: AsyncFileTransport<Tokio1Executor>,
    dir: PathBuf,
}

impl FileOut {
    pub async fn new(dir: PathBuf) -> Result<FileOut> {
        tokio::fs::create_dir_all(&dir)
            .await
            .with_context(|| format!("creating the outbox folder {}", dir.display()))?;
        Ok(FileOut {
            inner: AsyncFileTransport::new(&dir),
            dir,
        })
    }
}

impl Transport for FileOut {
    async fn send(&self, message: &Outgoing) -> Result<Reply, Reply> {
        match self.inner.send_raw(&message.envelope, &message.bytes).await {
            Ok(id) => Ok(Reply::new(
                Some(250),
                &format!(
                    "written to {}",
                    self.dir.join(format!("{id}.eml")).display()
                ),
            )),
            Err(e) => Err(Reply::local(
                Origin::Lost,
                format!("writing to {}: {e}", self.dir.display()),
            )),
        }
    }

    async fn shutdown(&self) {}
}
