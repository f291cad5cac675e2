//! Shared test support.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

pub mod aggregator;
pub mod mosquitto;

use std::future::Future;
use std::time::{Duration, Instant};

/// Polls the async condition every 20 ms until it yields Some, or panics
/// after `timeout`.
pub async fn wait_async<T, F, Fut>(timeout: Duration, what: &str, mut cond: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = cond().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
