//! The compiled rule model: what the parser ([`super::parse`],
//! [`super::compile`]) produces from rule files and the evaluator
//! ([`super::eval`]) runs. Plain data, no IO.
//!
//! Times are Unix milliseconds (event time: the reading's timestamp;
//! processing time: the aggregator's clock, for absence/offline).

use std::collections::BTreeMap;
use std::time::Duration;

/// Alert severity.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// Informational.
    Info,
    /// Needs attention.
    Warning,
    /// Needs action now.
    Critical,
}

/// A comparison against a constant: `value OP limit`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Cmp {
    /// Operator.
    pub op: Op,
    /// Right-hand side.
    pub limit: f64,
}

/// Comparison operators.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    /// `>`
    Gt,
    /// `>=`
    Ge,
    /// `<`
    Lt,
    /// `<=`
    Le,
    /// `==`
    Eq,
    /// `!=`
    Ne,
}

impl Cmp {
    /// Whether `v OP limit` holds (false for NaN).
    pub fn holds(&self, v: f64) -> bool {
        match self.op {
            Op::Gt => v > self.limit,
            Op::Ge => v >= self.limit,
            Op::Lt => v < self.limit,
            Op::Le => v <= self.limit,
            Op::Eq => v == self.limit,
            Op::Ne => !v.is_nan() && v != self.limit,
        }
    }
}

/// Which devices a rule applies to: every condition must hold.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Selector {
    /// Glob on the device id (`*` any run, `?` one character); None = all.
    pub device_glob: Option<String>,
    /// Label matchers: label name -> required value (`*` = present).
    pub labels: BTreeMap<String, String>,
    /// Devices named explicitly (absence rules alert on these even if never seen).
    pub devices: Vec<String>,
}

/// Aggregation functions of window rules.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Agg {
    /// Mean.
    Avg,
    /// Minimum.
    Min,
    /// Maximum.
    Max,
    /// Sum.
    Sum,
    /// Number of readings.
    Count,
    /// Percentile in (0, 100].
    Percentile(f64),
}

/// Window kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WindowMode {
    /// Fixed, non-overlapping windows aligned to multiples of the size
    /// (Unix epoch); evaluated when a window closes.
    Tumbling,
    /// The last `size` of event time, evaluated at every reading.
    Sliding,
}

/// Fire/clear conditions with their hold times, shared by the kinds that
/// compare a value against limits (hysteresis: `clear` is separate).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Hysteresis {
    /// Condition that makes the alert pending, then firing after `for_`.
    pub fire: Cmp,
    /// Must hold this long (event time) before firing; zero = at once.
    pub for_: Duration,
    /// Condition that resolves a firing alert (e.g. fire `> 80`, clear `< 75`).
    pub clear: Cmp,
    /// Must hold this long before resolving; zero = at once.
    pub clear_for: Duration,
}

/// Scope of an absence rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AbsenceScope {
    /// Per (device, sensor) series.
    Series,
    /// Any reading from the device.
    Device,
}

/// How a sequence rule correlates its two events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Correlate {
    /// A and B on the same device.
    SameDevice,
    /// A and B on devices sharing the value of this label.
    Label(String),
}

/// One step of a sequence rule.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    /// Sensor name.
    pub sensor: String,
    /// Condition on its value.
    pub cond: Cmp,
}

/// Rule kinds and their parameters.
#[derive(Debug, Clone, PartialEq)]
pub enum Kind {
    /// Value against limits with `for` and hysteresis.
    Threshold(Hysteresis),
    /// An aggregate over a window against limits.
    Window {
        /// Function.
        agg: Agg,
        /// Window size (event time).
        size: Duration,
        /// Tumbling or sliding.
        mode: WindowMode,
        /// Limits on the aggregate.
        limits: Hysteresis,
    },
    /// Change per `per` over `window`, against limits (rising: `> x`,
    /// falling: `< -x`).
    Rate {
        /// Span over which the change is measured.
        window: Duration,
        /// Unit of the rate (1s or 1m).
        per: Duration,
        /// Limits on the rate.
        limits: Hysteresis,
    },
    /// No reading for `after` (processing time).
    Absence {
        /// Silence that fires.
        after: Duration,
        /// Per series or per device.
        scope: AbsenceScope,
    },
    /// A device went offline (last will / offline status), or has been
    /// silent for `silent_for` if set; resolves when it comes back.
    Offline {
        /// Silence that counts as offline, besides the status message.
        silent_for: Option<Duration>,
    },
    /// At least `n` readings matching `cond` within `within` (sliding, event
    /// time); resolves when the count drops below `n`.
    Count {
        /// Condition a reading must match.
        cond: Cmp,
        /// How many.
        n: u32,
        /// Window.
        within: Duration,
    },
    /// A then B within `within`; with `negate`, A **not** followed by B
    /// within `within` (fires when the time runs out).
    Sequence {
        /// First event.
        first: Step,
        /// Second event.
        then: Step,
        /// Time limit.
        within: Duration,
        /// Fire on the absence of B instead.
        negate: bool,
        /// How A and B are related.
        correlate: Correlate,
    },
}

/// A piece of a summary template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    /// Literal text.
    Text(String),
    /// `{field}`: one of [`TEMPLATE_FIELDS`] or `labels.NAME`.
    Field(String),
}

/// Fields a summary template may use; anything else (except `labels.X`) is
/// a check error.
pub const TEMPLATE_FIELDS: &[&str] = &[
    "rule",
    "device",
    "sensor",
    "value",
    "threshold",
    "duration",
    "severity",
    "state",
    "count",
];

/// Where a rule was defined.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Origin {
    /// File path as given.
    pub file: String,
    /// 1-based line of the rule's table.
    pub line: usize,
}

/// A compiled, validated rule.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    /// Unique name.
    pub name: String,
    /// Free text.
    pub description: String,
    /// Devices it applies to.
    pub selector: Selector,
    /// Sensors it reads (exact names); empty only for offline and
    /// device-scoped absence rules. The engine indexes rules by these.
    pub sensors: Vec<String>,
    /// What it detects.
    pub kind: Kind,
    /// Severity of its alerts.
    pub severity: Severity,
    /// Extra labels on its alerts.
    pub labels: BTreeMap<String, String>,
    /// Summary template.
    pub summary: Vec<Piece>,
    /// Where it came from.
    pub origin: Origin,
    /// Hash of the definition (everything but `origin`): a reload keeps the
    /// state of rules whose hash did not change.
    pub definition_hash: u64,
}

/// A check error: `file:line:column: message`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleError {
    /// File.
    pub file: String,
    /// 1-based line.
    pub line: usize,
    /// 1-based column.
    pub column: usize,
    /// What is wrong.
    pub message: String,
}

impl std::fmt::Display for RuleError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}",
            self.file, self.line, self.column, self.message
        )
    }
}

/// Alert states.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AlertState {
    /// Condition holds, waiting for `for`.
    Pending,
    /// Firing.
    Firing,
    /// Resolved (terminal for this episode).
    Resolved,
}

/// One alert transition, as handed to the alert sinks.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Transition {
    /// Stable identity: hash of rule name + device + sensor + labels.
    pub fingerprint: String,
    /// Increments with every transition of this alert (idempotency key with
    /// the fingerprint).
    pub number: u64,
    /// Rule name.
    pub rule: String,
    /// Device.
    pub device: String,
    /// Sensor ("" for device-level rules).
    pub sensor: String,
    /// Severity.
    pub severity: Severity,
    /// New state.
    pub state: AlertState,
    /// Rule labels plus device labels.
    pub labels: BTreeMap<String, String>,
    /// Rendered summary.
    pub summary: String,
    /// The value that caused it, when there is one.
    pub value: Option<f64>,
    /// The limit it was compared against, when there is one.
    pub threshold: Option<f64>,
    /// Event time of the transition (Unix ms).
    pub event_time_ms: i64,
    /// Aggregator clock when processed (Unix ms).
    pub processing_time_ms: i64,
    /// When the alert started firing (Unix ms), for firing/resolved.
    pub active_since_ms: Option<i64>,
}
