//! `/metrics` (Prometheus text) and `/healthz` over a minimal HTTP/1.1
//! server: the agent is meant to stay small, and these two read-only
//! endpoints do not need a web framework. One request per connection,
//! request head capped at [`MAX_REQUEST`] bytes, [`READ_TIMEOUT`] to send it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use crate::metrics::Metrics;

/// Largest request head read.
pub const MAX_REQUEST: usize = 8 * 1024;
/// Time a client has to send its request.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// What `/healthz` reports; `healthy() == false` answers 503.
pub trait Health: Send + Sync + 'static {
    /// A JSON object describing the state, and whether it is healthy.
    fn report(&self) -> (bool, String);
}

/// Binds `addr` and serves until `cancel`. Returns the bound address (useful
/// with port 0) once listening.
pub async fn serve(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    health: Arc<dyn Health>,
    cancel: CancellationToken,
) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    info!(addr = %local, "serving /metrics and /healthz");
    tokio::spawn(async move {
        loop {
            let (stream, _) = tokio::select! {
                _ = cancel.cancelled() => break,
                r = listener.accept() => match r {
                    Ok(c) => c,
                    Err(e) => { debug!(error = %e, "accept failed"); continue; }
                },
            };
            let (metrics, health) = (metrics.clone(), health.clone());
            tokio::spawn(async move {
                if let Err(e) = handle(stream, &metrics, &*health).await {
                    debug!(error = %e, "metrics connection failed");
                }
            });
        }
    });
    Ok(local)
}

async fn handle(
    mut stream: TcpStream,
    metrics: &Metrics,
    health: &dyn Health,
) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    let read = async {
        while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < MAX_REQUEST {
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        Ok::<_, std::io::Error>(())
    };
    if tokio::time::timeout(READ_TIMEOUT, read).await.is_err() {
        return Ok(());
    }
    let head = String::from_utf8_lossy(&buf);
    let mut parts = head.lines().next().unwrap_or("").split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = path.split('?').next().unwrap_or("");
    let (status, ctype, body) = match (method, path) {
        ("GET", "/metrics") => (
            "200 OK",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            metrics.render(),
        ),
        ("GET", "/healthz") => {
            let (ok, body) = health.report();
            (
                if ok {
                    "200 OK"
                } else {
                    "503 Service Unavailable"
                },
                "application/json",
                body,
            )
        }
        ("GET", _) => ("404 Not Found", "text/plain", "not found\n".to_string()),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "method not allowed\n".to_string(),
        ),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}
