//! A stand-in aggregator for measuring the agent alone: a real rumqttd broker
//! on `127.0.0.1:PORT` (argument, default 1883) whose local link acks every
//! telemetry batch, printing readings/s once per second.
//!
//! `cargo run --release -p outpost-agent --example ack_responder -- 18830`
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::Duration;

fn main() {
    let port: u16 = std::env::args()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(1883);
    let (_broker, tx, rx) = support::Broker::start_on(port);
    let responder = support::Responder::start(tx, rx);
    println!("ack responder: broker on 127.0.0.1:{port}");
    let mut last = 0;
    loop {
        std::thread::sleep(Duration::from_secs(1));
        let n = responder.seen.lock().unwrap().len();
        println!("{} readings/s ({n} in all)", n - last);
        // Keep memory flat on long runs: only the count matters here.
        if n > 1_000_000 {
            responder.seen.lock().unwrap().clear();
            last = 0;
        } else {
            last = n;
        }
    }
}
