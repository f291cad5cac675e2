//! The semantic layer of rule files: positioned tables ([`super::parse`])
//! -> validated [`Rule`]s, for one file ([`compile_str`]) or a directory
//! ([`load_dir`], [`check_dir`]).
//!
//! Design:
//! - Every problem is reported, each at the `file:line:column` of the key or
//!   value at fault (a missing key: at the rule's `[[rule]]` header). A rule
//!   with any error is not produced; a *file* with any error produces no
//!   rules at all, so that a half-valid file never half-loads (the reload
//!   path keeps the previous rule set when there are errors anyway).
//! - Rule names are unique across the directory. Files are read in name
//!   order; a duplicate is reported at the later definition, naming the
//!   first one's position.
//! - Hysteresis: the clear condition of threshold/window/rate rules must not
//!   overlap the fire condition (no value may both fire and clear); it
//!   defaults to the negation of the fire condition (fire `> 80` clears at
//!   `<= 80`). Equal limits are allowed (fire `> 80`, clear `< 80`: at
//!   exactly 80 nothing changes).
//! - [`Rule::definition_hash`] is FNV-1a 64 over a canonical, versioned text
//!   of everything but the origin (see [`definition_hash`]), so it is stable
//!   across runs, platforms and compiler versions, and a reload can tell an
//!   unchanged rule (keeps its state) from a changed one.
//! - Limits are named constants below; see `docs/rules.md` for the syntax.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use super::model::{
    AbsenceScope, Agg, Cmp, Correlate, Hysteresis, Kind, Op, Origin, Piece, Rule, RuleError,
    Selector, Severity, Step, WindowMode, TEMPLATE_FIELDS,
};
use super::parse::{self, Diag, Fields, Node, Pos, Table, Value};

/// Longest rule, label or sensor name.
pub const MAX_NAME_LEN: usize = 128;
/// Longest duration anywhere in a rule (`for`, windows, `within`, `after`):
/// 30 days. Anything longer is a typo or belongs in a batch job.
pub const MAX_DURATION: Duration = Duration::from_secs(30 * 24 * 3600);
/// Largest `n` of a count rule (the engine keeps up to `n` timestamps per
/// series).
pub const MAX_COUNT: i64 = 10_000;
/// Severity when a rule does not say.
pub const DEFAULT_SEVERITY: Severity = Severity::Warning;
/// Extension of rule files; other files in the directory are ignored.
pub const RULE_FILE_EXTENSION: &str = "toml";

/// The rule kinds, as written in `kind = "..."`.
pub const KINDS: &[&str] = &[
    "threshold",
    "window",
    "rate",
    "absence",
    "offline",
    "count",
    "sequence",
];

/// Keys every rule may have.
const COMMON_KEYS: &[&str] = &[
    "name",
    "description",
    "devices",
    "device-list",
    "labels",
    "sensor",
    "sensors",
    "kind",
    "severity",
    "alert-labels",
    "summary",
];

/// Fire conditions (`above = 80`), shared by threshold, window, rate, count
/// and sequence steps.
const COND_KEYS: &[(&str, Op)] = &[
    ("above", Op::Gt),
    ("below", Op::Lt),
    ("at-least", Op::Ge),
    ("at-most", Op::Le),
];

/// Clear conditions (hysteresis) of threshold, window and rate rules.
const CLEAR_KEYS: &[(&str, Op)] = &[
    ("clear-above", Op::Gt),
    ("clear-below", Op::Lt),
    ("clear-at-least", Op::Ge),
    ("clear-at-most", Op::Le),
];

const HYSTERESIS_KEYS: &[&str] = &[
    "above",
    "below",
    "at-least",
    "at-most",
    "clear-above",
    "clear-below",
    "clear-at-least",
    "clear-at-most",
    "for",
    "clear-for",
];

/// The parameters of each kind, besides [`COMMON_KEYS`].
fn kind_params(kind: &str) -> &'static [&'static str] {
    match kind {
        "threshold" => HYSTERESIS_KEYS,
        "window" => &[
            "function",
            "size",
            "mode",
            "above",
            "below",
            "at-least",
            "at-most",
            "clear-above",
            "clear-below",
            "clear-at-least",
            "clear-at-most",
            "for",
            "clear-for",
        ],
        "rate" => &[
            "window",
            "per",
            "above",
            "below",
            "at-least",
            "at-most",
            "clear-above",
            "clear-below",
            "clear-at-least",
            "clear-at-most",
            "for",
            "clear-for",
        ],
        "absence" => &["after", "scope"],
        "offline" => &["silent-for"],
        "count" => &["above", "below", "at-least", "at-most", "n", "within"],
        "sequence" => &["first", "then", "within", "negate", "correlate"],
        _ => &[],
    }
}

fn is_known_key(key: &str) -> bool {
    COMMON_KEYS.contains(&key) || KINDS.iter().any(|k| kind_params(k).contains(&key))
}

/// Whether `s` is a valid rule, label or sensor name: 1 to
/// [`MAX_NAME_LEN`] characters of `A-Z a-z 0-9 _ . -`.
pub fn is_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_NAME_LEN
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// Compiles the rules of one file's text. `file` is the path as it should
/// appear in errors and [`Origin`]. A file with any error yields no rules.
pub fn compile_str(file: &str, text: &str) -> (Vec<Rule>, Vec<RuleError>) {
    let mut seen = BTreeMap::new();
    compile_file(file, text, &mut seen)
}

/// Names already defined: name -> (file, position of the name).
type Seen = BTreeMap<String, (String, Pos)>;

fn compile_file(file: &str, text: &str, seen: &mut Seen) -> (Vec<Rule>, Vec<RuleError>) {
    let tables = match parse::parse_file(file, text) {
        Ok(t) => t,
        Err(errors) => return (Vec::new(), errors),
    };
    let mut d = Diag::new(file);
    let mut rules = Vec::new();
    for table in &tables {
        let before = d.len();
        let compiled = compile_rule(&mut d, table);
        if let Some((name, name_pos)) = compiled.name {
            match seen.get(&name) {
                Some((f0, p0)) => d.error(
                    name_pos,
                    format!(
                        "duplicate rule name `{name}` (first defined at {f0}:{}:{})",
                        p0.line, p0.column
                    ),
                ),
                None => {
                    seen.insert(name, (file.to_owned(), name_pos));
                }
            }
        }
        if d.len() == before {
            rules.push(compiled.rule);
        }
    }
    if d.is_empty() {
        (rules, Vec::new())
    } else {
        (Vec::new(), d.into_errors())
    }
}

/// Loads every `*.toml` file of `dir` (in name order; other files, hidden
/// files and subdirectories are ignored). Returns the rules of the valid
/// files and every error; a file with errors contributes no rules. An
/// unreadable directory or file is reported at line 1, column 1.
pub fn load_dir(dir: &Path) -> (Vec<Rule>, Vec<RuleError>) {
    let io_error = |path: &Path, what: &str, e: &dyn std::fmt::Display| RuleError {
        file: path.display().to_string(),
        line: 1,
        column: 1,
        message: format!("{what}: {e}"),
    };
    let files = match rule_files(dir) {
        Ok(f) => f,
        Err(e) => {
            return (
                Vec::new(),
                vec![io_error(dir, "cannot read the directory", &e)],
            )
        }
    };
    let mut seen = Seen::new();
    let mut rules = Vec::new();
    let mut errors = Vec::new();
    for path in files {
        let file = path.display().to_string();
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) => {
                errors.push(io_error(&path, "cannot read the file", &e));
                continue;
            }
        };
        let text = match std::str::from_utf8(&bytes) {
            Ok(t) => t,
            Err(e) => {
                let valid = String::from_utf8_lossy(&bytes[..e.valid_up_to()]);
                let line = valid.matches('\n').count() + 1;
                let column = valid.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
                errors.push(RuleError {
                    file,
                    line,
                    column,
                    message: "the file is not valid UTF-8".to_owned(),
                });
                continue;
            }
        };
        let (r, e) = compile_file(&file, text, &mut seen);
        rules.extend(r);
        errors.extend(e);
    }
    (rules, errors)
}

fn rule_files(dir: &Path) -> std::io::Result<Vec<std::path::PathBuf>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let hidden = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_none_or(|n| n.starts_with('.'));
        let toml = path.extension().and_then(|e| e.to_str()) == Some(RULE_FILE_EXTENSION);
        // `is_file` follows symlinks, so linked rule files count.
        if toml && !hidden && path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// Validates a directory as `outpost-aggregator rules check DIR` does: the
/// number of rules, or every error.
pub fn check_dir(dir: &Path) -> Result<usize, Vec<RuleError>> {
    let (rules, errors) = load_dir(dir);
    if errors.is_empty() {
        Ok(rules.len())
    } else {
        Err(errors)
    }
}

/// A compiled rule (meaningful only if no error was added meanwhile) and
/// its name with position when the name was valid.
struct Compiled {
    rule: Rule,
    name: Option<(String, Pos)>,
}

fn missing(d: &mut Diag, at: Pos, key: &str, hint: &str) {
    d.error(at, format!("missing `{key}` ({hint})"));
}

fn compile_rule(d: &mut Diag, table: &Table) -> Compiled {
    let mut f = Fields::new(table);
    let header = f.pos();

    let name = match f.string(d, "name") {
        Some((node, s)) if is_name(s) => Some((s.to_owned(), node.pos)),
        Some((node, s)) => {
            d.error(
                node.pos,
                format!(
                    "invalid rule name `{s}`: use 1 to {MAX_NAME_LEN} characters of A-Z, a-z, 0-9, `_`, `.`, `-`"
                ),
            );
            None
        }
        None => {
            if !f.has("name") {
                missing(d, header, "name", "every rule needs a unique name");
            }
            None
        }
    };
    let description = f
        .string(d, "description")
        .map(|(_, s)| s.to_owned())
        .unwrap_or_default();
    let selector = selector(d, &mut f);
    let (sensors, sensors_pos) = sensors(d, &mut f);
    let severity = match f.string(d, "severity") {
        None => DEFAULT_SEVERITY,
        Some((_, "info")) => Severity::Info,
        Some((_, "warning")) => Severity::Warning,
        Some((_, "critical")) => Severity::Critical,
        Some((node, s)) => {
            d.error(
                node.pos,
                format!("unknown severity `{s}`: expected info, warning or critical"),
            );
            DEFAULT_SEVERITY
        }
    };
    let labels = label_map(d, &mut f, "alert-labels", false);

    let kind_name = match f.string(d, "kind") {
        Some((_, k)) if KINDS.contains(&k) => Some(k),
        Some((node, k)) => {
            d.error(
                node.pos,
                format!("unknown kind `{k}`: expected one of {}", KINDS.join(", ")),
            );
            None
        }
        None => {
            if !f.has("kind") {
                missing(d, header, "kind", &format!("one of {}", KINDS.join(", ")));
            }
            None
        }
    };

    let mut rule_sensors = sensors;
    let kind = match kind_name {
        Some(k) => {
            let kind = compile_kind(d, &mut f, k);
            sensor_use(d, header, k, &kind, &mut rule_sensors, sensors_pos);
            Some(kind)
        }
        None => {
            // Without a kind its parameters cannot be checked: do not also
            // call them unknown.
            for k in KINDS {
                for p in kind_params(k) {
                    f.skip(p);
                }
            }
            None
        }
    };

    let summary = match f.entry("summary") {
        None => None,
        Some(e) => match &e.node.value {
            Value::String(s) => Some(template(d, &e.node, s)),
            other => {
                d.error(
                    e.node.pos,
                    format!("`summary` must be a string, found {}", other.type_name()),
                );
                None
            }
        },
    };

    for (key, pos) in f.unused() {
        d.error(pos, unknown_key_message(key, kind_name));
    }

    let kind = kind.unwrap_or(Kind::Offline { silent_for: None });
    let summary = summary.unwrap_or_else(|| default_summary(&kind));
    let mut rule = Rule {
        name: name.as_ref().map(|(n, _)| n.clone()).unwrap_or_default(),
        description,
        selector,
        sensors: rule_sensors,
        kind,
        severity,
        labels,
        summary,
        origin: Origin {
            file: d.file().to_owned(),
            line: header.line,
        },
        definition_hash: 0,
    };
    rule.definition_hash = definition_hash(&rule);
    Compiled { rule, name }
}

fn unknown_key_message(key: &str, kind: Option<&str>) -> String {
    if is_known_key(key) {
        let kinds: Vec<&str> = KINDS
            .iter()
            .copied()
            .filter(|k| kind_params(k).contains(&key))
            .collect();
        return format!(
            "`{key}` is not a parameter of {} rules (it belongs to {} rules)",
            kind.unwrap_or("these"),
            kinds.join(", ")
        );
    }
    let dashed = key.replace('_', "-");
    if dashed != key && is_known_key(&dashed) {
        return format!("unknown field `{key}`; did you mean `{dashed}`?");
    }
    if key == "clear" {
        return "unknown field `clear`; write the clear condition as `clear-below = 75` (or `clear-above`, `clear-at-least`, `clear-at-most`)".to_owned();
    }
    format!("unknown field `{key}`")
}

fn selector(d: &mut Diag, f: &mut Fields<'_>) -> Selector {
    let device_glob = match f.string(d, "devices") {
        Some((node, "")) => {
            d.error(
                node.pos,
                "`devices` must not be empty: use \"*\" for every device",
            );
            None
        }
        Some((_, g)) => Some(g.to_owned()),
        None => None,
    };
    let labels = label_map(d, f, "labels", true);
    let mut devices = Vec::new();
    if let Some(list) = f.string_list(d, "device-list") {
        let mut seen = BTreeSet::new();
        for (node, dev) in list {
            if dev.is_empty() {
                d.error(node.pos, "`device-list` entries must not be empty");
            } else if !seen.insert(dev) {
                d.error(node.pos, format!("device `{dev}` is listed twice"));
            } else {
                devices.push(dev.to_owned());
            }
        }
    }
    Selector {
        device_glob,
        labels,
        devices,
    }
}

/// `labels = { site = "north" }` (matchers: a value is required, `*` =
/// present) or `alert-labels = { team = "ops" }`.
fn label_map(
    d: &mut Diag,
    f: &mut Fields<'_>,
    key: &str,
    matcher: bool,
) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for (name, name_pos, node, value) in f.string_map(d, key).unwrap_or_default() {
        if !is_name(name) {
            d.error(
                name_pos,
                format!(
                    "invalid label name `{name}`: use 1 to {MAX_NAME_LEN} characters of A-Z, a-z, 0-9, `_`, `.`, `-`"
                ),
            );
        } else if matcher && value.is_empty() {
            d.error(
                node.pos,
                format!(
                    "label matcher `{name}` is empty: use \"*\" to require the label to be present"
                ),
            );
        } else {
            out.insert(name.to_owned(), value.to_owned());
        }
    }
    out
}

/// `sensor = "x"` or `sensors = ["x", "y"]`: the names and where they were
/// given.
fn sensors(d: &mut Diag, f: &mut Fields<'_>) -> (Vec<String>, Option<Pos>) {
    let mut out = Vec::new();
    let mut at = None;
    let mut push = |d: &mut Diag, node: &Node, s: &str| {
        if !is_name(s) {
            d.error(
                node.pos,
                format!(
                    "invalid sensor name `{s}`: use 1 to {MAX_NAME_LEN} characters of A-Z, a-z, 0-9, `_`, `.`, `-`"
                ),
            );
        } else if out.iter().any(|o| o == s) {
            d.error(node.pos, format!("sensor `{s}` is listed twice"));
        } else {
            out.push(s.to_owned());
        }
    };
    let single = f.entry("sensor").map(|e| e.key_pos);
    let multi = f.entry("sensors").map(|e| e.key_pos);
    if let (Some(_), Some(m)) = (single, multi) {
        d.error(m, "give either `sensor` or `sensors`, not both");
        return (out, single);
    }
    // Read again through the typed getters (marks stay set).
    if single.is_some() {
        if let Some((node, s)) = f.string(d, "sensor") {
            push(d, node, s);
        }
        at = single;
    } else if multi.is_some() {
        if let Some(list) = f.string_list(d, "sensors") {
            if list.is_empty() {
                if let Some(e) = f.entry("sensors") {
                    d.error(e.node.pos, "`sensors` must not be empty");
                }
            }
            for (node, s) in list {
                push(d, node, s);
            }
        }
        at = multi;
    }
    (out, at)
}

/// Checks the sensors against what the kind needs, and fills them in for
/// sequence rules (the steps name them).
fn sensor_use(
    d: &mut Diag,
    header: Pos,
    kind_name: &str,
    kind: &Kind,
    sensors: &mut Vec<String>,
    given_at: Option<Pos>,
) {
    let not_used = |d: &mut Diag, why: &str| {
        if let Some(at) = given_at {
            d.error(at, format!("`sensor`/`sensors` is not used by {why}"));
        }
    };
    match kind {
        Kind::Offline { .. } => not_used(d, "offline rules (they watch the device)"),
        Kind::Absence {
            scope: AbsenceScope::Device,
            ..
        } => not_used(
            d,
            "absence rules with `scope = \"device\"` (any reading counts)",
        ),
        Kind::Sequence { first, then, .. } => {
            not_used(d, "sequence rules (`first` and `then` name their sensors)");
            sensors.clear();
            sensors.push(first.sensor.clone());
            if then.sensor != first.sensor {
                sensors.push(then.sensor.clone());
            }
        }
        _ => {
            if given_at.is_none() {
                d.error(
                    header,
                    format!(
                        "missing `sensor` (or `sensors`): {kind_name} rules read one or more sensors"
                    ),
                );
            }
        }
    }
}

fn compile_kind(d: &mut Diag, f: &mut Fields<'_>, kind: &str) -> Kind {
    let header = f.pos();
    match kind {
        "threshold" => Kind::Threshold(hysteresis(d, f)),
        "window" => {
            let agg = match f.string(d, "function") {
                Some((node, s)) => aggregate(d, node, s),
                None => {
                    if !f.has("function") {
                        missing(d, header, "function", "avg, min, max, sum, count or pNN");
                    }
                    Agg::Avg
                }
            };
            let size = span(
                d,
                f,
                "size",
                Required::Yes("the window length, e.g. \"5m\""),
            );
            let mode = match f.string(d, "mode") {
                None | Some((_, "sliding")) => WindowMode::Sliding,
                Some((_, "tumbling")) => WindowMode::Tumbling,
                Some((node, s)) => {
                    d.error(
                        node.pos,
                        format!("unknown window mode `{s}`: expected sliding or tumbling"),
                    );
                    WindowMode::Sliding
                }
            };
            Kind::Window {
                agg,
                size: size.unwrap_or_default(),
                mode,
                limits: hysteresis(d, f),
            }
        }
        "rate" => {
            let window = span(
                d,
                f,
                "window",
                Required::Yes("the span the change is measured over, e.g. \"1m\""),
            );
            let per = match f.string(d, "per") {
                None | Some((_, "second")) => Duration::from_secs(1),
                Some((_, "minute")) => Duration::from_secs(60),
                Some((node, s)) => {
                    d.error(
                        node.pos,
                        format!("unknown rate unit `{s}`: expected second or minute"),
                    );
                    Duration::from_secs(1)
                }
            };
            Kind::Rate {
                window: window.unwrap_or_default(),
                per,
                limits: hysteresis(d, f),
            }
        }
        "absence" => {
            let after = span(
                d,
                f,
                "after",
                Required::Yes("the silence that fires, e.g. \"2m\""),
            );
            let scope = match f.string(d, "scope") {
                None | Some((_, "series")) => AbsenceScope::Series,
                Some((_, "device")) => AbsenceScope::Device,
                Some((node, s)) => {
                    d.error(
                        node.pos,
                        format!("unknown absence scope `{s}`: expected series or device"),
                    );
                    AbsenceScope::Series
                }
            };
            Kind::Absence {
                after: after.unwrap_or_default(),
                scope,
            }
        }
        "offline" => Kind::Offline {
            silent_for: span(d, f, "silent-for", Required::No),
        },
        "count" => {
            let cond = condition(d, f, COND_KEYS, true).map(|c| c.2);
            let n = match f.integer(d, "n") {
                Some((_, n)) if (1..=MAX_COUNT).contains(&n) => n,
                Some((pos, n)) => {
                    d.error(
                        pos,
                        format!("`n` = {n} is out of range: must be 1 to {MAX_COUNT}"),
                    );
                    1
                }
                None => {
                    if !f.has("n") {
                        missing(d, header, "n", "how many matching readings fire");
                    }
                    1
                }
            };
            let within = span(
                d,
                f,
                "within",
                Required::Yes("the window the readings must fall in, e.g. \"10m\""),
            );
            Kind::Count {
                cond: cond.unwrap_or(Cmp {
                    op: Op::Gt,
                    limit: 0.0,
                }),
                n: u32::try_from(n).unwrap_or(1),
                within: within.unwrap_or_default(),
            }
        }
        _ => sequence(d, f),
    }
}

fn sequence(d: &mut Diag, f: &mut Fields<'_>) -> Kind {
    let header = f.pos();
    let step = |d: &mut Diag, f: &mut Fields<'_>, key: &str| -> Step {
        let placeholder = Step {
            sensor: String::new(),
            cond: Cmp {
                op: Op::Gt,
                limit: 0.0,
            },
        };
        let Some(t) = f.table(d, key) else {
            if !f.has(key) {
                missing(
                    d,
                    header,
                    key,
                    "a step such as { sensor = \"door\", above = 0.5 }",
                );
            }
            return placeholder;
        };
        let mut sf = Fields::new(t);
        let sensor = match sf.string(d, "sensor") {
            Some((node, s)) if !is_name(s) => {
                d.error(node.pos, format!("invalid sensor name `{s}`"));
                String::new()
            }
            Some((_, s)) => s.to_owned(),
            None => {
                if !sf.has("sensor") {
                    missing(
                        d,
                        t.pos,
                        "sensor",
                        &format!("the sensor of the `{key}` step"),
                    );
                }
                String::new()
            }
        };
        let cond = condition(d, &mut sf, COND_KEYS, true).map(|c| c.2);
        for (k, pos) in sf.unused() {
            d.error(
                pos,
                format!("unknown field `{k}` in `{key}`: a step has `sensor` and one of `above`, `below`, `at-least`, `at-most`"),
            );
        }
        Step {
            sensor,
            cond: cond.unwrap_or(placeholder.cond),
        }
    };
    let first = step(d, f, "first");
    let then = step(d, f, "then");
    let within = span(
        d,
        f,
        "within",
        Required::Yes("how long B may take after A, e.g. \"30s\""),
    );
    let negate = f.boolean(d, "negate").is_some_and(|(_, b)| b);
    let correlate = match f.entry("correlate") {
        None => Correlate::SameDevice,
        Some(e) => match &e.node.value {
            Value::String(s) if s == "device" => Correlate::SameDevice,
            Value::Table(t) => {
                let mut cf = Fields::new(t);
                let label = match cf.string(d, "label") {
                    Some((node, s)) if !is_name(s) => {
                        d.error(node.pos, format!("invalid label name `{s}`"));
                        String::new()
                    }
                    Some((_, s)) => s.to_owned(),
                    None => {
                        if !cf.has("label") {
                            missing(d, t.pos, "label", "the label the two devices share");
                        }
                        String::new()
                    }
                };
                for (k, pos) in cf.unused() {
                    d.error(pos, format!("unknown field `{k}` in `correlate`"));
                }
                Correlate::Label(label)
            }
            _ => {
                d.error(
                    e.node.pos,
                    "`correlate` must be \"device\" or { label = \"NAME\" }",
                );
                Correlate::SameDevice
            }
        },
    };
    Kind::Sequence {
        first,
        then,
        within: within.unwrap_or_default(),
        negate,
        correlate,
    }
}

fn aggregate(d: &mut Diag, node: &Node, s: &str) -> Agg {
    match s {
        "avg" => Agg::Avg,
        "min" => Agg::Min,
        "max" => Agg::Max,
        "sum" => Agg::Sum,
        "count" => Agg::Count,
        _ => match s.strip_prefix('p').map(str::parse::<f64>) {
            Some(Ok(p)) if p > 0.0 && p <= 100.0 => Agg::Percentile(p),
            Some(Ok(_)) => {
                d.error(
                    node.pos,
                    format!("percentile `{s}` is out of range: it must be above 0 and at most 100"),
                );
                Agg::Avg
            }
            _ => {
                d.error(
                    node.pos,
                    format!("unknown function `{s}`: expected avg, min, max, sum, count or pNN (a percentile, e.g. p95)"),
                );
                Agg::Avg
            }
        },
    }
}

enum Required<'a> {
    /// Missing is an error, with this hint.
    Yes(&'a str),
    /// Optional.
    No,
}

/// A window-like duration: must be above zero and at most [`MAX_DURATION`].
fn span(d: &mut Diag, f: &mut Fields<'_>, key: &str, required: Required<'_>) -> Option<Duration> {
    let Some((pos, v)) = f.duration(d, key) else {
        if let Required::Yes(hint) = required {
            if !f.has(key) {
                missing(d, f.pos(), key, hint);
            }
        }
        return None;
    };
    if v.is_zero() {
        d.error(pos, format!("`{key}` must be longer than zero"));
        return None;
    }
    hold_limit(d, pos, key, v)
}

/// A hold time (`for`, `clear-for`): zero allowed, at most [`MAX_DURATION`].
fn hold(d: &mut Diag, f: &mut Fields<'_>, key: &str) -> Duration {
    match f.duration(d, key) {
        Some((pos, v)) => hold_limit(d, pos, key, v).unwrap_or_default(),
        None => Duration::ZERO,
    }
}

fn hold_limit(d: &mut Diag, pos: Pos, key: &str, v: Duration) -> Option<Duration> {
    if v > MAX_DURATION {
        d.error(
            pos,
            format!(
                "`{key}` is longer than the limit of {}",
                humantime_serde::re::humantime::format_duration(MAX_DURATION)
            ),
        );
        return None;
    }
    Some(v)
}

/// Exactly one of `keys` (at most one when not `required`): the key's
/// position, the key, and the comparison.
fn condition(
    d: &mut Diag,
    f: &mut Fields<'_>,
    keys: &'static [(&'static str, Op)],
    required: bool,
) -> Option<(Pos, &'static str, Cmp)> {
    let mut found: Option<(Pos, &'static str, Cmp)> = None;
    let names: Vec<String> = keys.iter().map(|(k, _)| format!("`{k}`")).collect();
    let mut present: Vec<(Pos, &'static str, Op)> = keys
        .iter()
        .filter_map(|&(k, op)| f.entry(k).map(|e| (e.key_pos, k, op)))
        .collect();
    present.sort_by_key(|p| p.0);
    for (i, &(pos, key, op)) in present.iter().enumerate() {
        if i > 0 {
            d.error(
                pos,
                format!(
                    "`{key}` conflicts with `{}`: give only one of {}",
                    present[0].1,
                    names.join(", ")
                ),
            );
            continue;
        }
        if let Some((_, limit)) = f.number(d, key) {
            found = Some((pos, key, Cmp { op, limit }));
        }
    }
    if present.is_empty() && required {
        d.error(
            f.pos(),
            format!("missing the condition: give one of {}", names.join(", ")),
        );
    }
    found
}

fn negate(c: Cmp) -> Cmp {
    let op = match c.op {
        Op::Gt => Op::Le,
        Op::Ge => Op::Lt,
        Op::Lt => Op::Ge,
        Op::Le => Op::Gt,
        Op::Eq => Op::Ne,
        Op::Ne => Op::Eq,
    };
    Cmp { op, limit: c.limit }
}

fn upward(op: Op) -> Option<bool> {
    match op {
        Op::Gt | Op::Ge => Some(true),
        Op::Lt | Op::Le => Some(false),
        Op::Eq | Op::Ne => None,
    }
}

/// Whether some value satisfies both `fire` and `clear`.
pub fn overlaps(fire: Cmp, clear: Cmp) -> bool {
    let inclusive = |op: Op| matches!(op, Op::Ge | Op::Le | Op::Eq);
    match (upward(fire.op), upward(clear.op)) {
        (Some(a), Some(b)) if a == b => true,
        (Some(true), Some(false)) => {
            clear.limit > fire.limit
                || (clear.limit == fire.limit && inclusive(fire.op) && inclusive(clear.op))
        }
        (Some(false), Some(true)) => {
            clear.limit < fire.limit
                || (clear.limit == fire.limit && inclusive(fire.op) && inclusive(clear.op))
        }
        // Equality operators are not written in rule files; be conservative.
        _ => fire.op != negate(clear).op || fire.limit != clear.limit,
    }
}

/// Fire and clear conditions with their hold times.
fn hysteresis(d: &mut Diag, f: &mut Fields<'_>) -> Hysteresis {
    let fire = condition(d, f, COND_KEYS, true);
    let clear = condition(d, f, CLEAR_KEYS, false);
    let for_ = hold(d, f, "for");
    let clear_for = hold(d, f, "clear-for");
    let fire_cmp = fire.map_or(
        Cmp {
            op: Op::Gt,
            limit: 0.0,
        },
        |c| c.2,
    );
    let clear_cmp = match (fire, clear) {
        (Some((_, fk, fc)), Some((cpos, ck, cc))) => {
            if overlaps(fc, cc) {
                let fire_up = upward(fc.op) == Some(true);
                let (side, other) = if fire_up {
                    ("at or below", "clear-below")
                } else {
                    ("at or above", "clear-above")
                };
                let why = if upward(fc.op) == upward(cc.op) {
                    format!(
                        "values {} both limits would fire and clear at once",
                        if fire_up { "above" } else { "below" }
                    )
                } else {
                    format!(
                        "values between {} and {} would fire and clear at once",
                        fc.limit, cc.limit
                    )
                };
                d.error(
                    cpos,
                    format!(
                        "`{ck} = {}` overlaps the fire condition `{fk} = {}` ({why}); for hysteresis use `{other}` with a limit {side} {}",
                        cc.limit, fc.limit, fc.limit
                    ),
                );
            }
            cc
        }
        (_, Some((_, _, cc))) => cc,
        (_, None) => negate(fire_cmp),
    };
    Hysteresis {
        fire: fire_cmp,
        for_,
        clear: clear_cmp,
        clear_for,
    }
}

/// Default summary of each kind.
fn default_summary(kind: &Kind) -> Vec<Piece> {
    let text = match kind {
        Kind::Threshold(_) => "{rule}: {sensor} on {device} is {value} (limit {threshold})",
        Kind::Window { .. } => {
            "{rule}: {sensor} on {device} aggregates to {value} (limit {threshold})"
        }
        Kind::Rate { .. } => "{rule}: {sensor} on {device} changes at {value} (limit {threshold})",
        Kind::Absence { .. } => "{rule}: no reading from {device} {sensor} for {duration}",
        Kind::Offline { .. } => "{rule}: {device} is offline",
        Kind::Count { .. } => "{rule}: {count} {sensor} readings on {device} within {duration}",
        Kind::Sequence { .. } => "{rule}: sequence matched on {device}",
    };
    parse_template(text).unwrap_or_default()
}

/// What is wrong in a summary template; `at` is the character index in
/// the template.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    /// `{value` without `}`.
    #[error("unclosed `{{` in the summary (write `{{{{` for a literal brace)")]
    Unclosed {
        /// Index of the `{`.
        at: usize,
    },
    /// A `}` that closes nothing.
    #[error("unmatched `}}` in the summary (write `}}}}` for a literal brace)")]
    Unmatched {
        /// Index of the `}`.
        at: usize,
    },
    /// `{}`.
    #[error("empty field `{{}}` in the summary")]
    Empty {
        /// Index of the `{`.
        at: usize,
    },
    /// `{bogus}`.
    #[error("unknown summary field `{name}`: expected one of {known}, or labels.NAME", known = TEMPLATE_FIELDS.join(", "))]
    Unknown {
        /// Index of the field name.
        at: usize,
        /// The name.
        name: String,
    },
}

impl TemplateError {
    /// Character index in the template.
    pub fn at(&self) -> usize {
        match self {
            TemplateError::Unclosed { at }
            | TemplateError::Unmatched { at }
            | TemplateError::Empty { at }
            | TemplateError::Unknown { at, .. } => *at,
        }
    }
}

/// Parses a summary template: `{field}` is one of [`TEMPLATE_FIELDS`] or
/// `labels.NAME`; `{{` and `}}` are literal braces; spaces inside the braces
/// are ignored. Returns every error.
pub fn parse_template(text: &str) -> Result<Vec<Piece>, Vec<TemplateError>> {
    let chars: Vec<char> = text.chars().collect();
    let mut pieces = Vec::new();
    let mut errors = Vec::new();
    let mut lit = String::new();
    let mut i = 0;
    while i < chars.len() {
        match (chars[i], chars.get(i + 1)) {
            ('{', Some('{')) | ('}', Some('}')) => {
                lit.push(chars[i]);
                i += 2;
            }
            ('{', _) => {
                let close = chars[i + 1..]
                    .iter()
                    .position(|&c| c == '}' || c == '{')
                    .map(|p| p + i + 1)
                    .filter(|&j| chars[j] == '}');
                let Some(j) = close else {
                    errors.push(TemplateError::Unclosed { at: i });
                    lit.push('{');
                    i += 1;
                    continue;
                };
                let raw: String = chars[i + 1..j].iter().collect();
                let name = raw.trim();
                let name_at = i + 1 + raw.len() - raw.trim_start().len();
                let label_ok = name.strip_prefix("labels.").is_some_and(is_name);
                if name.is_empty() {
                    errors.push(TemplateError::Empty { at: i });
                } else if TEMPLATE_FIELDS.contains(&name) || label_ok {
                    if !lit.is_empty() {
                        pieces.push(Piece::Text(std::mem::take(&mut lit)));
                    }
                    pieces.push(Piece::Field(name.to_owned()));
                } else {
                    errors.push(TemplateError::Unknown {
                        at: name_at,
                        name: name.to_owned(),
                    });
                }
                i = j + 1;
            }
            ('}', _) => {
                errors.push(TemplateError::Unmatched { at: i });
                lit.push('}');
                i += 1;
            }
            (c, _) => {
                lit.push(c);
                i += 1;
            }
        }
    }
    if !lit.is_empty() {
        pieces.push(Piece::Text(lit));
    }
    if errors.is_empty() {
        Ok(pieces)
    } else {
        Err(errors)
    }
}

fn template(d: &mut Diag, node: &Node, text: &str) -> Vec<Piece> {
    match parse_template(text) {
        Ok(p) => p,
        Err(errors) => {
            for e in errors {
                d.error(node.pos_in_string(e.at()), e.to_string());
            }
            Vec::new()
        }
    }
}

/// Renders a summary: text as is, each field from `fields` (called with
/// the field name, e.g. `value` or `labels.site`); a field without a value
/// renders as the empty string.
pub fn render(template: &[Piece], fields: &dyn Fn(&str) -> Option<String>) -> String {
    let mut out = String::new();
    for piece in template {
        match piece {
            Piece::Text(t) => out.push_str(t),
            Piece::Field(f) => {
                if let Some(v) = fields(f) {
                    out.push_str(&v);
                }
            }
        }
    }
    out
}

/// FNV-1a 64 of [`canonical`]: stable across runs and builds, unlike
/// `std`'s randomized hasher. Covers everything but [`Rule::origin`] and
/// the hash itself.
pub fn definition_hash(rule: &Rule) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    canonical(rule)
        .bytes()
        .fold(OFFSET, |h, b| (h ^ u64::from(b)).wrapping_mul(PRIME))
}

/// The canonical text of a rule's definition: versioned, every string
/// length-prefixed, numbers as exact bit patterns, durations in
/// milliseconds. Changing this format changes every hash (a reload after an
/// upgrade would then reset all rule state), so bump the version tag on
/// purpose only.
pub fn canonical(rule: &Rule) -> String {
    use std::fmt::Write as _;
    let mut c = Canon(String::from("outpost-rule-v1"));
    c.s("name", &rule.name);
    c.s("description", &rule.description);
    c.s(
        "glob",
        rule.selector.device_glob.as_deref().unwrap_or("\u{0}none"),
    );
    for (k, v) in &rule.selector.labels {
        c.s("match", k);
        c.s("=", v);
    }
    for dev in &rule.selector.devices {
        c.s("device", dev);
    }
    for s in &rule.sensors {
        c.s("sensor", s);
    }
    match &rule.kind {
        Kind::Threshold(h) => {
            c.s("kind", "threshold");
            c.hyst(h);
        }
        Kind::Window {
            agg,
            size,
            mode,
            limits,
        } => {
            c.s("kind", "window");
            match agg {
                Agg::Avg => c.s("agg", "avg"),
                Agg::Min => c.s("agg", "min"),
                Agg::Max => c.s("agg", "max"),
                Agg::Sum => c.s("agg", "sum"),
                Agg::Count => c.s("agg", "count"),
                Agg::Percentile(p) => c.f("percentile", *p),
            }
            c.d("size", *size);
            c.s(
                "mode",
                match mode {
                    WindowMode::Sliding => "sliding",
                    WindowMode::Tumbling => "tumbling",
                },
            );
            c.hyst(limits);
        }
        Kind::Rate {
            window,
            per,
            limits,
        } => {
            c.s("kind", "rate");
            c.d("window", *window);
            c.d("per", *per);
            c.hyst(limits);
        }
        Kind::Absence { after, scope } => {
            c.s("kind", "absence");
            c.d("after", *after);
            c.s(
                "scope",
                match scope {
                    AbsenceScope::Series => "series",
                    AbsenceScope::Device => "device",
                },
            );
        }
        Kind::Offline { silent_for } => {
            c.s("kind", "offline");
            match silent_for {
                Some(s) => c.d("silent-for", *s),
                None => c.s("silent-for", "none"),
            }
        }
        Kind::Count { cond, n, within } => {
            c.s("kind", "count");
            c.cmp("cond", *cond);
            let _ = write!(c.0, ";n={n}");
            c.d("within", *within);
        }
        Kind::Sequence {
            first,
            then,
            within,
            negate,
            correlate,
        } => {
            c.s("kind", "sequence");
            c.s("first", &first.sensor);
            c.cmp("first-cond", first.cond);
            c.s("then", &then.sensor);
            c.cmp("then-cond", then.cond);
            c.d("within", *within);
            c.s("negate", if *negate { "true" } else { "false" });
            match correlate {
                Correlate::SameDevice => c.s("correlate", "device"),
                Correlate::Label(l) => c.s("correlate-label", l),
            }
        }
    }
    c.s(
        "severity",
        match rule.severity {
            Severity::Info => "info",
            Severity::Warning => "warning",
            Severity::Critical => "critical",
        },
    );
    for (k, v) in &rule.labels {
        c.s("label", k);
        c.s("=", v);
    }
    for p in &rule.summary {
        match p {
            Piece::Text(t) => c.s("text", t),
            Piece::Field(f) => c.s("field", f),
        }
    }
    c.0
}

struct Canon(String);

impl Canon {
    fn s(&mut self, tag: &str, v: &str) {
        use std::fmt::Write as _;
        let _ = write!(self.0, ";{tag}:{}:{v}", v.len());
    }
    fn f(&mut self, tag: &str, v: f64) {
        use std::fmt::Write as _;
        // -0.0 and 0.0 compare equal: hash them alike.
        let v = if v == 0.0 { 0.0 } else { v };
        let _ = write!(self.0, ";{tag}:{:016x}", v.to_bits());
    }
    fn d(&mut self, tag: &str, v: Duration) {
        use std::fmt::Write as _;
        let _ = write!(self.0, ";{tag}:{}ms", v.as_millis());
    }
    fn cmp(&mut self, tag: &str, c: Cmp) {
        let op = match c.op {
            Op::Gt => "gt",
            Op::Ge => "ge",
            Op::Lt => "lt",
            Op::Le => "le",
            Op::Eq => "eq",
            Op::Ne => "ne",
        };
        self.s(tag, op);
        self.f("limit", c.limit);
    }
    fn hyst(&mut self, h: &Hysteresis) {
        self.cmp("fire", h.fire);
        self.d("for", h.for_);
        self.cmp("clear", h.clear);
        self.d("clear-for", h.clear_for);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(text: &str) -> Rule {
        let (rules, errors) = compile_str("t.toml", text);
        assert_eq!(errors, [], "unexpected errors");
        assert_eq!(rules.len(), 1);
        rules.into_iter().next().unwrap()
    }

    fn cmp(op: Op, limit: f64) -> Cmp {
        Cmp { op, limit }
    }

    #[test]
    fn threshold_with_explicit_clear() {
        let r = one(r#"
[[rule]]
name = "hot"
description = "d"
devices = "boiler-*"
labels = { site = "north", rack = "*" }
device-list = ["a", "b"]
sensor = "temperature"
kind = "threshold"
above = 80
for = "30s"
clear-below = 75.5
clear-for = "10s"
severity = "critical"
alert-labels = { team = "ops" }
summary = "{device} {{x}} {labels.site}"
"#);
        assert_eq!(r.name, "hot");
        assert_eq!(r.description, "d");
        assert_eq!(r.selector.device_glob.as_deref(), Some("boiler-*"));
        assert_eq!(r.selector.labels.len(), 2);
        assert_eq!(r.selector.labels["rack"], "*");
        assert_eq!(r.selector.devices, ["a", "b"]);
        assert_eq!(r.sensors, ["temperature"]);
        assert_eq!(
            r.kind,
            Kind::Threshold(Hysteresis {
                fire: cmp(Op::Gt, 80.0),
                for_: Duration::from_secs(30),
                clear: cmp(Op::Lt, 75.5),
                clear_for: Duration::from_secs(10),
            })
        );
        assert_eq!(r.severity, Severity::Critical);
        assert_eq!(r.labels["team"], "ops");
        assert_eq!(
            r.summary,
            [
                Piece::Field("device".into()),
                Piece::Text(" {x} ".into()),
                Piece::Field("labels.site".into()),
            ]
        );
        assert_eq!(
            r.origin,
            Origin {
                file: "t.toml".into(),
                line: 2
            }
        );
        assert_eq!(r.definition_hash, definition_hash(&r));
    }

    #[test]
    fn threshold_defaults_clear_to_the_negation() {
        let r = one(
            "[[rule]]\nname = \"x\"\nsensors = [\"a\", \"b\"]\nkind = \"threshold\"\nbelow = 5\n",
        );
        assert_eq!(r.sensors, ["a", "b"]);
        assert_eq!(r.severity, DEFAULT_SEVERITY);
        assert_eq!(r.selector, Selector::default());
        assert_eq!(
            r.kind,
            Kind::Threshold(Hysteresis {
                fire: cmp(Op::Lt, 5.0),
                for_: Duration::ZERO,
                clear: cmp(Op::Ge, 5.0),
                clear_for: Duration::ZERO,
            })
        );
        assert!(!r.summary.is_empty(), "a default summary");
    }

    #[test]
    fn window() {
        let r = one("[[rule]]\nname = \"w\"\nsensor = \"t\"\nkind = \"window\"\nfunction = \"p99.9\"\nsize = \"5m\"\nmode = \"tumbling\"\nat-least = 3\nclear-at-most = 2\nfor = \"1m\"\n");
        assert_eq!(
            r.kind,
            Kind::Window {
                agg: Agg::Percentile(99.9),
                size: Duration::from_secs(300),
                mode: WindowMode::Tumbling,
                limits: Hysteresis {
                    fire: cmp(Op::Ge, 3.0),
                    for_: Duration::from_secs(60),
                    clear: cmp(Op::Le, 2.0),
                    clear_for: Duration::ZERO,
                },
            }
        );
        for (f, agg) in [
            ("avg", Agg::Avg),
            ("min", Agg::Min),
            ("max", Agg::Max),
            ("sum", Agg::Sum),
            ("count", Agg::Count),
            ("p100", Agg::Percentile(100.0)),
        ] {
            let r = one(&format!(
                "[[rule]]\nname = \"w\"\nsensor = \"t\"\nkind = \"window\"\nfunction = \"{f}\"\nsize = \"1s\"\nabove = 1\n"
            ));
            let Kind::Window { agg: got, mode, .. } = r.kind else {
                panic!("{f}: not a window")
            };
            assert_eq!((got, mode), (agg, WindowMode::Sliding), "{f}");
        }
    }

    #[test]
    fn rate() {
        let r = one("[[rule]]\nname = \"r\"\nsensor = \"t\"\nkind = \"rate\"\nwindow = \"1m\"\nper = \"minute\"\nbelow = -2\n");
        assert_eq!(
            r.kind,
            Kind::Rate {
                window: Duration::from_secs(60),
                per: Duration::from_secs(60),
                limits: Hysteresis {
                    fire: cmp(Op::Lt, -2.0),
                    for_: Duration::ZERO,
                    clear: cmp(Op::Ge, -2.0),
                    clear_for: Duration::ZERO,
                },
            }
        );
        let r = one("[[rule]]\nname = \"r\"\nsensor = \"t\"\nkind = \"rate\"\nwindow = \"10s\"\nabove = 1\n");
        assert!(matches!(r.kind, Kind::Rate { per, .. } if per == Duration::from_secs(1)));
    }

    #[test]
    fn absence_and_offline() {
        let r = one("[[rule]]\nname = \"a\"\nsensor = \"t\"\nkind = \"absence\"\nafter = \"2m\"\n");
        assert_eq!(
            r.kind,
            Kind::Absence {
                after: Duration::from_secs(120),
                scope: AbsenceScope::Series
            }
        );
        let r = one("[[rule]]\nname = \"a\"\ndevice-list = [\"gw\"]\nkind = \"absence\"\nafter = \"1h\"\nscope = \"device\"\n");
        assert_eq!(
            r.kind,
            Kind::Absence {
                after: Duration::from_secs(3600),
                scope: AbsenceScope::Device
            }
        );
        assert!(r.sensors.is_empty());
        let r = one("[[rule]]\nname = \"o\"\nkind = \"offline\"\n");
        assert_eq!(r.kind, Kind::Offline { silent_for: None });
        let r = one("[[rule]]\nname = \"o\"\nkind = \"offline\"\nsilent-for = \"5m\"\n");
        assert_eq!(
            r.kind,
            Kind::Offline {
                silent_for: Some(Duration::from_secs(300))
            }
        );
    }

    #[test]
    fn count() {
        let r = one("[[rule]]\nname = \"c\"\nsensor = \"t\"\nkind = \"count\"\nat-most = 0\nn = 3\nwithin = \"10m\"\n");
        assert_eq!(
            r.kind,
            Kind::Count {
                cond: cmp(Op::Le, 0.0),
                n: 3,
                within: Duration::from_secs(600)
            }
        );
    }

    #[test]
    fn sequence() {
        let r = one(r#"
[[rule]]
name = "s"
kind = "sequence"
first = { sensor = "door", above = 0.5 }
then = { sensor = "alarm", above = 0.5 }
within = "30s"
"#);
        assert_eq!(r.sensors, ["door", "alarm"]);
        assert_eq!(
            r.kind,
            Kind::Sequence {
                first: Step {
                    sensor: "door".into(),
                    cond: cmp(Op::Gt, 0.5)
                },
                then: Step {
                    sensor: "alarm".into(),
                    cond: cmp(Op::Gt, 0.5)
                },
                within: Duration::from_secs(30),
                negate: false,
                correlate: Correlate::SameDevice,
            }
        );
        let r = one(r#"
[[rule]]
name = "s"
kind = "sequence"
within = "2m"
negate = true
correlate = { label = "site" }
[rule.first]
sensor = "t"
above = 80
[rule.then]
sensor = "t"
below = 40
"#);
        assert_eq!(r.sensors, ["t"]);
        let Kind::Sequence {
            negate, correlate, ..
        } = r.kind
        else {
            panic!("not a sequence")
        };
        assert!(negate);
        assert_eq!(correlate, Correlate::Label("site".into()));
    }

    #[test]
    fn hysteresis_overlap_rules() {
        let gt = |l| cmp(Op::Gt, l);
        let lt = |l| cmp(Op::Lt, l);
        let le = |l| cmp(Op::Le, l);
        let ge = |l| cmp(Op::Ge, l);
        assert!(!overlaps(gt(80.0), lt(75.0)));
        assert!(!overlaps(gt(80.0), lt(80.0)));
        assert!(!overlaps(gt(80.0), le(80.0)), "the default negation");
        assert!(!overlaps(ge(80.0), lt(80.0)));
        assert!(overlaps(ge(80.0), le(80.0)), "80 both fires and clears");
        assert!(overlaps(gt(80.0), lt(85.0)));
        assert!(overlaps(gt(80.0), gt(70.0)), "same direction");
        assert!(!overlaps(lt(5.0), gt(10.0)));
        assert!(overlaps(lt(5.0), gt(2.0)));
        assert!(overlaps(le(5.0), ge(5.0)));
    }

    #[test]
    fn template_parsing() {
        assert_eq!(
            parse_template("a {{b}} { value }{labels.x-y}"),
            Ok(vec![
                Piece::Text("a {b} ".into()),
                Piece::Field("value".into()),
                Piece::Field("labels.x-y".into()),
            ])
        );
        assert_eq!(parse_template(""), Ok(vec![]));
        assert_eq!(
            parse_template("x {bogus} } {} {value"),
            Err(vec![
                TemplateError::Unknown {
                    at: 3,
                    name: "bogus".into()
                },
                TemplateError::Unmatched { at: 10 },
                TemplateError::Empty { at: 12 },
                TemplateError::Unclosed { at: 15 },
            ])
        );
        assert!(parse_template("{labels.}").is_err());
        assert!(parse_template("{labels.a b}").is_err());
    }

    #[test]
    fn rendering_with_labels_and_escapes() {
        let t =
            parse_template("{{{device}}}: {value} at site {labels.site}{labels.none}!").unwrap();
        let fields = |f: &str| match f {
            "device" => Some("boiler-1".to_owned()),
            "value" => Some("81.5".to_owned()),
            "labels.site" => Some("north".to_owned()),
            _ => None,
        };
        assert_eq!(render(&t, &fields), "{boiler-1}: 81.5 at site north!");
    }

    #[test]
    fn definition_hash_is_pinned() {
        // Pinned: a change here resets the state of every rule on upgrade.
        let text = "[[rule]]\nname = \"hot\"\nsensor = \"temperature\"\nkind = \"threshold\"\nabove = 80\nclear-below = 75\nfor = \"10s\"\nsummary = \"{device} hot\"\n";
        let r = one(text);
        assert_eq!(
            canonical(&r),
            "outpost-rule-v1;name:3:hot;description:0:;glob:5:\u{0}none;sensor:11:temperature\
             ;kind:9:threshold;fire:2:gt;limit:4054000000000000;for:10000ms;clear:2:lt\
             ;limit:4052c00000000000;clear-for:0ms;severity:7:warning;field:6:device;text:4: hot"
        );
        assert_eq!(r.definition_hash, 12_947_162_096_309_385_038);
    }
}
