//! `cargo run -p outpost-tests --bin outpost-demo`: the whole local system in
//! one command. At this stage of the project that is the device simulator
//! creating a pseudo-terminal with a ramp scenario, and the agent's frame
//! monitor decoding what arrives on it. Ctrl-C stops everything.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use outpost_tests::{binary, start_sim_pty, Child};

fn main() {
    eprintln!("outpost-demo: building the Outpost programs (first run takes a while)...");
    let agent = binary("outpost-agent");
    let (sim, pty) = start_sim_pty(&[
        "--scenario",
        "ramp",
        "--rate",
        "2",
        "--ramp-period",
        "30",
        "--garbage",
        "0.05",
    ]);
    eprintln!("outpost-demo: outpost-sim writes frames to {pty} (ramp 20 -> 90 -> 20 over 30 s, 5% line noise)");
    let mut monitor = Command::new(agent);
    monitor.args(["monitor", &pty]);
    let mut monitor = Child::spawn_with("agent monitor", monitor, true);
    eprintln!("outpost-demo: decoding with `outpost-agent monitor {pty}`; Ctrl-C to stop");
    let _sim = sim;
    // Ctrl-C (SIGINT) or SIGTERM: drop the children, which kills and reaps them.
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, stop.clone()).expect("install signal handler");
    }
    loop {
        if let Some(status) = monitor.try_wait() {
            eprintln!("outpost-demo: monitor exited: {status}");
            break;
        }
        if stop.load(Ordering::Relaxed) {
            eprintln!("outpost-demo: stopping");
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
