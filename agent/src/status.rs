//! What each source is doing, shared between the sources (writers) and the
//! publisher's status message and the health endpoint (readers).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use outpost_proto::pb::SourceState;

/// State of one source as reported in the device status message.
#[derive(Debug, Clone, PartialEq)]
pub struct SourceReport {
    /// Running, or retrying (device missing/unplugged), or stopped.
    pub state: SourceState,
    /// Last error, empty when none.
    pub last_error: String,
    /// Readings produced since start.
    pub readings: u64,
    /// Errors (of any kind) since start.
    pub errors: u64,
}

/// Shared board of source states. Cloning shares the board.
#[derive(Debug, Clone, Default)]
pub struct StatusBoard(Arc<Mutex<BTreeMap<String, SourceReport>>>);

impl StatusBoard {
    fn with(&self, source: &str, f: impl FnOnce(&mut SourceReport)) {
        // A poisoned lock only means another task panicked mid-update; the
        // report is still usable, so recover it rather than propagate.
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let entry = map
            .entry(source.to_owned())
            .or_insert_with(|| SourceReport {
                state: SourceState::Unspecified,
                last_error: String::new(),
                readings: 0,
                errors: 0,
            });
        f(entry);
    }

    /// The source runs (device open).
    pub fn running(&self, source: &str) {
        self.with(source, |r| r.state = SourceState::Running);
    }

    /// The source lost or cannot open its device and retries.
    pub fn retrying(&self, source: &str, error: &str) {
        self.with(source, |r| {
            r.state = SourceState::Retrying;
            r.last_error = error.to_owned();
        });
    }

    /// The source stopped (shutdown).
    pub fn stopped(&self, source: &str) {
        self.with(source, |r| r.state = SourceState::Stopped);
    }

    /// Adds produced readings.
    pub fn add_readings(&self, source: &str, n: u64) {
        self.with(source, |r| r.readings += n);
    }

    /// Adds errors and remembers the last one.
    pub fn add_errors(&self, source: &str, n: u64, last: &str) {
        self.with(source, |r| {
            r.errors += n;
            r.last_error = last.to_owned();
        });
    }

    /// Snapshot of every source.
    pub fn snapshot(&self) -> BTreeMap<String, SourceReport> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}
