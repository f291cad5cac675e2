//! Rule unit tests, like `promtool test rules`: a test file (TOML) names
//! the rule files it loads, gives input readings and device status events
//! with timestamps, and lists the alert transitions it expects. Each test
//! runs the pure [`Engine`] under a virtual clock. This is what
//! `outpost-aggregator rules test FILE...` runs ([`run_files`]); the format
//! is documented in `docs/rules.md`, "Rule unit tests".
//!
//! # Design
//! - Parsing is serde (`deny_unknown_fields`) for the structure, with
//!   [`Spanned`] values so that the semantic checks that follow (durations,
//!   series syntax, unknown rule names, missing devices) can point at
//!   `file:line:column`. Structural errors stop at the first one (serde
//!   does); semantic errors are all reported. Rule files go through
//!   [`compile::compile_str`] / [`compile::load_dir`] and their errors are
//!   reported as `rules check` reports them.
//! - Virtual time starts at 0 (the Unix epoch, so tumbling windows align to
//!   multiples of their size from the start of a test). Processing time
//!   equals event time: every call gets `now_ms = time_ms`.
//! - Inputs are merged in time order (ties keep file order) and fed to
//!   [`Engine::reading`] / [`Engine::device_status`]; [`Engine::tick`] runs
//!   at every multiple of `tick` up to `until`, and at `until` itself. At
//!   equal times the inputs go first, then the tick, as a live aggregator
//!   whose tick comes just after a reading would.
//! - Comparison is exact on identity: every expected transition must match
//!   one actual transition by rule + device + state + event time (+ sensor
//!   when the expectation gives one), and every actual transition must be
//!   expected. Only `firing` and `resolved` are compared unless the test
//!   sets `check-pending`; without it, pending transitions and the
//!   `resolved` that ends a pending episode that never fired (no
//!   `active_since_ms`) are ignored, since sinks never notify them. The
//!   optional `rules` list narrows the comparison to those rules (the others
//!   still run). The other fields of an expectation (value, threshold,
//!   summary, labels) are checks on the matched transition.
//! - Matching is greedy: expectations with an exact `at` first, then those
//!   with a `within` range (narrowest first); each takes the earliest
//!   unmatched candidate.
//! - Failure cases: a test that fails is reported (missing, unexpected and
//!   mismatching transitions, with times) and the run goes on; an invalid
//!   test file or rule file fails the whole file with [`TestFileError`].

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::ops::Range;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::compile;
use super::eval::Engine;
use super::model::{AlertState, Rule, RuleError, Transition};
use super::parse::{parse_duration, Diag, Pos};

/// Spacing of `series` values when neither the input nor the test says.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(1);
/// Virtual-clock tick interval when the test does not say.
pub const DEFAULT_TICK: Duration = Duration::from_secs(1);
/// Without `until`, a test runs this long past its last input, so that
/// `for`, absence and offline timers have time to run out.
pub const DEFAULT_MARGIN: Duration = Duration::from_secs(60);
/// Most engine calls (inputs plus ticks) one test may make: a guard against
/// `tick = "1ms"` with `until = "30days"`.
pub const MAX_STEPS: u64 = 2_000_000;
/// Largest repeat count `N` of a series token `VALUExN`.
pub const MAX_REPEAT: u64 = 100_000;
/// Relative tolerance of `value` and `threshold` checks.
pub const VALUE_TOLERANCE: f64 = 1e-9;

/// The outcome of one test.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TestReport {
    /// The test's `name`.
    pub name: String,
    /// Whether every expectation held and nothing unexpected happened.
    pub passed: bool,
    /// One line per problem (empty when passed).
    pub failures: Vec<String>,
}

/// The outcome of one test file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileReport {
    /// The test file as given.
    pub file: String,
    /// One report per `[[test]]`, in file order.
    pub tests: Vec<TestReport>,
}

impl FileReport {
    /// Whether every test passed.
    pub fn passed(&self) -> bool {
        self.tests.iter().all(|t| t.passed)
    }
}

/// Why a test file could not be run.
#[derive(Debug, thiserror::Error)]
pub enum TestFileError {
    /// The test file could not be read.
    #[error("{path}: cannot read the test file: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The test file, or a rule file it loads, is invalid: every problem
    /// found, `file:line:column: message`, the test file's first (rule
    /// file errors are those of `rules check`).
    #[error("{}", lines(.0))]
    Invalid(Vec<RuleError>),
}

fn lines(errors: &[RuleError]) -> String {
    errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

/// Runs every test of the file at `path`.
pub fn run_file(path: &Path) -> Result<FileReport, TestFileError> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| TestFileError::Read {
        path: file.clone(),
        source,
    })?;
    let base = path.parent().unwrap_or(Path::new(""));
    run_str(&file, &text, base)
}

/// Runs the tests of a test file's `text`; `file` is its name in messages,
/// `base` the directory `rule-files` are relative to.
pub fn run_str(file: &str, text: &str, base: &Path) -> Result<FileReport, TestFileError> {
    let src = Source::new(file, text);
    let raw: RawFile = toml::from_str(text).map_err(|e| {
        let pos = src.pos(e.span().map_or(0, |s| s.start));
        TestFileError::Invalid(vec![RuleError {
            file: file.to_owned(),
            line: pos.line,
            column: pos.column,
            message: e.message().to_owned(),
        }])
    })?;
    let mut d = Diag::new(file);
    let (rules, rule_errors) = load_rules(&src, &mut d, base, &raw.rule_files);
    if !rule_errors.is_empty() {
        // Without the rules, the tests cannot be checked any further.
        let mut errors = d.into_errors();
        errors.extend(rule_errors);
        return Err(TestFileError::Invalid(errors));
    }
    let names: BTreeSet<&str> = rules.iter().map(|r| r.name.as_str()).collect();
    if raw.test.is_empty() {
        d.error(
            Pos { line: 1, column: 1 },
            "no tests: add a `[[test]]` table",
        );
    }
    let mut seen: BTreeMap<&str, Pos> = BTreeMap::new();
    let mut cases = Vec::new();
    for t in &raw.test {
        let name_pos = src.pos(t.get_ref().name.span().start);
        let name = t.get_ref().name.get_ref().as_str();
        if let Some(first) = seen.insert(name, name_pos) {
            d.error(
                name_pos,
                format!(
                    "duplicate test name `{name}` (first at line {}, column {})",
                    first.line, first.column
                ),
            );
        }
        cases.push(compile_case(&src, &mut d, &names, t));
    }
    if !d.is_empty() {
        return Err(TestFileError::Invalid(d.into_errors()));
    }
    let tests = cases
        .iter()
        .flatten()
        .map(|case| run_case(&src, &rules, case))
        .collect();
    Ok(FileReport {
        file: file.to_owned(),
        tests,
    })
}

/// Runs the test files at `paths` in order, printing `PASS name` or
/// `FAIL name` (with the failures indented below) per test, each file's
/// errors when it is invalid, and a last line `N passed, M failed`.
/// Returns whether every test passed and every file was valid; `Err` only
/// when writing to `out` fails.
pub fn run_files(paths: &[PathBuf], out: &mut impl Write) -> std::io::Result<bool> {
    let (mut passed, mut failed, mut invalid) = (0usize, 0usize, 0usize);
    for path in paths {
        writeln!(out, "--- {}", path.display())?;
        match run_file(path) {
            Ok(report) => {
                for t in &report.tests {
                    if t.passed {
                        passed += 1;
                        writeln!(out, "PASS {}", t.name)?;
                    } else {
                        failed += 1;
                        writeln!(out, "FAIL {}", t.name)?;
                        for f in &t.failures {
                            writeln!(out, "    {f}")?;
                        }
                    }
                }
            }
            Err(e) => {
                invalid += 1;
                writeln!(out, "ERROR invalid test file")?;
                writeln!(out, "{e}")?;
            }
        }
    }
    if invalid > 0 {
        let s = if invalid == 1 { "" } else { "s" };
        writeln!(out, "{invalid} invalid test file{s}")?;
    }
    writeln!(out, "{passed} passed, {failed} failed")?;
    Ok(failed == 0 && invalid == 0)
}

// ---------------------------------------------------------------------------
// The file format (serde layer).

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawFile {
    rule_files: Vec<Spanned<String>>,
    #[serde(default)]
    test: Vec<Spanned<RawTest>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawTest {
    name: Spanned<String>,
    device: Option<Spanned<String>>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    device_labels: BTreeMap<String, Spanned<BTreeMap<String, String>>>,
    interval: Option<Spanned<String>>,
    tick: Option<Spanned<String>>,
    until: Option<Spanned<String>>,
    lateness: Option<Spanned<String>>,
    #[serde(default)]
    check_pending: bool,
    rules: Option<Vec<Spanned<String>>>,
    #[serde(default)]
    input: Vec<Spanned<RawInput>>,
    #[serde(default)]
    expect: Vec<Spanned<RawExpect>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawInput {
    device: Option<Spanned<String>>,
    sensor: Option<Spanned<String>>,
    series: Option<Spanned<String>>,
    start: Option<Spanned<String>>,
    interval: Option<Spanned<String>>,
    at: Option<Spanned<String>>,
    value: Option<Spanned<f64>>,
    status: Option<Spanned<Status>>,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Status {
    Online,
    Offline,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawExpect {
    rule: Spanned<String>,
    state: Spanned<AlertState>,
    at: Option<Spanned<String>>,
    within: Option<Spanned<Vec<Spanned<String>>>>,
    device: Option<Spanned<String>>,
    sensor: Option<String>,
    value: Option<f64>,
    threshold: Option<f64>,
    summary: Option<String>,
    summary_contains: Option<String>,
    labels: Option<BTreeMap<String, String>>,
}

// ---------------------------------------------------------------------------
// Positions.

/// A test file's text, for byte offset -> `line:column` (columns count
/// characters from 1, as `rules check` does).
struct Source<'a> {
    file: &'a str,
    text: &'a str,
    line_starts: Vec<usize>,
}

impl<'a> Source<'a> {
    fn new(file: &'a str, text: &'a str) -> Self {
        let mut line_starts = vec![0];
        line_starts.extend(text.match_indices('\n').map(|(i, _)| i + 1));
        Source {
            file,
            text,
            line_starts,
        }
    }

    fn pos(&self, offset: usize) -> Pos {
        let offset = offset.min(self.text.len());
        let line = self.line_starts.partition_point(|&s| s <= offset).max(1);
        let start = self.line_starts.get(line - 1).copied().unwrap_or(0);
        let column = self
            .text
            .get(start..offset)
            .map_or(offset - start, |s| s.chars().count())
            + 1;
        Pos { line, column }
    }

    /// The position of character `index` of the string value at `span`:
    /// exact when the string is written verbatim on one line, else the
    /// string's start.
    fn pos_in_string(&self, span: Range<usize>, content: &str, index: usize) -> Pos {
        let start = self.pos(span.start);
        let raw = self.text.get(span).unwrap_or("");
        let verbatim =
            raw.len() >= 2 && raw.get(1..raw.len() - 1) == Some(content) && !content.contains('\n');
        if verbatim {
            start.right(1 + index)
        } else {
            start
        }
    }
}

fn at<T>(src: &Source<'_>, s: &Spanned<T>) -> Pos {
    src.pos(s.span().start)
}

// ---------------------------------------------------------------------------
// Loading rules.

/// `a/b/../c` -> `a/c`, lexically, so that rule origins print cleanly.
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir
                if matches!(out.components().next_back(), Some(Component::Normal(_))) =>
            {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

/// The rules of `files` (relative to `base`) and the rule files' own
/// errors; problems with the list itself (unreadable files, a rule defined
/// twice) go to `d`.
fn load_rules(
    src: &Source<'_>,
    d: &mut Diag,
    base: &Path,
    files: &[Spanned<String>],
) -> (Vec<Rule>, Vec<RuleError>) {
    if files.is_empty() {
        d.error(
            Pos { line: 1, column: 1 },
            "`rule-files` is empty: name the rule files the tests load",
        );
    }
    let mut rules: Vec<Rule> = Vec::new();
    let mut rule_errors = Vec::new();
    for entry in files {
        let path = normalize(&base.join(entry.get_ref()));
        let shown = path.display().to_string();
        let (r, e) = if path.is_dir() {
            compile::load_dir(&path)
        } else {
            match std::fs::read_to_string(&path) {
                Ok(text) => compile::compile_str(&shown, &text),
                Err(e) => {
                    d.error(
                        at(src, entry),
                        format!("cannot read rule file `{shown}`: {e}"),
                    );
                    continue;
                }
            }
        };
        rule_errors.extend(e);
        for rule in r {
            if let Some(first) = rules.iter().find(|x| x.name == rule.name) {
                d.error(
                    at(src, entry),
                    format!(
                        "rule `{}` is defined twice: {}:{} and {}:{}",
                        rule.name,
                        first.origin.file,
                        first.origin.line,
                        rule.origin.file,
                        rule.origin.line
                    ),
                );
                continue;
            }
            rules.push(rule);
        }
    }
    (rules, rule_errors)
}

// ---------------------------------------------------------------------------
// Compiling a test.

/// One input event at virtual time `t`.
#[derive(Debug, Clone)]
struct Input {
    t: i64,
    device: String,
    what: What,
}

#[derive(Debug, Clone)]
enum What {
    Reading { sensor: String, value: f64 },
    Status { online: bool },
}

/// One expected transition.
#[derive(Debug, Clone)]
struct Expect {
    pos: Pos,
    rule: String,
    device: String,
    state: AlertState,
    sensor: Option<String>,
    /// Event time range, inclusive (`at` gives a single point).
    from: i64,
    to: i64,
    value: Option<f64>,
    threshold: Option<f64>,
    summary: Option<String>,
    summary_contains: Option<String>,
    labels: Option<BTreeMap<String, String>>,
}

/// A validated test.
#[derive(Debug, Clone)]
struct Case {
    name: String,
    check_pending: bool,
    only: Option<BTreeSet<String>>,
    /// Device -> labels (devices not listed have none).
    labels: BTreeMap<String, BTreeMap<String, String>>,
    tick_ms: i64,
    until_ms: i64,
    lateness_ms: Option<i64>,
    inputs: Vec<Input>,
    expects: Vec<Expect>,
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// A duration value, or an error at it.
fn duration(src: &Source<'_>, d: &mut Diag, key: &str, v: &Spanned<String>) -> Option<i64> {
    match parse_duration(v.get_ref()) {
        Ok(x) => Some(ms(x)),
        Err(e) => {
            d.error(at(src, v), format!("`{key}`: {e}"));
            None
        }
    }
}

/// A duration above zero, or `default`.
fn positive(
    src: &Source<'_>,
    d: &mut Diag,
    key: &str,
    v: Option<&Spanned<String>>,
    default: Duration,
) -> Option<i64> {
    let Some(v) = v else {
        return Some(ms(default));
    };
    let x = duration(src, d, key, v)?;
    if x == 0 {
        d.error(at(src, v), format!("`{key}` must be above zero"));
        return None;
    }
    Some(x)
}

fn compile_case(
    src: &Source<'_>,
    d: &mut Diag,
    rule_names: &BTreeSet<&str>,
    t: &Spanned<RawTest>,
) -> Option<Case> {
    let before = d.len();
    let header = at(src, t);
    let t = t.get_ref();
    let known = |d: &mut Diag, what: &str, name: &Spanned<String>| {
        if !rule_names.contains(name.get_ref().as_str()) {
            d.error(
                at(src, name),
                format!(
                    "{what} `{}` is not defined in the rule files (they define: {})",
                    name.get_ref(),
                    rule_names.iter().copied().collect::<Vec<_>>().join(", ")
                ),
            );
        }
    };

    let default_device = t.device.as_ref().map(|s| s.get_ref().clone());
    if let (Some(dev), false) = (&default_device, t.labels.is_empty()) {
        if let Some(l) = t.device_labels.get(dev) {
            d.error(
                at(src, l),
                format!("labels of `{dev}` given twice: in `labels` and in `device-labels`"),
            );
        }
    }
    if default_device.is_none() && !t.labels.is_empty() {
        d.error(
            header,
            "`labels` are the labels of the test's `device`, which is missing",
        );
    }

    let interval = positive(src, d, "interval", t.interval.as_ref(), DEFAULT_INTERVAL);
    let tick_ms = positive(src, d, "tick", t.tick.as_ref(), DEFAULT_TICK);
    let until = t.until.as_ref().and_then(|u| duration(src, d, "until", u));
    let lateness_ms = t
        .lateness
        .as_ref()
        .and_then(|l| duration(src, d, "lateness", l));

    let only: Option<BTreeSet<String>> = t.rules.as_ref().map(|names| {
        for n in names {
            known(d, "rule", n);
        }
        names.iter().map(|n| n.get_ref().clone()).collect()
    });

    let mut inputs = Vec::new();
    for i in &t.input {
        compile_input(src, d, &default_device, interval, i, &mut inputs);
    }
    inputs.sort_by_key(|i| i.t);
    let last = inputs.last().map_or(0, |i| i.t);
    let until_ms = match (&t.until, until) {
        (Some(u), Some(until)) => {
            if last > until {
                d.error(
                    at(src, u),
                    format!(
                        "`until = \"{}\"` is before the last input, at {}",
                        u.get_ref(),
                        show_ms(last)
                    ),
                );
            }
            until
        }
        (Some(_), None) => 0, // an invalid `until`, already reported
        (None, _) => last.saturating_add(ms(DEFAULT_MARGIN)),
    };
    if let Some(tick) = tick_ms {
        let steps = (until_ms / tick).unsigned_abs() + inputs.len() as u64;
        if steps > MAX_STEPS {
            d.error(
                t.tick.as_ref().map_or(header, |s| at(src, s)),
                format!(
                    "{steps} engine calls (ticks plus inputs) is more than {MAX_STEPS}: use a longer `tick` or a shorter `until`"
                ),
            );
        }
    }

    let mut expects = Vec::new();
    for e in &t.expect {
        let pos = at(src, e);
        let e = e.get_ref();
        known(d, "rule", &e.rule);
        if let Some(only) = &only {
            if !only.contains(e.rule.get_ref()) {
                d.error(
                    at(src, &e.rule),
                    format!(
                        "rule `{}` is not in the test's `rules` list, so its transitions are not compared",
                        e.rule.get_ref()
                    ),
                );
            }
        }
        let state = *e.state.get_ref();
        if state == AlertState::Pending && !t.check_pending {
            d.error(
                at(src, &e.state),
                "pending transitions are only compared with `check-pending = true` in the test",
            );
        }
        let device = match (&e.device, &default_device) {
            (Some(dev), _) => Some(dev.get_ref().clone()),
            (None, Some(dev)) => Some(dev.clone()),
            (None, None) => {
                d.error(
                    pos,
                    "`device` missing: give it here or as the test's `device`",
                );
                None
            }
        };
        let range = match (&e.at, &e.within) {
            (Some(a), None) => duration(src, d, "at", a).map(|x| (x, x)),
            (None, Some(w)) => match w.get_ref().as_slice() {
                [a, b] => match (duration(src, d, "within", a), duration(src, d, "within", b)) {
                    (Some(a), Some(b)) if a <= b => Some((a, b)),
                    (Some(_), Some(_)) => {
                        d.error(at(src, w), "`within` must be [earliest, latest]");
                        None
                    }
                    _ => None,
                },
                _ => {
                    d.error(
                        at(src, w),
                        "`within` must be two durations: [earliest, latest]",
                    );
                    None
                }
            },
            (Some(a), Some(_)) => {
                d.error(at(src, a), "give `at` or `within`, not both");
                None
            }
            (None, None) => {
                d.error(
                    pos,
                    "`at` missing: the event time of the transition (or `within = [from, to]`)",
                );
                None
            }
        };
        if let (Some(device), Some((from, to))) = (device, range) {
            expects.push(Expect {
                pos,
                rule: e.rule.get_ref().clone(),
                device,
                state,
                sensor: e.sensor.clone(),
                from,
                to,
                value: e.value,
                threshold: e.threshold,
                summary: e.summary.clone(),
                summary_contains: e.summary_contains.clone(),
                labels: e.labels.clone(),
            });
        }
    }

    let mut labels: BTreeMap<String, BTreeMap<String, String>> = t
        .device_labels
        .iter()
        .map(|(dev, l)| (dev.clone(), l.get_ref().clone()))
        .collect();
    if let Some(dev) = &default_device {
        if !t.labels.is_empty() {
            labels.insert(dev.clone(), t.labels.clone());
        }
    }
    if d.len() > before {
        return None;
    }
    Some(Case {
        name: t.name.get_ref().clone(),
        check_pending: t.check_pending,
        only,
        labels,
        tick_ms: tick_ms?,
        until_ms,
        lateness_ms,
        inputs,
        expects,
    })
}

fn compile_input(
    src: &Source<'_>,
    d: &mut Diag,
    default_device: &Option<String>,
    test_interval: Option<i64>,
    i: &Spanned<RawInput>,
    out: &mut Vec<Input>,
) {
    let pos = at(src, i);
    let i = i.get_ref();
    let device = match (&i.device, default_device) {
        (Some(dev), _) => dev.get_ref().clone(),
        (None, Some(dev)) => dev.clone(),
        (None, None) => {
            d.error(
                pos,
                "`device` missing: give it here or as the test's `device`",
            );
            return;
        }
    };
    let given: Vec<&str> = [
        i.series.as_ref().map(|_| "series"),
        i.value.as_ref().map(|_| "value"),
        i.status.as_ref().map(|_| "status"),
    ]
    .into_iter()
    .flatten()
    .collect();
    if given.len() != 1 {
        d.error(
            pos,
            format!(
                "an input gives exactly one of `series`, `value` (with `at`) or `status` (with `at`); found {}",
                if given.is_empty() { "none".to_owned() } else { given.join(", ") }
            ),
        );
        return;
    }
    let misplaced = |d: &mut Diag, key: &str, v: Option<&Spanned<String>>, with: &str| {
        if let Some(v) = v {
            d.error(at(src, v), format!("`{key}` only goes with {with}"));
        }
    };
    if let Some(series) = &i.series {
        misplaced(d, "at", i.at.as_ref(), "`value` or `status`");
        let Some(sensor) = sensor_of(src, d, pos, i) else {
            return;
        };
        let start = i
            .start
            .as_ref()
            .map_or(Some(0), |s| duration(src, d, "start", s));
        let interval = match &i.interval {
            Some(v) => positive(src, d, "interval", Some(v), DEFAULT_INTERVAL),
            None => test_interval,
        };
        let (Some(start), Some(interval)) = (start, interval) else {
            return;
        };
        for (k, value) in parse_series(src, d, series).into_iter().enumerate() {
            let Some(value) = value else {
                continue;
            };
            let k = i64::try_from(k).unwrap_or(i64::MAX);
            out.push(Input {
                t: start.saturating_add(k.saturating_mul(interval)),
                device: device.clone(),
                what: What::Reading {
                    sensor: sensor.clone(),
                    value,
                },
            });
        }
        return;
    }
    misplaced(d, "start", i.start.as_ref(), "`series`");
    misplaced(d, "interval", i.interval.as_ref(), "`series`");
    let Some(at_v) = &i.at else {
        d.error(pos, "`at` missing: the time of the value or status");
        return;
    };
    let Some(t) = duration(src, d, "at", at_v) else {
        return;
    };
    if let Some(value) = &i.value {
        let Some(sensor) = sensor_of(src, d, pos, i) else {
            return;
        };
        if !value.get_ref().is_finite() {
            d.error(at(src, value), "`value` must be a finite number");
            return;
        }
        out.push(Input {
            t,
            device,
            what: What::Reading {
                sensor,
                value: *value.get_ref(),
            },
        });
    } else if let Some(status) = &i.status {
        if let Some(s) = &i.sensor {
            d.error(
                at(src, s),
                "a `status` input is about the device: no `sensor`",
            );
            return;
        }
        out.push(Input {
            t,
            device,
            what: What::Status {
                online: matches!(status.get_ref(), Status::Online),
            },
        });
    }
}

fn sensor_of(src: &Source<'_>, d: &mut Diag, pos: Pos, i: &RawInput) -> Option<String> {
    match &i.sensor {
        Some(s) if compile::is_name(s.get_ref()) => Some(s.get_ref().clone()),
        Some(s) => {
            d.error(at(src, s), format!("invalid sensor name `{}`", s.get_ref()));
            None
        }
        None => {
            d.error(pos, "`sensor` missing: the sensor the values are read from");
            None
        }
    }
}

/// `"70 85 _ 85x3 _x2"` -> values, `None` for a gap. Errors point at the
/// token.
fn parse_series(src: &Source<'_>, d: &mut Diag, series: &Spanned<String>) -> Vec<Option<f64>> {
    let text = series.get_ref().as_str();
    let mut out = Vec::new();
    let mut char_index = 0;
    let mut rest = text;
    while !rest.is_empty() {
        let skip = rest.len() - rest.trim_start().len();
        char_index += rest.get(..skip).map_or(0, |s| s.chars().count());
        rest = rest.trim_start();
        let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
        let (token, tail) = rest.split_at(end);
        if token.is_empty() {
            break;
        }
        let pos = src.pos_in_string(series.span(), text, char_index);
        let (value, repeat) = match token.split_once('x') {
            Some((v, n)) => match n.parse::<u64>() {
                Ok(n) if (1..=MAX_REPEAT).contains(&n) => (v, n),
                _ => {
                    d.error(
                        pos,
                        format!(
                            "series: bad repeat in `{token}`: write VALUExN with N from 1 to {MAX_REPEAT}"
                        ),
                    );
                    (v, 1)
                }
            },
            None => (token, 1),
        };
        let value = if value == "_" {
            Some(None)
        } else {
            match value.parse::<f64>() {
                Ok(v) if v.is_finite() => Some(Some(v)),
                _ => {
                    d.error(
                        pos,
                        format!("series: `{token}` is not a number, `_` (no reading), or VALUExN"),
                    );
                    None
                }
            }
        };
        if let Some(v) = value {
            for _ in 0..repeat {
                out.push(v);
            }
        }
        char_index += token.chars().count();
        rest = tail;
    }
    if out.is_empty() {
        d.error(at(src, series), "series: no values");
    }
    out
}

// ---------------------------------------------------------------------------
// Running a test.

fn run_case(src: &Source<'_>, rules: &[Rule], case: &Case) -> TestReport {
    let actual = simulate(rules, case);
    let actual: Vec<Transition> = actual
        .into_iter()
        .filter(|t| case.only.as_ref().is_none_or(|o| o.contains(&t.rule)))
        .filter(|t| {
            case.check_pending
                || match t.state {
                    AlertState::Pending => false,
                    AlertState::Firing => true,
                    AlertState::Resolved => t.active_since_ms.is_some(),
                }
        })
        .collect();
    let failures = compare(src, &case.expects, &actual);
    TestReport {
        name: case.name.clone(),
        passed: failures.is_empty(),
        failures,
    }
}

/// Feeds the inputs and ticks to a fresh engine; every transition, in event
/// time order (stable).
fn simulate(rules: &[Rule], case: &Case) -> Vec<Transition> {
    let mut engine = Engine::new(rules.to_vec());
    if let Some(l) = case.lateness_ms {
        engine.set_lateness(l);
    }
    let none = BTreeMap::new();
    let mut out = Vec::new();
    let mut next_tick = 0i64;
    for i in &case.inputs {
        while next_tick < i.t {
            out.extend(engine.tick(next_tick));
            next_tick = next_tick.saturating_add(case.tick_ms);
        }
        let l = case.labels.get(&i.device).unwrap_or(&none);
        out.extend(match &i.what {
            What::Reading { sensor, value } => {
                engine.reading(&i.device, l, sensor, i.t, *value, i.t)
            }
            What::Status { online } => engine.device_status(&i.device, l, *online, i.t, i.t),
        });
    }
    while next_tick <= case.until_ms {
        out.extend(engine.tick(next_tick));
        next_tick = next_tick.saturating_add(case.tick_ms);
    }
    // `until` itself, when it is not a multiple of `tick`.
    if next_tick.saturating_sub(case.tick_ms) < case.until_ms {
        out.extend(engine.tick(case.until_ms));
    }
    out.sort_by_key(|t| t.event_time_ms);
    out
}

fn state_name(s: AlertState) -> &'static str {
    match s {
        AlertState::Pending => "pending",
        AlertState::Firing => "firing",
        AlertState::Resolved => "resolved",
    }
}

/// Milliseconds of virtual time as a duration (`5s`, `1m 30s`, `1s 500ms`).
fn show_ms(t: i64) -> String {
    match u64::try_from(t) {
        Ok(m) => {
            humantime_serde::re::humantime::format_duration(Duration::from_millis(m)).to_string()
        }
        Err(_) => format!("{t}ms"),
    }
}

fn show_value(v: Option<f64>) -> String {
    v.map_or_else(|| "none".to_owned(), |v| v.to_string())
}

fn show_actual(t: &Transition) -> String {
    let sensor = if t.sensor.is_empty() {
        String::new()
    } else {
        format!("/{}", t.sensor)
    };
    let value = t.value.map_or_else(String::new, |v| format!(", value {v}"));
    format!(
        "{} {} on {}{} at {}{} ({:?})",
        t.rule,
        state_name(t.state),
        t.device,
        sensor,
        show_ms(t.event_time_ms),
        value,
        t.summary
    )
}

fn show_expected(e: &Expect) -> String {
    let sensor = e
        .sensor
        .as_ref()
        .map_or_else(String::new, |s| format!("/{s}"));
    let when = if e.from == e.to {
        format!("at {}", show_ms(e.from))
    } else {
        format!("between {} and {}", show_ms(e.from), show_ms(e.to))
    };
    format!(
        "{} {} on {}{} {}",
        e.rule,
        state_name(e.state),
        e.device,
        sensor,
        when
    )
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= VALUE_TOLERANCE * a.abs().max(b.abs()).max(1.0)
}

/// The checks of a matched expectation that fail.
fn checks(e: &Expect, t: &Transition) -> Vec<String> {
    let mut bad = Vec::new();
    let num = |what: &str, want: Option<f64>, got: Option<f64>, bad: &mut Vec<String>| {
        if let Some(w) = want {
            if !got.is_some_and(|g| close(g, w)) {
                bad.push(format!("{what} is {}, expected {w}", show_value(got)));
            }
        }
    };
    num("value", e.value, t.value, &mut bad);
    num("threshold", e.threshold, t.threshold, &mut bad);
    if let Some(s) = &e.summary {
        if *s != t.summary {
            bad.push(format!("summary is {:?}, expected {s:?}", t.summary));
        }
    }
    if let Some(s) = &e.summary_contains {
        if !t.summary.contains(s.as_str()) {
            bad.push(format!("summary {:?} does not contain {s:?}", t.summary));
        }
    }
    if let Some(labels) = &e.labels {
        for (k, v) in labels {
            match t.labels.get(k) {
                Some(got) if got == v => {}
                got => bad.push(format!(
                    "label {k} is {}, expected {v:?}",
                    got.map_or_else(|| "missing".to_owned(), |g| format!("{g:?}"))
                )),
            }
        }
    }
    bad
}

fn compare(src: &Source<'_>, expects: &[Expect], actual: &[Transition]) -> Vec<String> {
    let mut used = vec![false; actual.len()];
    let mut order: Vec<usize> = (0..expects.len()).collect();
    order.sort_by_key(|&i| {
        expects
            .get(i)
            .map(|e| (e.from != e.to, e.to.saturating_sub(e.from), e.from))
    });
    let mut missing = Vec::new();
    let mut mismatched = Vec::new();
    for i in order {
        let Some(e) = expects.get(i) else {
            continue;
        };
        let found = actual.iter().enumerate().position(|(k, t)| {
            !used.get(k).copied().unwrap_or(true)
                && t.rule == e.rule
                && t.device == e.device
                && t.state == e.state
                && e.sensor.as_ref().is_none_or(|s| *s == t.sensor)
                && (e.from..=e.to).contains(&t.event_time_ms)
        });
        let where_ = format!("{}:{}:{}", src.file, e.pos.line, e.pos.column);
        match found {
            None => missing.push((
                i,
                format!("missing: {} (expected at {where_})", show_expected(e)),
            )),
            Some(k) => {
                if let Some(u) = used.get_mut(k) {
                    *u = true;
                }
                if let Some(t) = actual.get(k) {
                    for b in checks(e, t) {
                        mismatched.push((
                            i,
                            format!("wrong: {}: {b} (expected at {where_})", show_actual(t)),
                        ));
                    }
                }
            }
        }
    }
    missing.sort_by_key(|(i, _)| *i);
    mismatched.sort_by_key(|(i, _)| *i);
    let mut failures: Vec<String> = missing.into_iter().map(|(_, m)| m).collect();
    failures.extend(mismatched.into_iter().map(|(_, m)| m));
    for (t, u) in actual.iter().zip(&used) {
        if !u {
            failures.push(format!("unexpected: {}", show_actual(t)));
        }
    }
    failures
}

#[cfg(test)]
mod unit {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn series_tokens() {
        let text = "s = \"1 _ 2x3 _x2 4.5\"";
        let src = Source::new("f", text);
        let span = 4..text.len();
        let s = Spanned::new(span, "1 _ 2x3 _x2 4.5".to_owned());
        let mut d = Diag::new("f");
        let v = parse_series(&src, &mut d, &s);
        assert!(d.is_empty());
        assert_eq!(
            v,
            [
                Some(1.0),
                None,
                Some(2.0),
                Some(2.0),
                Some(2.0),
                None,
                None,
                Some(4.5)
            ]
        );
    }

    #[test]
    fn series_errors_point_at_the_token() {
        let text = "s = \"1 abc 2x0\"";
        let src = Source::new("f", text);
        let s = Spanned::new(4..text.len(), "1 abc 2x0".to_owned());
        let mut d = Diag::new("f");
        let _ = parse_series(&src, &mut d, &s);
        let e: Vec<String> = d.into_errors().iter().map(|e| e.to_string()).collect();
        assert_eq!(e.len(), 2, "{e:?}");
        assert!(e[0].starts_with("f:1:8: series: `abc`"), "{e:?}");
        assert!(e[1].starts_with("f:1:12: series: bad repeat"), "{e:?}");
    }

    #[test]
    fn normalize_removes_parent_dirs() {
        assert_eq!(
            normalize(Path::new("deploy/rules.d/tests/../boiler.toml")),
            PathBuf::from("deploy/rules.d/boiler.toml")
        );
        assert_eq!(normalize(Path::new("../a")), PathBuf::from("../a"));
    }

    #[test]
    fn times_print_as_durations() {
        assert_eq!(show_ms(0), "0s");
        assert_eq!(show_ms(5000), "5s");
        assert_eq!(show_ms(90_500), "1m 30s 500ms");
    }
}
