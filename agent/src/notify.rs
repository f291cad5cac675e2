//! systemd readiness and watchdog notifications (`Type=notify`,
//! `WatchdogSec=`), spoken directly over `$NOTIFY_SOCKET` (a datagram to a
//! path or an abstract socket): no libsystemd needed. Without the variables
//! (not under systemd) every call is a no-op.

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

use tracing::debug;

/// Sends one notification (e.g. `READY=1`). Errors are logged at DEBUG and
/// otherwise ignored: a missing supervisor must never stop the agent.
pub fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let path = path.to_string_lossy().into_owned();
    let addr = if let Some(name) = path.strip_prefix('@') {
        SocketAddr::from_abstract_name(name.as_bytes())
    } else {
        SocketAddr::from_pathname(&path)
    };
    let result = addr.and_then(|addr| {
        let sock = UnixDatagram::unbound()?;
        sock.send_to_addr(state.as_bytes(), &addr)
    });
    if let Err(e) = result {
        debug!(socket = %path, error = %e, "sd_notify failed");
    }
}

/// Half the watchdog interval systemd asked for (`$WATCHDOG_USEC`), if any:
/// how often to send `WATCHDOG=1`.
pub fn watchdog_interval() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Some(pid) = std::env::var("WATCHDOG_PID")
        .ok()
        .and_then(|p| p.parse::<u32>().ok())
    {
        if pid != std::process::id() {
            return None;
        }
    }
    (usec > 0).then(|| Duration::from_micros(usec / 2))
}
