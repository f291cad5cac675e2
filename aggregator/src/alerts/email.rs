//! The `email` sink: one plain-text message per notification over SMTP
//! (lettre 0.11, tokio, rustls with the ring provider).
//!
//! * **Delivered = 250 after DATA.** `send` returns `Ok` once the server
//!   accepted the message; a 4xx/5xx reply at any step is an error with the
//!   server's code and text, retried by the outbox like every failure.
//! * **Dedup key.** `Message-ID: <{id}@outpost>` and `X-Outpost-Id: {id}`
//!   carry [`Notification::id`], so a receiver (or a mail filter) can drop
//!   the duplicate that a retry after a lost 250 produces.
//! * **Connection security** ([`SmtpTls`]): `starttls` requires STARTTLS
//!   (a server that does not offer it is an error, never a clear-text
//!   fallback), `opportunistic` uses it when offered, `tls` is SMTPS,
//!   `none` is plain (a local relay). Certificates are verified against the
//!   system's roots, or against `ca-file` only when it is set.
//! * **Bounded.** The transport's own timeout applies to connecting and to
//!   every command, and the whole send is cut off at the sink's timeout.
//!   No connection pool: one connection per message, closed after it, so a
//!   half-dead pooled connection can never eat a notification.
//! * Subject and body come from [`Template`]s parsed in [`EmailSink::new`];
//!   control characters in the subject become spaces, and it is cut at
//!   [`MAX_SUBJECT_CHARS`]. The password never appears in logs or `Debug`.

use std::fmt;
use std::time::Duration;

use lettre::message::header::{ContentType, HeaderName, HeaderValue};
use lettre::message::Mailbox;
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Certificate, CertificateStore, Tls, TlsParameters};
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;

use super::config::{EmailConfig, SmtpTls};
use super::template::Template;
use super::{AlertSink, BuildError, Notification, SendError, SendFuture};

/// Longest subject, in characters (longer ones end in `...`).
pub const MAX_SUBJECT_CHARS: usize = 200;
/// Largest `ca-file` read.
pub const MAX_CA_FILE_BYTES: u64 = 4 * 1024 * 1024;
/// Domain of the `Message-ID`s.
pub const MESSAGE_ID_DOMAIN: &str = "outpost";

/// The header with the notification id.
const X_OUTPOST_ID: HeaderName = HeaderName::new_from_ascii_str("X-Outpost-Id");

/// See the module documentation.
pub struct EmailSink {
    name: String,
    server: String,
    tls: SmtpTls,
    username: Option<String>,
    from: Mailbox,
    to: Vec<Mailbox>,
    subject: Template,
    body: Template,
    timeout: Duration,
    /// Holds the credentials: never printed.
    transport: AsyncSmtpTransport<Tokio1Executor>,
}

impl fmt::Debug for EmailSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EmailSink")
            .field("name", &self.name)
            .field("server", &self.server)
            .field("tls", &self.tls)
            .field("username", &self.username)
            .field("from", &self.from.to_string())
            .field(
                "to",
                &self.to.iter().map(|m| m.to_string()).collect::<Vec<_>>(),
            )
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl EmailSink {
    /// A sink called `name`; `timeout` bounds connecting, every SMTP
    /// command and the whole [`AlertSink::send`]. Fails on an unparsable
    /// address or template, or an unreadable `ca-file`.
    pub fn new(name: &str, cfg: &EmailConfig, timeout: Duration) -> Result<EmailSink, BuildError> {
        let err = |m: String| BuildError::new(name, m);
        if cfg.host.is_empty() {
            return Err(err("SMTP host is empty".into()));
        }
        let subject =
            Template::parse(&cfg.subject).map_err(|e| err(format!("subject template: {e}")))?;
        let body = Template::parse(&cfg.body).map_err(|e| err(format!("body template: {e}")))?;
        let from: Mailbox = cfg
            .from
            .parse()
            .map_err(|e| err(format!("from {:?}: {e}", cfg.from)))?;
        if cfg.to.is_empty() {
            return Err(err("no recipients".into()));
        }
        let to = cfg
            .to
            .iter()
            .map(|t| {
                t.parse::<Mailbox>()
                    .map_err(|e| err(format!("to {t:?}: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if cfg.password.is_some() && cfg.username.is_none() {
            return Err(err("a password needs a username".into()));
        }

        let port = cfg.port();
        let tls = match cfg.tls {
            SmtpTls::None => Tls::None,
            SmtpTls::Starttls => Tls::Required(tls_parameters(name, cfg)?),
            SmtpTls::Opportunistic => Tls::Opportunistic(tls_parameters(name, cfg)?),
            SmtpTls::Tls => Tls::Wrapper(tls_parameters(name, cfg)?),
        };
        let mut builder = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(&cfg.host)
            .port(port)
            .timeout(Some(timeout))
            .tls(tls);
        if let Some(user) = &cfg.username {
            let pass = cfg.password.as_ref().map(|p| p.expose()).unwrap_or("");
            builder = builder.credentials(Credentials::new(user.clone(), pass.to_owned()));
        }
        Ok(EmailSink {
            name: name.to_owned(),
            server: format!("{}:{port}", cfg.host),
            tls: cfg.tls,
            username: cfg.username.clone(),
            from,
            to,
            subject,
            body,
            timeout,
            transport: builder.build(),
        })
    }

    /// The message for `n`.
    fn message(&self, n: &Notification) -> Result<Message, SendError> {
        let id = n.id.replace(|c: char| c.is_control(), "");
        let mut m = Message::builder()
            .from(self.from.clone())
            .subject(subject_line(&self.subject.render(n)))
            .message_id(Some(message_id(&id)))
            .raw_header(HeaderValue::new(X_OUTPOST_ID, id))
            .header(ContentType::TEXT_PLAIN);
        for t in &self.to {
            m = m.to(t.clone());
        }
        m.body(self.body.render(n))
            .map_err(|e| SendError::new(format!("cannot build the e-mail: {e}")))
    }
}

/// `<{id}@outpost>`, with every character a message id may not hold
/// replaced by `_` (ids are hex, digits and `-`, so this changes nothing
/// in practice).
fn message_id(id: &str) -> String {
    let left: String = id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "!#$%&'*+-/=?^_`{|}~.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("<{left}@{MESSAGE_ID_DOMAIN}>")
}

/// One line, at most [`MAX_SUBJECT_CHARS`].
fn subject_line(s: &str) -> String {
    let one: String = s
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if one.chars().count() <= MAX_SUBJECT_CHARS {
        return one;
    }
    let mut cut: String = one.chars().take(MAX_SUBJECT_CHARS - 3).collect();
    cut.push_str("...");
    cut
}

/// Certificate checks for `host`: the system's roots, or only those of
/// `ca-file`.
fn tls_parameters(name: &str, cfg: &EmailConfig) -> Result<TlsParameters, BuildError> {
    let err = |m: String| BuildError::new(name, m);
    let mut b = TlsParameters::builder(cfg.host.clone());
    if let Some(path) = &cfg.ca_file {
        let shown = path.display();
        let len = std::fs::metadata(path)
            .map_err(|e| err(format!("ca-file {shown}: {e}")))?
            .len();
        if len > MAX_CA_FILE_BYTES {
            return Err(err(format!(
                "ca-file {shown}: {len} bytes, more than {MAX_CA_FILE_BYTES}"
            )));
        }
        let pem = std::fs::read(path).map_err(|e| err(format!("ca-file {shown}: {e}")))?;
        let count = CertificateDer::pem_slice_iter(&pem)
            .try_fold(0usize, |n, c| c.map(|_| n + 1))
            .map_err(|e| err(format!("ca-file {shown}: {e}")))?;
        if count == 0 {
            return Err(err(format!("ca-file {shown}: no PEM certificate in it")));
        }
        let cert = Certificate::from_pem(&pem).map_err(|e| err(format!("ca-file {shown}: {e}")))?;
        b = b
            .certificate_store(CertificateStore::None)
            .add_root_certificate(cert);
    }
    b.build().map_err(|e| err(format!("TLS set-up: {e}")))
}

impl AlertSink for EmailSink {
    fn send<'a>(&'a self, n: &'a Notification) -> SendFuture<'a> {
        Box::pin(async move {
            let m = self.message(n)?;
            match tokio::time::timeout(self.timeout, self.transport.send(m)).await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(e)) => Err(SendError::new(format!("SMTP {}: {e}", self.server))),
                Err(_) => Err(SendError::new(format!(
                    "SMTP {}: no answer within {:?}",
                    self.server, self.timeout
                ))),
            }
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::alerts::config::{Secret, DEFAULT_EMAIL_BODY, DEFAULT_EMAIL_SUBJECT};
    use crate::rules::model::{AlertState, Severity};

    fn cfg() -> EmailConfig {
        EmailConfig {
            host: "127.0.0.1".into(),
            port: Some(2525),
            tls: SmtpTls::None,
            username: Some("ops".into()),
            password: Some(Secret::new("hunter2")),
            from: "Outpost <outpost@example.com>".into(),
            to: vec!["ops@example.com".into(), "oncall@example.com".into()],
            subject: DEFAULT_EMAIL_SUBJECT.into(),
            body: DEFAULT_EMAIL_BODY.into(),
            ca_file: None,
        }
    }

    fn n() -> Notification {
        Notification {
            schema: crate::alerts::SCHEMA.into(),
            id: "00ff-3-r1".into(),
            fingerprint: "00ff".into(),
            number: 3,
            repeat: 1,
            state: AlertState::Firing,
            rule: "hot".into(),
            device: "gw-1".into(),
            sensor: "temp".into(),
            severity: Severity::Warning,
            labels: Default::default(),
            summary: "line one\r\nBcc: evil@example.com".into(),
            value: None,
            threshold: None,
            event_time_ms: 0,
            processing_time_ms: 0,
            active_since_ms: None,
            queued_ms: 0,
            history_id: 1,
        }
    }

    #[test]
    fn builds_the_message_with_ids_and_one_line_subject() {
        let s = EmailSink::new("mail", &cfg(), Duration::from_secs(5)).unwrap();
        let dbg = format!("{s:?}");
        assert!(!dbg.contains("hunter2"), "{dbg}");
        let raw = String::from_utf8(s.message(&n()).unwrap().formatted()).unwrap();
        // Unfold long header lines (RFC 5322 2.2.3).
        let raw = raw.replace("\r\n ", " ");
        assert!(raw.contains("Message-ID: <00ff-3-r1@outpost>\r\n"), "{raw}");
        assert!(raw.contains("X-Outpost-Id: 00ff-3-r1\r\n"), "{raw}");
        assert!(
            raw.contains(
                "Subject: [FIRING (repeat 1)] warning: hot on gw-1: line one  Bcc: evil@example.com\r\n"
            ),
            "{raw}"
        );
        let (head, _) = raw.split_once("\r\n\r\n").unwrap();
        assert!(!head.contains("\nBcc:"), "{raw}");
        assert!(
            raw.contains("To: ops@example.com, oncall@example.com\r\n"),
            "{raw}"
        );
    }

    #[test]
    fn bad_config_is_a_build_error() {
        let t = Duration::from_secs(1);
        let mut c = cfg();
        c.subject = "{nope}".into();
        assert!(EmailSink::new("m", &c, t)
            .unwrap_err()
            .message
            .contains("subject"));
        let mut c = cfg();
        c.from = "not an address".into();
        assert!(EmailSink::new("m", &c, t).is_err());
        let mut c = cfg();
        c.tls = SmtpTls::Starttls;
        c.ca_file = Some("/nonexistent/ca.pem".into());
        assert!(EmailSink::new("m", &c, t)
            .unwrap_err()
            .message
            .contains("ca-file"));
        let dir = std::env::temp_dir().join(format!("outpost-email-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "no certificate here\n").unwrap();
        c.ca_file = Some(empty);
        assert!(EmailSink::new("m", &c, t)
            .unwrap_err()
            .message
            .contains("no PEM certificate"));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn long_subjects_are_cut_and_ids_sanitised() {
        assert_eq!(
            subject_line(&"x".repeat(500)).chars().count(),
            MAX_SUBJECT_CHARS
        );
        assert_eq!(message_id("a b<c>"), "<a_b_c_@outpost>");
    }
}
