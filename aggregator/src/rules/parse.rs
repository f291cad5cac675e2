//! The syntax layer of rule files: TOML text -> positioned tables.
//!
//! Design: rule files are parsed with `toml`'s span-preserving document
//! parser ([`toml::de::DeTable`]), not with serde derive, because serde stops
//! at the first problem and an admin fixing a file wants every problem at
//! once, each with its `file:line:column`. This module turns the spanned
//! document into an owned tree of [`Node`]s carrying 1-based line/column
//! [`Pos`]itions, and offers [`Fields`], a checked accessor over one table:
//! each getter reports a wrong type as an error into a [`Diag`] and records
//! the key as used, so that what is left at the end are the unknown keys.
//! What the keys *mean* (rule kinds, limits, templates) is
//! [`super::compile`]'s business.
//!
//! Invariants and failure cases:
//! - A file with TOML syntax errors yields all the syntax errors the parser
//!   could recover from and no tables: rule-level checks on a half-parsed
//!   document would only add noise.
//! - The top level may only hold `rule`, an array of tables (`[[rule]]`);
//!   a file without any is valid and defines no rules.
//! - Columns count characters (not bytes) from 1; a tab is one column.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use toml::de::{DeTable, DeValue};
use toml::Spanned;

use super::model::RuleError;

/// The key of the array of rule tables at the top of a file.
pub const RULE_KEY: &str = "rule";

/// A 1-based position in a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default, Hash)]
pub struct Pos {
    /// Line, from 1.
    pub line: usize,
    /// Column in characters, from 1.
    pub column: usize,
}

impl Pos {
    /// The position `chars` characters to the right on the same line.
    pub fn right(self, chars: usize) -> Pos {
        Pos {
            line: self.line,
            column: self.column + chars,
        }
    }
}

/// An owned TOML value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// A string.
    String(String),
    /// An integer.
    Integer(i64),
    /// A float.
    Float(f64),
    /// A boolean.
    Boolean(bool),
    /// A date/time (rules have no use for one, it is kept for the message).
    Datetime(String),
    /// An array.
    Array(Vec<Node>),
    /// A table.
    Table(Table),
}

impl Value {
    /// The TOML name of the value's type, for messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::String(_) => "a string",
            Value::Integer(_) => "an integer",
            Value::Float(_) => "a float",
            Value::Boolean(_) => "a boolean",
            Value::Datetime(_) => "a date-time",
            Value::Array(_) => "an array",
            Value::Table(_) => "a table",
        }
    }
}

/// A value and where it starts.
#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    /// Position of the value's first character (the opening quote of a
    /// string, the `[[` of an array-of-tables entry).
    pub pos: Pos,
    /// The value.
    pub value: Value,
    /// For strings written on one line without escapes: the position of the
    /// first character of the content, so that a problem inside the string
    /// (a template field) can be pointed at exactly.
    pub verbatim_at: Option<Pos>,
}

impl Node {
    /// The position of character `index` of a string's content: exact when
    /// the string is verbatim in the source, else the string's start.
    pub fn pos_in_string(&self, index: usize) -> Pos {
        match self.verbatim_at {
            Some(p) => p.right(index),
            None => self.pos,
        }
    }
}

/// A key of a table with its value.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    /// Where the key is written.
    pub key_pos: Pos,
    /// Its value.
    pub node: Node,
}

/// A table: its position (header or `{`) and its entries by key.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Table {
    /// Where the table starts.
    pub pos: Pos,
    /// Entries by key.
    pub entries: BTreeMap<String, Entry>,
}

/// Collects the errors of one file.
#[derive(Debug, Clone, Default)]
pub struct Diag {
    file: String,
    errors: Vec<RuleError>,
}

impl Diag {
    /// An empty collector for `file` (the path as it will be printed).
    pub fn new(file: &str) -> Self {
        Diag {
            file: file.to_owned(),
            errors: Vec::new(),
        }
    }

    /// The file.
    pub fn file(&self) -> &str {
        &self.file
    }

    /// Records an error at `pos`.
    pub fn error(&mut self, pos: Pos, message: impl Into<String>) {
        self.errors.push(RuleError {
            file: self.file.clone(),
            line: pos.line,
            column: pos.column,
            message: message.into(),
        });
    }

    /// How many errors so far.
    pub fn len(&self) -> usize {
        self.errors.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.errors.is_empty()
    }

    /// The errors, sorted by position (stable: same position keeps the
    /// order they were found in).
    pub fn into_errors(mut self) -> Vec<RuleError> {
        self.errors.sort_by_key(|e| (e.line, e.column));
        self.errors
    }
}

/// Byte offset -> line/column.
#[derive(Debug)]
struct LineIndex<'a> {
    text: &'a str,
    /// Byte offset of the start of each line.
    starts: Vec<usize>,
}

impl<'a> LineIndex<'a> {
    fn new(text: &'a str) -> Self {
        let mut starts = vec![0];
        starts.extend(text.match_indices('\n').map(|(i, _)| i + 1));
        LineIndex { text, starts }
    }

    fn pos(&self, offset: usize) -> Pos {
        let offset = offset.min(self.text.len());
        let line = self.starts.partition_point(|&s| s <= offset).max(1);
        let start = self.starts.get(line - 1).copied().unwrap_or(0);
        let column = self
            .text
            .get(start..offset)
            .map_or(offset - start, |s| s.chars().count())
            + 1;
        Pos { line, column }
    }
}

/// Parses one rule file: the `[[rule]]` tables in file order, or every
/// error found (syntax errors, or a top level that is not `[[rule]]`).
pub fn parse_file(file: &str, text: &str) -> Result<Vec<Table>, Vec<RuleError>> {
    let index = LineIndex::new(text);
    let mut diag = Diag::new(file);
    let (doc, errors) = DeTable::parse_recoverable(text);
    if !errors.is_empty() {
        for e in errors {
            let pos = index.pos(e.span().map_or(0, |s| s.start));
            diag.error(pos, e.message().to_owned());
        }
        return Err(diag.into_errors());
    }
    let mut rules = Vec::new();
    for (key, value) in doc.get_ref().iter() {
        let key_pos = index.pos(key.span().start);
        if key.get_ref() != RULE_KEY {
            diag.error(
                key_pos,
                format!(
                    "unknown top-level key `{}`: a rule file holds only `[[{RULE_KEY}]]` tables",
                    key.get_ref()
                ),
            );
            continue;
        }
        let node = convert(&index, value);
        match node.value {
            Value::Array(items) if items.iter().all(|n| matches!(n.value, Value::Table(_))) => {
                for item in items {
                    if let Value::Table(t) = item.value {
                        rules.push(t);
                    }
                }
            }
            _ => diag.error(
                key_pos,
                format!(
                    "`{RULE_KEY}` must be an array of tables: write each rule as `[[{RULE_KEY}]]`"
                ),
            ),
        }
    }
    if diag.is_empty() {
        rules.sort_by_key(|t| t.pos);
        Ok(rules)
    } else {
        Err(diag.into_errors())
    }
}

fn convert(index: &LineIndex<'_>, value: &Spanned<DeValue<'_>>) -> Node {
    let span = value.span();
    let pos = index.pos(span.start);
    let mut verbatim_at = None;
    let v = match value.get_ref() {
        DeValue::String(s) => {
            let raw = index.text.get(span.clone()).unwrap_or("");
            let quoted = |q: char| {
                raw.len() >= 2
                    && raw.starts_with(q)
                    && raw.ends_with(q)
                    && raw.get(1..raw.len() - 1) == Some(s.as_ref())
            };
            if !s.contains('\n') && (quoted('"') || quoted('\'')) {
                verbatim_at = Some(pos.right(1));
            }
            Value::String(s.to_string())
        }
        DeValue::Integer(i) => match i64::from_str_radix(i.as_str(), i.radix()) {
            Ok(n) => Value::Integer(n),
            // Out of i64 range: keep it as a float so the range check that
            // follows reports it.
            Err(_) => Value::Float(i.as_str().parse().unwrap_or(f64::INFINITY)),
        },
        DeValue::Float(f) => Value::Float(f.as_str().parse().unwrap_or(f64::NAN)),
        DeValue::Boolean(b) => Value::Boolean(*b),
        DeValue::Datetime(d) => Value::Datetime(d.to_string()),
        DeValue::Array(a) => Value::Array(a.iter().map(|n| convert(index, n)).collect()),
        DeValue::Table(t) => Value::Table(convert_table(index, pos, t)),
    };
    Node {
        pos,
        value: v,
        verbatim_at,
    }
}

fn convert_table(index: &LineIndex<'_>, pos: Pos, t: &DeTable<'_>) -> Table {
    let entries = t
        .iter()
        .map(|(k, v)| {
            (
                k.get_ref().to_string(),
                Entry {
                    key_pos: index.pos(k.span().start),
                    node: convert(index, v),
                },
            )
        })
        .collect();
    Table { pos, entries }
}

/// Checked access to the keys of one table; remembers which keys were
/// read so that the rest can be reported as unknown.
#[derive(Debug)]
pub struct Fields<'t> {
    table: &'t Table,
    used: BTreeSet<&'t str>,
}

impl<'t> Fields<'t> {
    /// Access to `table`.
    pub fn new(table: &'t Table) -> Self {
        Fields {
            table,
            used: BTreeSet::new(),
        }
    }

    /// Where the table starts.
    pub fn pos(&self) -> Pos {
        self.table.pos
    }

    /// The entry for `key`, marking it used.
    pub fn entry(&mut self, key: &str) -> Option<&'t Entry> {
        let (k, e) = self.table.entries.get_key_value(key)?;
        self.used.insert(k.as_str());
        Some(e)
    }

    /// Whether `key` is present (does not mark it used).
    pub fn has(&self, key: &str) -> bool {
        self.table.entries.contains_key(key)
    }

    /// Marks `key` used without reading it (to silence the unknown-key
    /// report when its meaning cannot be checked).
    pub fn skip(&mut self, key: &str) {
        let _ = self.entry(key);
    }

    /// The keys not read so far, with their positions.
    pub fn unused(&self) -> Vec<(&'t str, Pos)> {
        self.table
            .entries
            .iter()
            .filter(|(k, _)| !self.used.contains(k.as_str()))
            .map(|(k, e)| (k.as_str(), e.key_pos))
            .collect()
    }

    fn wrong_type(d: &mut Diag, key: &str, node: &Node, expected: &str) {
        d.error(
            node.pos,
            format!(
                "`{key}` must be {expected}, found {}",
                node.value.type_name()
            ),
        );
    }

    /// A string.
    pub fn string(&mut self, d: &mut Diag, key: &str) -> Option<(&'t Node, &'t str)> {
        let e = self.entry(key)?;
        match &e.node.value {
            Value::String(s) => Some((&e.node, s.as_str())),
            _ => {
                Self::wrong_type(d, key, &e.node, "a string");
                None
            }
        }
    }

    /// A finite number (integer or float).
    pub fn number(&mut self, d: &mut Diag, key: &str) -> Option<(Pos, f64)> {
        let e = self.entry(key)?;
        let v = match e.node.value {
            Value::Integer(i) => i as f64,
            Value::Float(f) => f,
            _ => {
                Self::wrong_type(d, key, &e.node, "a number");
                return None;
            }
        };
        if v.is_finite() {
            Some((e.node.pos, v))
        } else {
            d.error(e.node.pos, format!("`{key}` must be a finite number"));
            None
        }
    }

    /// An integer.
    pub fn integer(&mut self, d: &mut Diag, key: &str) -> Option<(Pos, i64)> {
        let e = self.entry(key)?;
        match e.node.value {
            Value::Integer(i) => Some((e.node.pos, i)),
            _ => {
                Self::wrong_type(d, key, &e.node, "an integer");
                None
            }
        }
    }

    /// A boolean.
    pub fn boolean(&mut self, d: &mut Diag, key: &str) -> Option<(Pos, bool)> {
        let e = self.entry(key)?;
        match e.node.value {
            Value::Boolean(b) => Some((e.node.pos, b)),
            _ => {
                Self::wrong_type(d, key, &e.node, "a boolean");
                None
            }
        }
    }

    /// A duration written as a string such as `"30s"`, `"5m"`, `"1h 30m"`.
    pub fn duration(&mut self, d: &mut Diag, key: &str) -> Option<(Pos, Duration)> {
        let e = self.entry(key)?;
        let Value::String(s) = &e.node.value else {
            Self::wrong_type(d, key, &e.node, "a duration string such as \"30s\"");
            return None;
        };
        match parse_duration(s) {
            Ok(v) => Some((e.node.pos, v)),
            Err(err) => {
                d.error(e.node.pos, format!("`{key}`: {err}"));
                None
            }
        }
    }

    /// An array of strings, each with its node.
    pub fn string_list(&mut self, d: &mut Diag, key: &str) -> Option<Vec<(&'t Node, &'t str)>> {
        let e = self.entry(key)?;
        let Value::Array(items) = &e.node.value else {
            Self::wrong_type(d, key, &e.node, "an array of strings");
            return None;
        };
        let mut out = Vec::with_capacity(items.len());
        let mut ok = true;
        for item in items {
            match &item.value {
                Value::String(s) => out.push((item, s.as_str())),
                other => {
                    ok = false;
                    d.error(
                        item.pos,
                        format!(
                            "`{key}` must be an array of strings, found {} in it",
                            other.type_name()
                        ),
                    );
                }
            }
        }
        ok.then_some(out)
    }

    /// A table whose values are all strings: key -> (key position, value
    /// node, value).
    pub fn string_map(
        &mut self,
        d: &mut Diag,
        key: &str,
    ) -> Option<Vec<(&'t str, Pos, &'t Node, &'t str)>> {
        let e = self.entry(key)?;
        let Value::Table(t) = &e.node.value else {
            Self::wrong_type(d, key, &e.node, "a table of strings");
            return None;
        };
        let mut out = Vec::with_capacity(t.entries.len());
        let mut ok = true;
        for (k, v) in &t.entries {
            match &v.node.value {
                Value::String(s) => out.push((k.as_str(), v.key_pos, &v.node, s.as_str())),
                other => {
                    ok = false;
                    d.error(
                        v.node.pos,
                        format!("`{key}.{k}` must be a string, found {}", other.type_name()),
                    );
                }
            }
        }
        ok.then_some(out)
    }

    /// A table.
    pub fn table(&mut self, d: &mut Diag, key: &str) -> Option<&'t Table> {
        let e = self.entry(key)?;
        match &e.node.value {
            Value::Table(t) => Some(t),
            _ => {
                Self::wrong_type(d, key, &e.node, "a table");
                None
            }
        }
    }
}

/// Why a duration string was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    /// `-5s`.
    #[error("durations cannot be negative (`{0}`)")]
    Negative(String),
    /// Not humantime syntax.
    #[error("invalid duration `{text}` ({reason}); write e.g. \"30s\", \"5m\", \"1h 30m\"")]
    Syntax {
        /// The text.
        text: String,
        /// humantime's explanation.
        reason: String,
    },
    /// `1500us`: the engine works in milliseconds.
    #[error("duration `{0}` is not a whole number of milliseconds")]
    SubMillisecond(String),
}

/// Parses a humantime duration (`30s`, `5m`, `1h 30m`, `250ms`); the
/// engine's clock is in milliseconds, so finer durations are rejected.
pub fn parse_duration(text: &str) -> Result<Duration, DurationError> {
    let t = text.trim();
    if t.starts_with('-') {
        return Err(DurationError::Negative(text.to_owned()));
    }
    let d =
        humantime_serde::re::humantime::parse_duration(t).map_err(|e| DurationError::Syntax {
            text: text.to_owned(),
            reason: e.to_string(),
        })?;
    if d.subsec_nanos() % 1_000_000 != 0 {
        return Err(DurationError::SubMillisecond(text.to_owned()));
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_count_characters_from_one() {
        let text = "a = 1\n# é\nbé = 2\n";
        let idx = LineIndex::new(text);
        assert_eq!(idx.pos(0), Pos { line: 1, column: 1 });
        assert_eq!(idx.pos(4), Pos { line: 1, column: 5 });
        assert_eq!(idx.pos(6), Pos { line: 2, column: 1 });
        // "bé = 2": the '=' is the 4th character, 5th byte.
        let eq = text.rfind('=').unwrap_or(0);
        assert_eq!(idx.pos(eq), Pos { line: 3, column: 4 });
        assert_eq!(idx.pos(text.len()), Pos { line: 4, column: 1 });
    }

    #[test]
    fn rule_tables_come_in_file_order_with_header_positions() {
        let text = "# x\n[[rule]]\nname = \"b\"\n\n[[rule]]\nname = \"a\"\n";
        let rules = parse_file("f.toml", text).unwrap();
        assert_eq!(rules.len(), 2);
        assert_eq!(rules[0].pos, Pos { line: 2, column: 1 });
        assert_eq!(rules[1].pos, Pos { line: 5, column: 1 });
        let name = &rules[1].entries["name"];
        assert_eq!(name.key_pos, Pos { line: 6, column: 1 });
        assert_eq!(name.node.pos, Pos { line: 6, column: 8 });
        assert_eq!(name.node.verbatim_at, Some(Pos { line: 6, column: 9 }));
    }

    #[test]
    fn escaped_strings_are_not_verbatim() {
        let rules = parse_file("f.toml", "[[rule]]\ns = \"a\\tb\"\n").unwrap();
        assert_eq!(rules[0].entries["s"].node.verbatim_at, None);
    }

    #[test]
    fn syntax_errors_are_all_reported_with_positions() {
        let errs = parse_file("f.toml", "[[rule]]\nname = \nx = 'a\n").unwrap_err();
        assert!(errs.len() >= 2, "{errs:?}");
        assert_eq!((errs[0].line, errs[0].column), (2, 8));
        assert_eq!(errs[0].file, "f.toml");
    }

    #[test]
    fn top_level_must_be_rule_array() {
        let errs = parse_file("f.toml", "other = 1\n[rule]\nname = \"a\"\n").unwrap_err();
        let msgs: Vec<String> = errs.iter().map(|e| e.to_string()).collect();
        assert_eq!(
            msgs,
            [
                "f.toml:1:1: unknown top-level key `other`: a rule file holds only `[[rule]]` tables",
                "f.toml:2:2: `rule` must be an array of tables: write each rule as `[[rule]]`",
            ]
        );
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("1h 30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert!(matches!(
            parse_duration("-5s"),
            Err(DurationError::Negative(_))
        ));
        assert!(matches!(
            parse_duration("5 parsecs"),
            Err(DurationError::Syntax { .. })
        ));
        assert!(matches!(
            parse_duration("1500us"),
            Err(DurationError::SubMillisecond(_))
        ));
    }
}
