//! `type = "webhook"`: `POST url` with the [`Notification`] as JSON,
//! optionally signed.
//!
//! # Wire format
//!
//! ```text
//! POST {url}
//! Content-Type: application/json
//! X-Outpost-Idempotency-Key: {notification id}
//! X-Outpost-Timestamp: {Unix seconds at send time}
//! X-Outpost-Signature: sha256={hex HMAC-SHA256(secret, "{timestamp}." + body)}
//! {configured headers}
//!
//! {"schema":"outpost.alert.v1","id":...}
//! ```
//!
//! * The body is the same for every attempt of one outbox row; the
//!   timestamp and the signature are those of the attempt. A receiver
//!   checks the signature with [`verify`] (or the same HMAC in any
//!   language), refuses timestamps too far from its clock (replays), and
//!   drops a notification whose idempotency key it has already seen (we
//!   deliver at least once).
//! * Any 2xx confirms the delivery; anything else (including a redirect)
//!   is an error quoting the status and the start of the body, retried by
//!   the delivery worker.
//! * The signature header is only sent when a `secret` is configured. Our
//!   headers win over configured headers of the same name.
//! * The secret and the configured header values never appear in `Debug`
//!   output or errors; the URL's path neither (it may carry a token).

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ring::hmac;

use super::config::WebhookConfig;
use super::http::{status_error, HttpClient};
use super::{AlertSink, BuildError, Notification, SendError, SendFuture};

/// Header carrying `sha256=` and the hex HMAC-SHA256 of the request.
pub const SIGNATURE_HEADER: &str = "X-Outpost-Signature";
/// Header carrying the Unix seconds the signature covers.
pub const TIMESTAMP_HEADER: &str = "X-Outpost-Timestamp";
/// Header carrying [`Notification::id`].
pub const IDEMPOTENCY_HEADER: &str = "X-Outpost-Idempotency-Key";
/// Prefix of the signature header's value.
pub const SIGNATURE_PREFIX: &str = "sha256=";

/// Posts notifications to one webhook URL.
pub struct WebhookSink {
    name: String,
    url: String,
    headers: Vec<(String, String)>,
    key: Option<hmac::Key>,
    timeout: Duration,
    client: HttpClient,
}

impl fmt::Debug for WebhookSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WebhookSink")
            .field("name", &self.name)
            .field("url", &redacted_url(&self.url))
            .field(
                "headers",
                &self.headers.iter().map(|h| &h.0).collect::<Vec<_>>(),
            )
            .field("signed", &self.key.is_some())
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl WebhookSink {
    /// The sink `name` for `cfg`; each attempt is cut off after `timeout`.
    /// Fails when the CA file cannot be used.
    pub fn new(
        name: &str,
        cfg: &WebhookConfig,
        timeout: Duration,
    ) -> Result<WebhookSink, BuildError> {
        let client = HttpClient::new(name, cfg.ca_file.as_deref())?;
        Ok(WebhookSink {
            name: name.to_owned(),
            url: cfg.url.clone(),
            headers: cfg
                .headers
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            key: cfg
                .secret
                .as_ref()
                .map(|s| hmac::Key::new(hmac::HMAC_SHA256, s.expose().as_bytes())),
            timeout,
            client,
        })
    }

    async fn post(&self, n: &Notification) -> Result<(), SendError> {
        let body = serde_json::to_vec(n)
            .map_err(|e| SendError::new(format!("encoding the notification: {e}")))?;
        let timestamp = unix_seconds();
        let mut headers = self.headers.clone();
        headers.push((IDEMPOTENCY_HEADER.to_owned(), n.id.clone()));
        headers.push((TIMESTAMP_HEADER.to_owned(), timestamp.to_string()));
        if let Some(key) = &self.key {
            headers.push((
                SIGNATURE_HEADER.to_owned(),
                sign_with(key, timestamp, &body),
            ));
        }
        let (status, text) = self
            .client
            .post_json(&self.url, &headers, body, self.timeout)
            .await?;
        if (200..300).contains(&status) {
            Ok(())
        } else {
            Err(status_error(status, &text))
        }
    }
}

impl AlertSink for WebhookSink {
    fn send<'a>(&'a self, n: &'a Notification) -> SendFuture<'a> {
        Box::pin(self.post(n))
    }
}

/// The signature header value for `body` sent at `timestamp`:
/// `sha256=` + lower-case hex of HMAC-SHA256(`secret`, `"{timestamp}."` +
/// `body`).
pub fn sign(secret: &[u8], timestamp: i64, body: &[u8]) -> String {
    sign_with(&hmac::Key::new(hmac::HMAC_SHA256, secret), timestamp, body)
}

/// Whether `header` is the signature of `body` at `timestamp` with
/// `secret` (compared in constant time). A malformed header is `false`.
pub fn verify(secret: &[u8], timestamp: i64, body: &[u8], header: &str) -> bool {
    let Some(tag) = header.strip_prefix(SIGNATURE_PREFIX).and_then(hex_decode) else {
        return false;
    };
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret);
    hmac::verify(&key, &signed_message(timestamp, body), &tag).is_ok()
}

fn sign_with(key: &hmac::Key, timestamp: i64, body: &[u8]) -> String {
    let tag = hmac::sign(key, &signed_message(timestamp, body));
    let mut out = String::with_capacity(SIGNATURE_PREFIX.len() + 2 * tag.as_ref().len());
    out.push_str(SIGNATURE_PREFIX);
    for b in tag.as_ref() {
        out.push(HEX[usize::from(b >> 4)]);
        out.push(HEX[usize::from(b & 0x0f)]);
    }
    out
}

/// `"{timestamp}."` followed by `body`: what the signature covers.
fn signed_message(timestamp: i64, body: &[u8]) -> Vec<u8> {
    let mut m = format!("{timestamp}.").into_bytes();
    m.extend_from_slice(body);
    m
}

const HEX: [char; 16] = [
    '0', '1', '2', '3', '4', '5', '6', '7', '8', '9', 'a', 'b', 'c', 'd', 'e', 'f',
];

/// Bytes of an even-length hex string (either case); `None` if malformed.
fn hex_decode(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    s.as_bytes()
        .chunks(2)
        .map(|p| {
            let hi = char::from(p[0]).to_digit(16)?;
            let lo = char::from(p[1]).to_digit(16)?;
            u8::try_from(hi * 16 + lo).ok()
        })
        .collect()
}

fn unix_seconds() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// `scheme://host:port/…` of `url`, for Debug output (the path and query
/// may carry a token).
fn redacted_url(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => {
            let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
            // Drop any user:password@.
            let host = authority.rsplit('@').next().unwrap_or_default();
            format!("{scheme}://{host}/…")
        }
        None => "…".to_owned(),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::alerts::config::Secret;

    // Computed independently with Python 3:
    //   hmac.new(b"It's a secret", b'1700000000.{"id":"abc-3"}',
    //            hashlib.sha256).hexdigest()
    const VECTOR_SECRET: &[u8] = b"It's a secret";
    const VECTOR_TIME: i64 = 1_700_000_000;
    const VECTOR_BODY: &[u8] = br#"{"id":"abc-3"}"#;
    const VECTOR_SIG: &str =
        "sha256=740cdc2d1faf12f08a7806a5c44e20ebb6056f39f6f46aa8e840e31a17662e1a";

    #[test]
    fn sign_matches_an_independent_hmac() {
        assert_eq!(sign(VECTOR_SECRET, VECTOR_TIME, VECTOR_BODY), VECTOR_SIG);
        // Python 3: hmac.new(b"key", b"1700000000.", hashlib.sha256)
        assert_eq!(
            sign(b"key", VECTOR_TIME, b""),
            "sha256=0f1cc1f811f42fd12af9618acf321769899fa521fe07a642f70a61785e130770"
        );
    }

    #[test]
    fn verify_accepts_the_signature_and_rejects_everything_else() {
        assert!(verify(VECTOR_SECRET, VECTOR_TIME, VECTOR_BODY, VECTOR_SIG));
        assert!(verify(
            VECTOR_SECRET,
            VECTOR_TIME,
            VECTOR_BODY,
            &VECTOR_SIG
                .to_ascii_uppercase()
                .replace("SHA256=", "sha256=")
        ));
        assert!(!verify(b"other", VECTOR_TIME, VECTOR_BODY, VECTOR_SIG));
        assert!(!verify(
            VECTOR_SECRET,
            VECTOR_TIME + 1,
            VECTOR_BODY,
            VECTOR_SIG
        ));
        assert!(!verify(VECTOR_SECRET, VECTOR_TIME, b"{}", VECTOR_SIG));
        for bad in [
            "",
            "sha256=",
            "sha1=740c",
            &VECTOR_SIG[..VECTOR_SIG.len() - 1],
            &VECTOR_SIG[..VECTOR_SIG.len() - 2],
            &format!("{}zz", &VECTOR_SIG[..VECTOR_SIG.len() - 2]),
            "sha256=é",
        ] {
            assert!(
                !verify(VECTOR_SECRET, VECTOR_TIME, VECTOR_BODY, bad),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn debug_shows_neither_secret_nor_header_values_nor_url_path() {
        let cfg = WebhookConfig {
            url: "https://user:pw@hooks.example.com:8443/T0KEN/x?k=v".to_owned(),
            secret: Some(Secret::new("s3cret")),
            headers: [("Authorization".to_owned(), "Bearer abc123".to_owned())].into(),
            ca_file: None,
        };
        let s = WebhookSink::new("ops", &cfg, Duration::from_secs(1)).unwrap();
        let d = format!("{s:?}");
        for secret in ["s3cret", "abc123", "T0KEN", "pw@", "k=v"] {
            assert!(!d.contains(secret), "{secret} in {d}");
        }
        assert!(d.contains("hooks.example.com:8443") && d.contains("Authorization"));
    }
}
