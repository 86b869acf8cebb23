//! Transports: lettre's pooled async SMTP client and lettre's file
//! transport, behind one small trait so that the engine can be driven by a
//! recording double in tests.

use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Certificate, Tls, TlsParameters};
use lettre::transport::smtp::PoolConfig;
use lettre::{AsyncFileTransport, AsyncSmtpTransport, AsyncTransport, Tokio1Executor};

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
            TransportConfig::Smtp(cfg) => AnyTransport::Smtp(Smtp::new(cfg)?),
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

/// SMTP submission through one pooled lettre transport for the whole run,
/// so that the account logs in once per connection, not once per message.
pub struct Smtp {
    inner: AsyncSmtpTransport<Tokio1Executor>,
    timeout: Duration,
}

impl Smtp {
    pub fn new(cfg: &SmtpConfig) -> Result<Smtp> {
        let mut builder = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(&cfg.host)
            .port(cfg.port)
            .timeout(Some(cfg.timeout))
            .pool_config(PoolConfig::new().max_size(cfg.connections as u32));
        if cfg.tls != TlsMode::None {
            let mut params = TlsParameters::builder(cfg.host.clone());
            if let Some(ca) = &cfg.ca_file {
                let pem = std::fs::read(ca).map_err(|e| {
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
            let params = params.build_rustls().context("setting up TLS")?;
            builder = builder.tls(match cfg.tls {
                TlsMode::Implicit => Tls::Wrapper(params),
                _ => Tls::Required(params),
            });
        }
        if let Some(user) = &cfg.username {
            let password = cfg.password.read()?;
            builder = builder.credentials(Credentials::new(
                user.clone(),
                password.expose().to_string(),
            ));
        }
        Ok(Smtp {
            inner: builder.build(),
            timeout: cfg.timeout,
        })
    }
}

impl Transport for Smtp {
    async fn send(&self, message: &Outgoing) -> Result<Reply, Reply> {
        // lettre's timeout covers only the connect; a stalled read or write
        // must not hang the run, so the whole transaction is bounded here.
        let sent = tokio::time::timeout(
            self.timeout * 2,
            self.inner.send_raw(&message.envelope, &message.bytes),
        )
        .await;
        match sent {
            Err(_) => Err(Reply::local(
                Origin::Lost,
                format!(
                    "no reply within {}",
                    humantime::format_duration(self.timeout * 2)
                ),
            )),
            Ok(Ok(response)) => {
                let text: Vec<&str> = response.message().collect();
                Ok(Reply::new(
                    Some(u16::from(response.code())),
                    &text.join(" "),
                ))
            }
            Ok(Err(err)) => Err(smtp_error_reply(&err)),
        }
    }

    async fn shutdown(&self) {
        self.inner.shutdown().await;
    }
}

fn smtp_error_reply(err: &lettre::transport::smtp::Error) -> Reply {
    match err.status() {
        Some(code) => {
            let text = std::error::Error::source(err)
                .map(|s| s.to_string())
                .unwrap_or_default();
            Reply::new(Some(u16::from(code)), &text)
        }
        None => {
            let mut text = err.to_string();
            let mut source = std::error::Error::source(err);
            while let Some(s) = source {
                let part = s.to_string();
                if !text.contains(&part) {
                    text = format!("{text}: {part}");
                }
                source = s.source();
            }
            // lettre's Display is the only public sign of its error kind:
            // "Connection error" is a failure to connect, before any
            // transaction; a refused certificate arrives wrapped in one.
            let lower = text.to_lowercase();
            let origin =
                if err.is_tls() || lower.contains("certificate") || lower.contains("handshake") {
                    Origin::Tls
                } else if text.starts_with("Connection error") {
                    Origin::Unreachable
                } else {
                    Origin::Lost
                };
            Reply::local(origin, text)
        }
    }
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
