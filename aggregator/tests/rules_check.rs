//! Rule files as `outpost-aggregator rules check` sees them: the shipped
//! examples, every kind of error with its `file:line:column`, and the
//! directory-level behaviour (bad files load nothing, duplicate names across
//! files, definition hashes).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use outpost_aggregator::rules::compile::{check_dir, load_dir};
use outpost_aggregator::rules::model::{Kind, Rule};

fn shipped_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/rules.d")
}

/// A temporary rule directory holding `files`.
fn dir_with(files: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (name, text) in files {
        std::fs::write(dir.path().join(name), text).unwrap();
    }
    dir
}

/// Loads `files` and returns the rules and the errors as printed, with the
/// directory prefix removed (`a.toml:3:8: message`).
fn load(files: &[(&str, &str)]) -> (Vec<Rule>, Vec<String>) {
    let dir = dir_with(files);
    let (rules, errors) = load_dir(dir.path());
    let prefix = format!("{}/", dir.path().display());
    let errors = errors
        .iter()
        .map(|e| e.to_string().replace(&prefix, ""))
        .collect();
    (rules, errors)
}

/// The errors of one file `r.toml`.
fn errors(text: &str) -> Vec<String> {
    let (rules, errors) = load(&[("r.toml", text)]);
    assert!(rules.is_empty(), "a file with errors loads no rules");
    errors
}

/// A threshold rule with `extra` lines appended (its header is line 1,
/// `extra` starts on line 5).
fn threshold(extra: &str) -> String {
    format!("[[rule]]\nname = \"hot\"\nsensor = \"temperature\"\nkind = \"threshold\"\n{extra}")
}

#[test]
fn shipped_examples_pass_and_cover_every_kind() {
    let dir = shipped_dir();
    assert_eq!(check_dir(&dir), Ok(11));
    let (rules, errors) = load_dir(&dir);
    assert!(errors.is_empty());
    let kinds: std::collections::BTreeSet<&str> = rules
        .iter()
        .map(|r| match &r.kind {
            Kind::Threshold(_) => "threshold",
            Kind::Window { .. } => "window",
            Kind::Rate { .. } => "rate",
            Kind::Absence { .. } => "absence",
            Kind::Offline { .. } => "offline",
            Kind::Count { .. } => "count",
            Kind::Sequence { negate, .. } => {
                if *negate {
                    "sequence-negated"
                } else {
                    "sequence"
                }
            }
        })
        .collect();
    assert_eq!(kinds.len(), 8, "{kinds:?}");
    // The rule the simulator's ramp scenario drives.
    let hot = rules.iter().find(|r| r.name == "boiler-overheat").unwrap();
    assert_eq!(hot.sensors, ["temperature"]);
    assert!(hot.origin.file.ends_with("boiler.toml"));
}

#[test]
fn toml_syntax_errors_have_positions() {
    assert_eq!(
        errors("[[rule]]\nname = \"x\"\nabove = \n"),
        ["r.toml:3:9: string values must be quoted, expected literal string"]
    );
}

#[test]
fn unknown_fields() {
    assert_eq!(
        errors(&threshold(
            "above = 80\ntreshold = 1\nclear_below = 70\nsize = \"1m\"\n"
        )),
        [
            "r.toml:6:1: unknown field `treshold`",
            "r.toml:7:1: unknown field `clear_below`; did you mean `clear-below`?",
            "r.toml:8:1: `size` is not a parameter of threshold rules (it belongs to window rules)",
        ]
    );
}

#[test]
fn wrong_types() {
    assert_eq!(
        errors(&threshold(
            "above = \"80\"\nfor = 30\nseverity = 3\nalert-labels = { team = 1 }\n"
        )),
        [
            "r.toml:5:9: `above` must be a number, found a string",
            "r.toml:6:7: `for` must be a duration string such as \"30s\", found an integer",
            "r.toml:7:12: `severity` must be a string, found an integer",
            "r.toml:8:25: `alert-labels.team` must be a string, found an integer",
        ]
    );
}

#[test]
fn missing_required_fields_point_at_the_rule_header() {
    assert_eq!(
        errors("# c\n[[rule]]\ndescription = \"x\"\n"),
        [
            "r.toml:2:1: missing `name` (every rule needs a unique name)",
            "r.toml:2:1: missing `kind` (one of threshold, window, rate, absence, offline, count, sequence)",
        ]
    );
    assert_eq!(
        errors("[[rule]]\nname = \"w\"\nsensor = \"t\"\nkind = \"window\"\n"),
        [
            "r.toml:1:1: missing `function` (avg, min, max, sum, count or pNN)",
            "r.toml:1:1: missing `size` (the window length, e.g. \"5m\")",
            "r.toml:1:1: missing the condition: give one of `above`, `below`, `at-least`, `at-most`",
        ]
    );
}

#[test]
fn sensor_missing_or_not_wanted() {
    assert_eq!(
        errors("[[rule]]\nname = \"x\"\nkind = \"threshold\"\nabove = 1\n"),
        ["r.toml:1:1: missing `sensor` (or `sensors`): threshold rules read one or more sensors"]
    );
    assert_eq!(
        errors("[[rule]]\nname = \"x\"\nkind = \"offline\"\nsensor = \"t\"\n"),
        ["r.toml:4:1: `sensor`/`sensors` is not used by offline rules (they watch the device)"]
    );
    assert_eq!(
        errors("[[rule]]\nname = \"x\"\nkind = \"count\"\nsensor = \"t\"\nsensors = [\"u\"]\nabove = 1\nn = 2\nwithin = \"1m\"\n"),
        ["r.toml:5:1: give either `sensor` or `sensors`, not both"]
    );
}

#[test]
fn overlapping_clear_condition_is_rejected() {
    assert_eq!(
        errors(&threshold("above = 80\nclear-above = 70\n")),
        ["r.toml:6:1: `clear-above = 70` overlaps the fire condition `above = 80` (values above both limits would fire and clear at once); for hysteresis use `clear-below` with a limit at or below 80"]
    );
    assert_eq!(
        errors(&threshold("above = 80\nclear-below = 85\n")),
        ["r.toml:6:1: `clear-below = 85` overlaps the fire condition `above = 80` (values between 80 and 85 would fire and clear at once); for hysteresis use `clear-below` with a limit at or below 80"]
    );
    assert_eq!(
        errors(&threshold("above = 80\nbelow = 5\n")),
        ["r.toml:6:1: `below` conflicts with `above`: give only one of `above`, `below`, `at-least`, `at-most`"]
    );
}

#[test]
fn bad_durations() {
    assert_eq!(
        errors(&threshold(
            "above = 80\nfor = \"-5s\"\nclear-for = \"400days\"\nclear-below = 1\n"
        )),
        [
            "r.toml:6:7: `for`: durations cannot be negative (`-5s`)",
            "r.toml:7:13: `clear-for` is longer than the limit of 30days",
        ]
    );
    let e = errors(&threshold("above = 80\nfor = \"soon\"\n"));
    assert_eq!(e.len(), 1);
    assert!(
        e[0].starts_with("r.toml:6:7: `for`: invalid duration `soon`"),
        "{e:?}"
    );
}

#[test]
fn window_size_zero_and_percentile_out_of_range() {
    let w = |function: &str, size: &str| {
        errors(&format!(
            "[[rule]]\nname = \"w\"\nsensor = \"t\"\nkind = \"window\"\nfunction = \"{function}\"\nsize = \"{size}\"\nabove = 1\n"
        ))
    };
    assert_eq!(
        w("avg", "0s"),
        ["r.toml:6:8: `size` must be longer than zero"]
    );
    assert_eq!(
        w("p0", "1m"),
        ["r.toml:5:12: percentile `p0` is out of range: it must be above 0 and at most 100"]
    );
    assert_eq!(
        w("p101", "1m"),
        ["r.toml:5:12: percentile `p101` is out of range: it must be above 0 and at most 100"]
    );
    assert_eq!(
        w("median", "1m"),
        ["r.toml:5:12: unknown function `median`: expected avg, min, max, sum, count or pNN (a percentile, e.g. p95)"]
    );
}

#[test]
fn unknown_template_fields_point_into_the_string() {
    assert_eq!(
        errors(&threshold("above = 80\nsummary = \"{device} is {valeu} {labels.} {\"\n")),
        [
            "r.toml:6:25: unknown summary field `valeu`: expected one of rule, device, sensor, value, threshold, duration, severity, state, count, or labels.NAME",
            "r.toml:6:33: unknown summary field `labels.`: expected one of rule, device, sensor, value, threshold, duration, severity, state, count, or labels.NAME",
            "r.toml:6:42: unclosed `{` in the summary (write `{{` for a literal brace)",
        ]
    );
}

#[test]
fn bad_names_kinds_and_values() {
    assert_eq!(
        errors(
            "[[rule]]\nname = \"has space\"\nkind = \"thresh\"\nseverity = \"high\"\nsensor = \"t\"\n"
        ),
        [
            "r.toml:2:8: invalid rule name `has space`: use 1 to 128 characters of A-Z, a-z, 0-9, `_`, `.`, `-`",
            "r.toml:3:8: unknown kind `thresh`: expected one of threshold, window, rate, absence, offline, count, sequence",
            "r.toml:4:12: unknown severity `high`: expected info, warning or critical",
        ]
    );
    assert_eq!(
        errors("[[rule]]\nname = \"c\"\nsensor = \"t\"\nkind = \"count\"\nabove = 1\nn = 0\nwithin = \"1m\"\n"),
        ["r.toml:6:5: `n` = 0 is out of range: must be 1 to 10000"]
    );
    assert_eq!(
        errors("[[rule]]\nname = \"s\"\nkind = \"sequence\"\nfirst = { sensor = \"a\" }\nthen = { above = 1, x = 2 }\nwithin = \"1m\"\ncorrelate = \"site\"\n"),
        [
            "r.toml:4:9: missing the condition: give one of `above`, `below`, `at-least`, `at-most`",
            "r.toml:5:8: missing `sensor` (the sensor of the `then` step)",
            "r.toml:5:21: unknown field `x` in `then`: a step has `sensor` and one of `above`, `below`, `at-least`, `at-most`",
            "r.toml:7:13: `correlate` must be \"device\" or { label = \"NAME\" }",
        ]
    );
}

#[test]
fn every_error_of_every_rule_is_reported() {
    let text = "[[rule]]\nname = \"a\"\nsensor = \"t\"\nkind = \"threshold\"\nabove = 1\nfor = \"x\"\nbogus = 1\n\n[[rule]]\nname = \"b\"\nkind = \"absence\"\n";
    let e = errors(text);
    let at: Vec<&str> = e.iter().map(|e| e.split(": ").next().unwrap()).collect();
    assert_eq!(at, ["r.toml:6:7", "r.toml:7:1", "r.toml:9:1", "r.toml:9:1"]);
}

#[test]
fn a_bad_file_loads_nothing_and_the_others_still_load() {
    let good = "[[rule]]\nname = \"ok\"\nkind = \"offline\"\n";
    let bad = "[[rule]]\nname = \"fine\"\nkind = \"offline\"\n\n[[rule]]\nname = \"broken\"\nkind = \"offline\"\nsilent-for = \"0s\"\n";
    let (rules, errors) = load(&[
        ("a.toml", good),
        ("b.toml", bad),
        ("notes.txt", "not a rule file"),
        (".hidden.toml", "garbage ="),
    ]);
    let names: Vec<&str> = rules.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["ok"]);
    assert_eq!(
        errors,
        ["b.toml:8:14: `silent-for` must be longer than zero"]
    );
    let dir = dir_with(&[("a.toml", good), ("b.toml", bad)]);
    assert_eq!(check_dir(dir.path()).map_err(|e| e.len()), Err(1));
}

#[test]
fn duplicate_names_across_files_name_both_places() {
    let a = "[[rule]]\nname = \"dup\"\nkind = \"offline\"\n";
    let b = "# b\n\n[[rule]]\nname   =   \"dup\"\nkind = \"offline\"\n";
    let (rules, errors) = load(&[("a.toml", a), ("b.toml", b)]);
    assert_eq!(rules.len(), 1);
    assert_eq!(rules[0].origin.file.rsplit('/').next(), Some("a.toml"));
    assert_eq!(
        errors,
        ["b.toml:4:12: duplicate rule name `dup` (first defined at a.toml:2:8)"]
    );
    // In one file, too.
    let (_, errors) = load(&[("c.toml", &format!("{a}\n{a}"))]);
    assert_eq!(
        errors,
        ["c.toml:6:8: duplicate rule name `dup` (first defined at c.toml:2:8)"]
    );
}

#[test]
fn missing_directory_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let gone = dir.path().join("nope");
    let errors = check_dir(&gone).unwrap_err();
    assert_eq!(errors.len(), 1);
    assert_eq!((errors[0].line, errors[0].column), (1, 1));
    assert!(errors[0].message.starts_with("cannot read the directory"));
}

#[test]
fn definition_hash_follows_the_definition_not_the_location() {
    let rule = "[[rule]]\nname = \"hot\"\nsensor = \"temperature\"\nkind = \"threshold\"\nabove = 80\nclear-below = 75\nfor = \"10s\"\n";
    let hash = |files: &[(&str, &str)]| {
        let (rules, errors) = load(files);
        assert!(errors.is_empty(), "{errors:?}");
        rules[0].definition_hash
    };
    let base = hash(&[("a.toml", rule)]);
    // Same run, again: stable.
    assert_eq!(hash(&[("a.toml", rule)]), base);
    // Another file, other lines, reordered keys, comments: same definition.
    let moved = "# moved\n\n\n[[rule]]\nfor = \"10s\"   # hold\nkind = \"threshold\"\nname = \"hot\"\nabove = 80.0\nsensor = \"temperature\"\nclear-below = 75\n";
    assert_eq!(hash(&[("z.toml", moved)]), base);
    // Any parameter change: a different definition.
    for changed in [
        rule.replace("above = 80", "above = 81"),
        rule.replace("\"10s\"", "\"11s\""),
        rule.replace("clear-below = 75", "clear-below = 74"),
        rule.replace("temperature", "humidity"),
        format!("{rule}severity = \"critical\"\n"),
        format!("{rule}summary = \"x\"\n"),
        format!("{rule}alert-labels = {{ a = \"b\" }}\n"),
    ] {
        assert_ne!(hash(&[("a.toml", &changed)]), base, "{changed}");
    }
}
