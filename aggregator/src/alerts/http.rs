//! The HTTP(S) client of the webhook and Alertmanager sinks: one JSON `POST`
//! per delivery attempt, answered with the status and the start of the
//! response body.
//!
//! # Design
//!
//! * **hyper 1 + hyper-util's pooled client** (already compiled for axum),
//!   HTTP/1.1 only, with **rustls on the `ring` provider**: the
//!   `ClientConfig` is built with an explicit provider, so no process-wide
//!   default provider has to be installed and aws-lc-rs is never linked.
//! * **Certificates are verified.** The trust anchors are the system's
//!   (rustls-native-certs), or, when the sink has a `ca-file`, only the
//!   certificates in that PEM file. There is no switch to turn verification
//!   off. A system without any CA certificates still builds the client (an
//!   `http://` sink does not need them); `https://` sends then fail with an
//!   "unknown issuer" error, which is retried and visible.
//! * **One deadline per attempt** ([`HttpClient::post_json`]'s `timeout`)
//!   covers the connect, the TLS handshake, sending the request and reading
//!   the response body, of which at most [`MAX_RESPONSE_BYTES`] are read:
//!   a receiver can neither stall a delivery worker nor make it buffer an
//!   unbounded answer.
//! * **Any HTTP answer is `Ok`**: the sink decides what a status means.
//!   Redirects are not followed (a 3xx is just a status), so configured
//!   headers never reach another host.
//! * **Nothing secret in messages.** Errors name the host and port, never
//!   the URL's path or query (webhook URLs often carry a token) and never a
//!   header value; header values are marked sensitive for hyper.

use std::error::Error as StdError;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{HeaderName, HeaderValue, CONTENT_TYPE, USER_AGENT};
use hyper::{Method, Request, Uri};
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;

use super::{BuildError, SendError};

/// At most this many bytes of a response body are read (the rest is
/// dropped with the connection); sinks only quote its start in errors.
pub const MAX_RESPONSE_BYTES: usize = 4096;
/// An idle pooled connection is closed after this long (receivers often
/// close theirs after 60 s; reusing a half-closed one costs an attempt).
pub const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Idle connections kept per host (a sink sends at most `parallel` at once).
pub const POOL_MAX_IDLE_PER_HOST: usize = 8;
/// Bytes of a response body that [`status_error`] quotes.
pub const ERROR_BODY_BYTES: usize = 200;
/// `User-Agent` of every request.
pub const USER_AGENT_VALUE: &str = concat!("outpost-aggregator/", env!("CARGO_PKG_VERSION"));

/// A pooled HTTP/1.1 client with TLS (certificate verification always on).
/// Cheap to clone: clones share the connection pool.
#[derive(Clone)]
pub struct HttpClient {
    sink: String,
    ca_file: Option<PathBuf>,
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
}

impl fmt::Debug for HttpClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpClient")
            .field("sink", &self.sink)
            .field("ca_file", &self.ca_file)
            .finish_non_exhaustive()
    }
}

impl HttpClient {
    /// A client for sink `sink` that trusts the system's CA certificates,
    /// or only those in the PEM file `ca_file` when given.
    pub fn new(sink: &str, ca_file: Option<&Path>) -> Result<HttpClient, BuildError> {
        let roots = match ca_file {
            Some(path) => roots_from_file(sink, path)?,
            None => system_roots(sink),
        };
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| BuildError::new(sink, format!("TLS set-up: {e}")))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let mut tcp = HttpConnector::new();
        // The connector gets https:// URLs too; the TLS layer wraps it.
        tcp.enforce_http(false);
        tcp.set_nodelay(true);
        let connector = HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(tcp);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .pool_max_idle_per_host(POOL_MAX_IDLE_PER_HOST)
            .build(connector);
        Ok(HttpClient {
            sink: sink.to_owned(),
            ca_file: ca_file.map(Path::to_path_buf),
            client,
        })
    }

    /// POSTs `body` (JSON) to `url` with `headers`. The whole exchange
    /// (connect, TLS, send, read the response body up to
    /// [`MAX_RESPONSE_BYTES`]) is bounded by `timeout`. Any HTTP answer is
    /// `Ok((status, body_prefix))` (the prefix decoded lossily as UTF-8);
    /// a bad URL or header, a connect, TLS or IO error, or the deadline is
    /// an `Err`.
    pub async fn post_json(
        &self,
        url: &str,
        headers: &[(String, String)],
        body: Vec<u8>,
        timeout: Duration,
    ) -> Result<(u16, String), SendError> {
        let uri = parse_url(url)?;
        let target = host_port(&uri);
        let mut req = Request::builder()
            .method(Method::POST)
            .uri(uri)
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| SendError::new(format!("request to {target}: {e}")))?;
        let h = req.headers_mut();
        h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        h.insert(USER_AGENT, HeaderValue::from_static(USER_AGENT_VALUE));
        for (name, value) in headers {
            let n = HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| SendError::new(format!("invalid header name {name:?}")))?;
            // The value is not quoted: it may be a credential.
            let mut v = HeaderValue::from_str(value)
                .map_err(|_| SendError::new(format!("invalid value of header {name:?}")))?;
            v.set_sensitive(true);
            h.insert(n, v);
        }
        let exchange = async {
            let resp = self
                .client
                .request(req)
                .await
                .map_err(|e| SendError::new(describe(&e, &target)))?;
            let status = resp.status().as_u16();
            let mut body = resp.into_body();
            let mut prefix = Vec::new();
            while prefix.len() < MAX_RESPONSE_BYTES {
                match body.frame().await {
                    None => break,
                    Some(Ok(frame)) => {
                        if let Ok(data) = frame.into_data() {
                            let room = MAX_RESPONSE_BYTES - prefix.len();
                            prefix.extend_from_slice(&data[..data.len().min(room)]);
                        }
                    }
                    Some(Err(e)) => {
                        return Err(SendError::new(format!(
                            "reading the response of {target} (HTTP {status}): {}",
                            chain(&e)
                        )))
                    }
                }
            }
            Ok((status, String::from_utf8_lossy(&prefix).into_owned()))
        };
        match tokio::time::timeout(timeout, exchange).await {
            Ok(r) => r,
            Err(_) => Err(SendError::new(format!(
                "{target}: timed out after {}",
                humantime::format_duration(timeout)
            ))),
        }
    }
}

/// The error for a non-2xx answer: `HTTP 503: <start of the body>` (at
/// most [`ERROR_BODY_BYTES`] of it, cut at a character boundary).
pub fn status_error(status: u16, body: &str) -> SendError {
    let body = body.trim();
    let mut end = body.len().min(ERROR_BODY_BYTES);
    while !body.is_char_boundary(end) {
        end -= 1;
    }
    let quoted = body[..end].trim_end();
    if quoted.is_empty() {
        SendError::new(format!("HTTP {status}"))
    } else {
        SendError::new(format!("HTTP {status}: {quoted}"))
    }
}

/// The system's CA certificates; the ones that cannot be read or parsed
/// are skipped with a warning (an `http://` sink needs none).
fn system_roots(sink: &str) -> rustls::RootCertStore {
    let found = rustls_native_certs::load_native_certs();
    for e in &found.errors {
        tracing::warn!(sink, error = %e, "could not load some system CA certificates");
    }
    let mut roots = rustls::RootCertStore::empty();
    let (added, ignored) = roots.add_parsable_certificates(found.certs);
    if ignored > 0 {
        tracing::debug!(sink, ignored, "skipped unparsable system CA certificates");
    }
    if added == 0 {
        tracing::warn!(
            sink,
            "no system CA certificates found: https:// deliveries will fail (set ca-file)"
        );
    }
    roots
}

/// Every certificate of the PEM file `path`; at least one is required.
fn roots_from_file(sink: &str, path: &Path) -> Result<rustls::RootCertStore, BuildError> {
    let at = |what: String| BuildError::new(sink, format!("ca-file {}: {what}", path.display()));
    let pem = std::fs::read(path).map_err(|e| at(e.to_string()))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| at(format!("bad PEM: {e}")))?;
        roots
            .add(cert)
            .map_err(|e| at(format!("bad certificate: {e}")))?;
    }
    if roots.is_empty() {
        return Err(at("contains no PEM certificate".to_owned()));
    }
    Ok(roots)
}

/// An absolute `http://` or `https://` URL with a host.
fn parse_url(url: &str) -> Result<Uri, SendError> {
    // The URL itself is not quoted: its path may carry a token.
    let uri: Uri = url
        .parse()
        .map_err(|e| SendError::new(format!("invalid URL: {e}")))?;
    match uri.scheme_str() {
        Some("http" | "https") => {}
        _ => {
            return Err(SendError::new(
                "invalid URL: must start with http:// or https://",
            ))
        }
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(SendError::new("invalid URL: no host"));
    }
    Ok(uri)
}

/// `host:port` of `uri` (the default port of its scheme when not given).
fn host_port(uri: &Uri) -> String {
    let port = uri
        .port_u16()
        .unwrap_or(if uri.scheme_str() == Some("https") {
            443
        } else {
            80
        });
    format!("{}:{port}", uri.host().unwrap_or_default())
}

/// The messages of `e`'s sources, joined by ": " (a message contained in
/// the one before it is left out).
fn chain(e: &(dyn StdError + 'static)) -> String {
    let mut parts: Vec<String> = vec![e.to_string()];
    let mut src = e.source();
    while let Some(s) = src {
        let m = s.to_string();
        if !parts.iter().any(|p| p.contains(&m)) {
            parts.push(m);
        }
        src = s.source();
    }
    parts.join(": ")
}

/// "connect to host:port: <cause>" or "request to host:port: <cause>",
/// without hyper-util's own "client error (Connect)" wrapper.
fn describe(e: &hyper_util::client::legacy::Error, target: &str) -> String {
    let cause = match e.source() {
        Some(s) => chain(s),
        None => e.to_string(),
    };
    if e.is_connect() {
        format!("connect to {target}: {cause}")
    } else {
        format!("request to {target}: {cause}")
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn bad_urls_and_headers_are_errors_not_panics() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let c = HttpClient::new("t", None).unwrap();
        let t = Duration::from_secs(5);
        for url in ["", "ftp://x/y", "http://", "/relative", "http://a b/"] {
            let e = rt
                .block_on(c.post_json(url, &[], b"{}".to_vec(), t))
                .unwrap_err();
            assert!(e.0.starts_with("invalid URL"), "{url:?}: {e}");
        }
        let bad_name = [("Bad Name".to_owned(), "v".to_owned())];
        let e = rt
            .block_on(c.post_json("http://127.0.0.1:9/", &bad_name, vec![], t))
            .unwrap_err();
        assert!(e.0.contains("invalid header name"), "{e}");
        let bad_value = [("X-Token".to_owned(), "se\ncret".to_owned())];
        let e = rt
            .block_on(c.post_json("http://127.0.0.1:9/", &bad_value, vec![], t))
            .unwrap_err();
        assert!(e.0.contains("X-Token") && !e.0.contains("cret"), "{e}");
    }

    #[test]
    fn the_url_path_is_not_in_errors() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let c = HttpClient::new("t", None).unwrap();
        // Port 9 (discard) is closed on loopback here; either way no answer.
        let e = rt
            .block_on(c.post_json(
                "http://127.0.0.1:9/hook/t0ken",
                &[],
                vec![],
                Duration::from_secs(5),
            ))
            .unwrap_err();
        assert!(e.0.contains("127.0.0.1:9"), "{e}");
        assert!(!e.0.contains("t0ken"), "{e}");
    }

    #[test]
    fn a_ca_file_must_exist_and_hold_certificates() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("none.pem");
        let e = HttpClient::new("s", Some(&missing)).unwrap_err();
        assert!(e.message.contains("none.pem"), "{e}");
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let e = HttpClient::new("s", Some(&empty)).unwrap_err();
        assert!(e.message.contains("no PEM certificate"), "{e}");
        let garbled = dir.path().join("garbled.pem");
        std::fs::write(
            &garbled,
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        assert!(HttpClient::new("s", Some(&garbled)).is_err());
    }

    #[test]
    fn status_errors_quote_the_start_of_the_body() {
        assert_eq!(status_error(503, "").0, "HTTP 503");
        assert_eq!(status_error(500, " boom\n").0, "HTTP 500: boom");
        let long = "é".repeat(ERROR_BODY_BYTES);
        let e = status_error(400, &long).0;
        assert!(e.len() <= "HTTP 400: ".len() + ERROR_BODY_BYTES, "{e}");
        assert!(e.ends_with('é'));
    }

    #[test]
    fn debug_names_the_sink_only() {
        let c = HttpClient::new("ops", None).unwrap();
        assert!(format!("{c:?}").contains("ops"));
    }
}
