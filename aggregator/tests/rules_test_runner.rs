//! Rule unit tests as `outpost-aggregator rules test FILE...` runs them
//! (`rules::tests`): the shipped tests of `deploy/rules.d/tests/` pass and
//! cover every shipped rule; a wrong expectation, a missing one and a wrong
//! value fail with messages that name them; invalid test files and rule
//! files are reported at `file:line:column`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use outpost_aggregator::rules::compile::load_dir;
use outpost_aggregator::rules::tests::{run_file, run_files, TestFileError};

fn rules_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/rules.d")
}

fn shipped_tests() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(rules_dir().join("tests"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(".test.toml"))
        .collect();
    files.sort();
    files
}

/// A test file `t.test.toml` in a temporary directory: `body` after a
/// `rule-files` line loading the shipped `boiler.toml` (so `body` starts on
/// line 2).
fn boiler_test(body: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.test.toml");
    let boiler = rules_dir().join("boiler.toml");
    let text = format!("rule-files = [{:?}]\n{body}", boiler.display().to_string());
    std::fs::write(&path, text).unwrap();
    (dir, path)
}

/// A boiler-overheat test on `70 85x6 74x3` (pending at 1s, firing at 6s,
/// resolved at 9s) with `expect` appended.
fn overheat(expect: &str) -> String {
    format!(
        r#"[[test]]
name = "overheat"
device = "boiler-1"
rules = ["boiler-overheat"]
[[test.input]]
sensor = "temperature"
series = "70 85x6 74x3"
{expect}"#
    )
}

fn run_to_string(paths: &[PathBuf]) -> (bool, String) {
    let mut out = Vec::new();
    let ok = run_files(paths, &mut out).unwrap();
    (ok, String::from_utf8(out).unwrap())
}

#[test]
fn shipped_tests_pass() {
    let files = shipped_tests();
    assert!(files.len() >= 3, "{files:?}");
    let (ok, out) = run_to_string(&files);
    assert!(ok, "{out}");
    assert!(!out.contains("FAIL"), "{out}");
    let last = out.lines().last().unwrap();
    let passed = out.lines().filter(|l| l.starts_with("PASS ")).count();
    assert!(passed >= 16, "{out}");
    assert_eq!(last, format!("{passed} passed, 0 failed"));
}

#[test]
fn shipped_tests_cover_every_shipped_rule() {
    let (rules, errors) = load_dir(&rules_dir());
    assert!(errors.is_empty(), "{errors:?}");
    let texts: Vec<String> = shipped_tests()
        .iter()
        .map(|p| std::fs::read_to_string(p).unwrap())
        .collect();
    for rule in &rules {
        let expected = format!("rule = \"{}\"", rule.name);
        assert!(
            texts.iter().any(|t| t.contains(&expected)),
            "no shipped test expects a transition of `{}`",
            rule.name
        );
    }
}

#[test]
fn a_passing_test_prints_pass_and_the_summary() {
    let (_dir, path) = boiler_test(&overheat(
        r#"[[test.expect]]
at = "6s"
rule = "boiler-overheat"
state = "firing"
value = 85
threshold = 80
[[test.expect]]
at = "9s"
rule = "boiler-overheat"
state = "resolved"
"#,
    ));
    let report = run_file(&path).unwrap();
    assert!(report.passed(), "{report:?}");
    let (ok, out) = run_to_string(std::slice::from_ref(&path));
    assert!(ok);
    assert_eq!(
        out,
        format!(
            "--- {}\nPASS overheat\n1 passed, 0 failed\n",
            path.display()
        )
    );
}

#[test]
fn a_wrong_time_fails_naming_the_expectation_and_the_actual_transition() {
    let (_dir, path) = boiler_test(&overheat(
        r#"[[test.expect]]
at = "7s"
rule = "boiler-overheat"
state = "firing"
[[test.expect]]
at = "9s"
rule = "boiler-overheat"
state = "resolved"
"#,
    ));
    let report = run_file(&path).unwrap();
    let t = &report.tests[0];
    assert!(!t.passed);
    let file = path.display();
    assert_eq!(
        t.failures,
        [
            format!("missing: boiler-overheat firing on boiler-1 at 7s (expected at {file}:9:1)"),
            "unexpected: boiler-overheat firing on boiler-1/temperature at 6s, value 85 \
             (\"boiler-1: temperature is 85 degC (firing at limit 80)\")"
                .to_owned(),
        ]
    );

    let (ok, out) = run_to_string(std::slice::from_ref(&path));
    assert!(!ok);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[1], "FAIL overheat");
    assert!(lines[2].starts_with("    missing: boiler-overheat firing on boiler-1 at 7s"));
    assert!(lines[3].starts_with("    unexpected: boiler-overheat firing"));
    assert_eq!(lines.last(), Some(&"0 passed, 1 failed"));
}

#[test]
fn an_actual_transition_that_is_not_expected_fails() {
    let (_dir, path) = boiler_test(&overheat(
        r#"[[test.expect]]
at = "6s"
rule = "boiler-overheat"
state = "firing"
"#,
    ));
    let t = &run_file(&path).unwrap().tests[0];
    assert!(!t.passed);
    assert_eq!(t.failures.len(), 1, "{:?}", t.failures);
    assert!(
        t.failures[0].starts_with(
            "unexpected: boiler-overheat resolved on boiler-1/temperature at 9s, value 74"
        ),
        "{:?}",
        t.failures
    );
}

#[test]
fn a_wrong_value_fails_as_a_check_of_the_matched_transition() {
    let (_dir, path) = boiler_test(&overheat(
        r#"[[test.expect]]
at = "6s"
rule = "boiler-overheat"
state = "firing"
value = 86
summary-contains = "boiler-2"
labels = { team = "cooling" }
[[test.expect]]
at = "9s"
rule = "boiler-overheat"
state = "resolved"
"#,
    ));
    let t = &run_file(&path).unwrap().tests[0];
    let prefix = "wrong: boiler-overheat firing on boiler-1/temperature at 6s, value 85";
    assert_eq!(t.failures.len(), 3, "{:?}", t.failures);
    assert!(t.failures.iter().all(|f| f.starts_with(prefix)), "{t:?}");
    assert!(t.failures[0].contains(": value is 85, expected 86 (expected at "));
    assert!(t.failures[1].contains("does not contain \"boiler-2\""));
    assert!(t.failures[2].contains("label team is \"heating\", expected \"cooling\""));
}

#[test]
fn pending_is_compared_only_with_check_pending() {
    // A near miss: pending at 1s, back to normal at 5s.
    let near_miss = r#"[[test]]
name = "near miss"
device = "boiler-1"
rules = ["boiler-overheat"]
CHECK
[[test.input]]
sensor = "temperature"
series = "70 85x4 70x5"
"#;
    let (_d1, quiet) = boiler_test(&near_miss.replace("CHECK", ""));
    assert!(run_file(&quiet).unwrap().passed());

    let (_d2, strict) = boiler_test(&near_miss.replace("CHECK", "check-pending = true"));
    let t = &run_file(&strict).unwrap().tests[0];
    assert_eq!(t.failures.len(), 2, "{t:?}");
    assert!(t.failures[0]
        .starts_with("unexpected: boiler-overheat pending on boiler-1/temperature at 1s"));
    assert!(t.failures[1]
        .starts_with("unexpected: boiler-overheat resolved on boiler-1/temperature at 5s"));
}

#[test]
fn within_accepts_a_range_and_reports_it() {
    let (_dir, path) = boiler_test(&overheat(
        r#"[[test.expect]]
within = ["5s", "7s"]
rule = "boiler-overheat"
state = "firing"
[[test.expect]]
within = ["10s", "20s"]
rule = "boiler-overheat"
state = "resolved"
"#,
    ));
    let t = &run_file(&path).unwrap().tests[0];
    assert_eq!(t.failures.len(), 2, "{t:?}");
    assert!(t.failures[0]
        .starts_with("missing: boiler-overheat resolved on boiler-1 between 10s and 20s"));
    assert!(t.failures[1]
        .starts_with("unexpected: boiler-overheat resolved on boiler-1/temperature at 9s"));
}

#[test]
fn without_a_rules_list_every_loaded_rule_is_compared() {
    let (_dir, path) = boiler_test(&overheat("").replace("rules = [\"boiler-overheat\"]\n", ""));
    let t = &run_file(&path).unwrap().tests[0];
    let rules: std::collections::BTreeSet<&str> = t
        .failures
        .iter()
        .map(|f| f.split_whitespace().nth(1).unwrap())
        .collect();
    assert_eq!(
        rules.into_iter().collect::<Vec<_>>(),
        [
            "boiler-heating-fast",
            "boiler-hot-average",
            "boiler-overheat"
        ]
    );
}

#[test]
fn an_invalid_test_file_is_reported_at_file_line_column() {
    let (_dir, path) = boiler_test(
        r#"[[test]]
name = "bad"
device = "boiler-1"
tick = "0s"
[[test.input]]
sensor = "temperature"
series = "70 hot 85"
[[test.expect]]
at = "5 parsecs"
rule = "boiler-overhet"
state = "firing"
"#,
    );
    let err = run_file(&path).unwrap_err();
    assert!(matches!(err, TestFileError::Invalid(_)), "{err:?}");
    let file = path.display().to_string();
    let msg = err.to_string().replace(&file, "t.test.toml");
    let lines: Vec<&str> = msg.lines().collect();
    assert_eq!(lines.len(), 4, "{msg}");
    assert_eq!(lines[0], "t.test.toml:5:8: `tick` must be above zero");
    assert!(
        lines[1].starts_with("t.test.toml:8:14: series: `hot` is not a number"),
        "{msg}"
    );
    assert!(
        lines[2].starts_with("t.test.toml:10:6: `at`: invalid duration `5 parsecs`"),
        "{msg}"
    );
    assert!(
        lines[3].starts_with(
            "t.test.toml:11:8: rule `boiler-overhet` is not defined in the rule files (they define: boiler-cooling-fast,"
        ),
        "{msg}"
    );

    let (ok, out) = run_to_string(&[path]);
    assert!(!ok);
    assert!(out.contains("\nERROR invalid test file\n"), "{out}");
    assert!(out.contains(":5:8: `tick` must be above zero\n"), "{out}");
    assert!(
        out.ends_with("1 invalid test file\n0 passed, 0 failed\n"),
        "{out}"
    );
}

#[test]
fn unknown_keys_and_bad_states_stop_at_their_position() {
    let (_dir, path) = boiler_test("[[test]]\nname = \"x\"\ndevise = \"boiler-1\"\n");
    let msg = run_file(&path).unwrap_err().to_string();
    assert!(msg.ends_with(":4:1: unknown field `devise`, expected one of `name`, `device`, `labels`, `device-labels`, `interval`, `tick`, `until`, `lateness`, `check-pending`, `rules`, `input`, `expect`"), "{msg}");

    let (_dir, path) = boiler_test(&overheat(
        "[[test.expect]]\nat = \"6s\"\nrule = \"boiler-overheat\"\nstate = \"fring\"\n",
    ));
    let msg = run_file(&path).unwrap_err().to_string();
    assert!(
        msg.ends_with(
            ":12:9: unknown variant `fring`, expected one of `pending`, `firing`, `resolved`"
        ),
        "{msg}"
    );
}

#[test]
fn rule_file_errors_are_reported_as_rules_check_does() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("r.toml"),
        "[[rule]]\nname = \"hot\"\nkind = \"threshold\"\nsensor = \"t\"\nabove = 3\nsummary = \"{valeu}\"\n",
    )
    .unwrap();
    let path = dir.path().join("t.test.toml");
    std::fs::write(
        &path,
        "rule-files = [\"r.toml\", \"missing.toml\"]\n[[test]]\nname = \"x\"\n",
    )
    .unwrap();
    let msg = run_file(&path).unwrap_err().to_string();
    let d = dir.path().display();
    let lines: Vec<&str> = msg.lines().collect();
    assert_eq!(lines.len(), 2, "{msg}");
    assert!(
        lines[0].starts_with(&format!(
            "{d}/t.test.toml:1:25: cannot read rule file `{d}/missing.toml`"
        )),
        "{msg}"
    );
    assert!(
        lines[1].starts_with(&format!("{d}/r.toml:6:13: unknown summary field `valeu`")),
        "{msg}"
    );
}

#[test]
fn an_unreadable_test_file_is_an_error_and_the_run_goes_on() {
    let (_dir, good) = boiler_test(&overheat(
        "[[test.expect]]\nat = \"6s\"\nrule = \"boiler-overheat\"\nstate = \"firing\"\n\
         [[test.expect]]\nat = \"9s\"\nrule = \"boiler-overheat\"\nstate = \"resolved\"\n",
    ));
    let missing = good.with_file_name("missing.test.toml");
    assert!(matches!(
        run_file(&missing),
        Err(TestFileError::Read { .. })
    ));
    let (ok, out) = run_to_string(&[missing, good]);
    assert!(!ok);
    assert!(
        out.contains("missing.test.toml: cannot read the test file: "),
        "{out}"
    );
    assert!(out.contains("\nPASS overheat\n"), "{out}");
    assert!(
        out.ends_with("1 invalid test file\n1 passed, 0 failed\n"),
        "{out}"
    );
}

#[test]
fn status_inputs_other_devices_and_gaps() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.test.toml");
    let presence = rules_dir().join("presence.toml");
    std::fs::write(
        &path,
        format!(
            r#"rule-files = [{:?}]
[[test]]
name = "offline by status, missing by silence"
device = "boiler-1"
rules = ["device-offline", "temperature-missing"]
until = "70s"
[[test.input]]
sensor = "temperature"
interval = "10s"
series = "20 _ 20"                  # 0s, 20s
[[test.input]]
at = "5s"
status = "offline"
[[test.input]]
device = "boiler-2"
at = "6s"
status = "offline"
[[test.expect]]
at = "5s"
rule = "device-offline"
state = "firing"
[[test.expect]]
at = "20s"                          # a reading after the offline status
rule = "device-offline"
state = "resolved"
[[test.expect]]
at = "6s"
rule = "device-offline"
device = "boiler-2"
state = "firing"
[[test.expect]]
at = "50s"                          # 20s + 30s
rule = "temperature-missing"
state = "firing"
"#,
            presence.display().to_string()
        ),
    )
    .unwrap();
    let report = run_file(&path).unwrap();
    assert!(report.passed(), "{report:?}");
}

#[test]
fn a_rule_directory_loads_every_rule_file_in_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.test.toml");
    std::fs::write(
        &path,
        format!(
            r#"rule-files = [{:?}]
[[test]]
name = "offline"
device = "boiler-1"
rules = ["device-offline"]
[[test.input]]
at = "1s"
status = "offline"
[[test.expect]]
at = "1s"
rule = "device-offline"
state = "firing"
"#,
            rules_dir().display().to_string()
        ),
    )
    .unwrap();
    let report = run_file(&path).unwrap();
    assert!(report.passed(), "{report:?}");
}
