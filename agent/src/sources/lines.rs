//! `serial-lines`: a device printing one text line per sample, in one of
//! three formats (what `outpost-sim --format lines|csv|json` writes):
//!
//! * `kv`: `key=value` pairs separated by whitespace and/or commas:
//!   `temperature=21.50 humidity=40.12`. No quoting: values cannot contain
//!   spaces, commas or `=`. A pair with an empty value gives no reading.
//! * `csv`: values only, in the order of the configured `columns`:
//!   `21.50,40.12,1013.00`. An empty field gives no reading; a column named
//!   `-` is skipped; the field count must equal the column count. No
//!   quoting. A line repeating the column names (a header the device prints
//!   at boot) is skipped.
//! * `json`: one object per line: `{"temperature":21.5,"ok":true}`. Numbers,
//!   bools and strings give readings; `null`, arrays and objects give none.
//!
//! # Values
//! Text values are typed simply: `true`/`false` (any case) -> Bool; an
//! optional sign and digits only (fitting i64) -> Int; anything else Rust
//! parses as an f64 (`21.5`, `1e3`) -> F64; everything else -> Str. `nan`
//! and `inf` become F64 with quality BAD (sensors print `nan` when a read
//! fails). JSON numbers: integer literals fitting i64 -> Int, others -> F64.
//!
//! # Mapping
//! `include` (input field names) keeps only those fields; `fields` renames
//! input field -> sensor name. `timestamp-field` names a field holding the
//! sample time as Unix seconds or milliseconds (integer or decimal; values
//! of 10^11 and more are taken as ms); it is not itself a reading. Lines
//! without it are stamped with the receive time; a line whose timestamp
//! cannot be read is malformed.
//!
//! # Framing and errors (sans-IO [`LinesCore`])
//! Lines end at `\n` or `\r` (so LF, CRLF and CR-only devices work; empty
//! lines are ignored). A line is all or nothing: if any part is bad the
//! whole line is dropped and counted as `malformed_line` (not UTF-8, a
//! token that is not `key=value`, wrong CSV field count, bad JSON, a bad
//! timestamp, a sensor name or string value over the batch limits). A line
//! longer than [`MAX_LINE_LEN`] bytes is discarded up to the next line end
//! and counted as `oversize`. After every (re)open the input up to the first
//! line end is discarded: the port may have been opened in the middle of a
//! line, and a truncated `kv` or `csv` line could parse as a wrong value.
//! Lines carry no checksum: noise that keeps the syntax intact (a flipped
//! letter in a key, a digit turned into a letter) gets through as a stray
//! sensor or a Str value; `include` is the defence against the former.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashSet};

use outpost_proto::batch::{MAX_SENSOR_NAME_LEN, MAX_STRING_VALUE_LEN};
use serde::Deserialize;

use super::serial_port::{
    default_baud, default_data_bits, default_stop_bits, ByteCore, Parity, PortSettings,
    SerialDevice,
};
use super::{check_sensor_name, Problems};
use crate::reading::{Quality, Reading, Value};

/// Longest line accepted, in bytes (line end excluded). Longer lines are
/// discarded and counted as `oversize`.
pub const MAX_LINE_LEN: usize = 4096;
/// Characters of a bad line quoted in its log message.
pub const LOG_EXCERPT_CHARS: usize = 64;
/// A timestamp field value at or above this is Unix milliseconds, below it
/// Unix seconds (10^11 s is the year 5138; 10^11 ms is 1973).
pub const UNIX_MS_THRESHOLD: f64 = 1e11;
/// CSV column name meaning "skip this column".
pub const SKIP_COLUMN: &str = "-";

/// Text format of the lines.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LineFormat {
    /// `key=value` pairs (default).
    #[default]
    Kv,
    /// Comma-separated values in `columns` order.
    Csv,
    /// One JSON object per line.
    Json,
}

/// `type = "serial-lines"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct SerialLinesConfig {
    /// Unique source name.
    pub name: String,
    /// Serial device; prefer `/dev/serial/by-id/...`, which survives replugging.
    pub path: String,
    /// Line speed (default 115200).
    #[serde(default = "default_baud")]
    pub baud: u32,
    /// 5-8 (default 8).
    #[serde(default = "default_data_bits")]
    pub data_bits: u8,
    /// none | even | odd (default none).
    #[serde(default)]
    pub parity: Parity,
    /// 1 | 2 (default 1).
    #[serde(default = "default_stop_bits")]
    pub stop_bits: u8,
    /// kv | csv | json (default kv).
    #[serde(default)]
    pub format: LineFormat,
    /// CSV only (required there): field names in order; `-` skips a column.
    #[serde(default)]
    pub columns: Vec<String>,
    /// Renames: input field -> sensor name.
    #[serde(default)]
    pub fields: BTreeMap<String, String>,
    /// Keep only these input fields (all when absent).
    pub include: Option<Vec<String>>,
    /// Field holding the sample time (Unix s or ms); receive time otherwise.
    pub timestamp_field: Option<String>,
}

impl SerialLinesConfig {
    pub(crate) fn port(&self) -> PortSettings {
        PortSettings {
            path: self.path.clone(),
            baud: self.baud,
            data_bits: self.data_bits,
            parity: self.parity,
            stop_bits: self.stop_bits,
        }
    }

    pub(crate) fn validate(&self, key: &str, errors: &mut Vec<String>) {
        self.port().validate(key, errors);
        let csv = self.format == LineFormat::Csv;
        if csv && self.columns.is_empty() {
            errors.push(format!(
                "{key}.columns: required with format = \"csv\" (field names in order, \"-\" to skip one)"
            ));
        }
        if !csv && !self.columns.is_empty() {
            errors.push(format!("{key}.columns: only used with format = \"csv\""));
        }
        let mut seen = HashSet::new();
        for (i, c) in self.columns.iter().enumerate() {
            if c.trim().is_empty() {
                errors.push(format!(
                    "{key}.columns[{i}]: must not be empty (use \"-\" to skip a column)"
                ));
            } else if c != SKIP_COLUMN && !seen.insert(c.as_str()) {
                errors.push(format!("{key}.columns[{i}]: {c:?} appears twice"));
            }
        }
        // With CSV every field name must be a column: catches typos.
        let known = |f: &str| !csv || seen.contains(f);
        for (from, to) in &self.fields {
            if from.is_empty() {
                errors.push(format!(
                    "{key}.fields: an empty field name cannot be renamed"
                ));
            } else if !known(from) {
                errors.push(format!("{key}.fields.{from}: not one of the columns"));
            }
            check_sensor_name(key, &format!("fields.{from}"), to, errors);
        }
        if let Some(include) = &self.include {
            if include.is_empty() {
                errors.push(format!(
                    "{key}.include: must not be empty (omit it to keep every field)"
                ));
            }
            for (i, f) in include.iter().enumerate() {
                if f.is_empty() || !known(f) {
                    errors.push(format!(
                        "{key}.include[{i}]: {f:?} is not a field name{}",
                        if csv { " of the columns" } else { "" }
                    ));
                }
            }
        }
        if let Some(t) = &self.timestamp_field {
            if t.is_empty() || !known(t) {
                errors.push(format!(
                    "{key}.timestamp-field: {t:?} is not a field name{}",
                    if csv { " of the columns" } else { "" }
                ));
            }
        }
    }
}

/// The running source's device.
pub(crate) fn device(config: SerialLinesConfig) -> SerialDevice<LinesCore> {
    SerialDevice::new(
        config.port(),
        LinesCore::new(&config),
        "malformed lines skipped",
    )
}

/// Why a line was dropped.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum LineError {
    /// Not valid UTF-8.
    #[error("line is not valid UTF-8")]
    NotUtf8,
    /// A kv token without `=` or with an empty key.
    #[error("expected key=value, got {0:?}")]
    KvToken(String),
    /// Wrong number of CSV fields.
    #[error("expected {expected} comma-separated fields, got {got}")]
    CsvFields {
        /// Configured columns.
        expected: usize,
        /// Fields in the line.
        got: usize,
    },
    /// Not a JSON object.
    #[error("not a JSON object: {0}")]
    Json(String),
    /// The timestamp field is not a Unix time.
    #[error("timestamp field {field:?} is not a Unix time in s or ms")]
    Timestamp {
        /// The timestamp field.
        field: String,
    },
    /// A sensor name over the batch limit.
    #[error("sensor name longer than {MAX_SENSOR_NAME_LEN} bytes")]
    NameTooLong,
    /// A string value over the batch limit.
    #[error("value of {field:?} longer than {MAX_STRING_VALUE_LEN} bytes")]
    ValueTooLong {
        /// The field.
        field: String,
    },
}

/// Splits a byte stream into lines; see the module documentation.
#[derive(Debug, Clone)]
pub struct LineSplitter {
    buf: Vec<u8>,
    /// Discarding an over-long line up to the next line end.
    skipping: bool,
    /// Discarding a possibly partial first line after an open.
    resync: bool,
}

/// What [`LineSplitter::feed`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Piece<'a> {
    /// A complete, non-empty line without its line end.
    Line(&'a [u8]),
    /// A line longer than [`MAX_LINE_LEN`] was discarded.
    TooLong,
}

impl Default for LineSplitter {
    fn default() -> Self {
        Self::new()
    }
}

impl LineSplitter {
    /// A splitter at a line start (no resync).
    pub fn new() -> Self {
        LineSplitter {
            buf: Vec::new(),
            skipping: false,
            resync: false,
        }
    }

    /// Drop any partial line and discard input up to the next line end.
    pub fn resync(&mut self) {
        self.buf.clear();
        self.skipping = false;
        self.resync = true;
    }

    /// Feeds bytes; calls `f` for every line (or over-long line) they end.
    pub fn feed(&mut self, bytes: &[u8], mut f: impl FnMut(Piece<'_>)) {
        for &b in bytes {
            let end = b == b'\n' || b == b'\r';
            if self.resync {
                self.resync = !end;
                continue;
            }
            if end {
                if !self.skipping && !self.buf.is_empty() {
                    f(Piece::Line(&self.buf));
                }
                self.skipping = false;
                self.buf.clear();
            } else if self.skipping {
                // discarding the rest of an over-long line
            } else if self.buf.len() >= MAX_LINE_LEN {
                self.buf.clear();
                self.skipping = true;
                f(Piece::TooLong);
            } else {
                self.buf.push(b);
            }
        }
    }
}

/// Turns one line into readings; see the module documentation.
#[derive(Debug, Clone)]
pub struct LineParser {
    format: LineFormat,
    columns: Vec<String>,
    fields: BTreeMap<String, String>,
    include: Option<HashSet<String>>,
    timestamp_field: Option<String>,
}

impl LineParser {
    /// A parser for `config`.
    pub fn new(config: &SerialLinesConfig) -> Self {
        LineParser {
            format: config.format,
            columns: config.columns.clone(),
            fields: config.fields.clone(),
            include: config.include.as_ref().map(|v| v.iter().cloned().collect()),
            timestamp_field: config.timestamp_field.clone(),
        }
    }

    /// Parses `line` (without its line end) received at `now_ms`, appending
    /// its readings to `out`; on error appends nothing.
    pub fn parse(&self, line: &[u8], now_ms: i64, out: &mut Vec<Reading>) -> Result<(), LineError> {
        let text = std::str::from_utf8(line).map_err(|_| LineError::NotUtf8)?;
        let text = text.trim();
        if text.is_empty() {
            return Ok(());
        }
        let mut pairs = match self.format {
            LineFormat::Kv => kv_pairs(text)?,
            LineFormat::Csv => self.csv_pairs(text)?,
            LineFormat::Json => json_pairs(text)?,
        };
        let mut time_ms = now_ms;
        if let Some(tf) = &self.timestamp_field {
            if let Some(pos) = pairs.iter().position(|(k, _)| k.as_ref() == tf.as_str()) {
                let (_, v) = pairs.remove(pos);
                time_ms = unix_ms(&v).ok_or_else(|| LineError::Timestamp { field: tf.clone() })?;
            }
        }
        let start = out.len();
        for (field, value) in pairs {
            if self
                .include
                .as_ref()
                .is_some_and(|inc| !inc.contains(field.as_ref()))
            {
                continue;
            }
            let sensor = self
                .fields
                .get(field.as_ref())
                .map_or(field.as_ref(), String::as_str);
            let problem = if sensor.len() > MAX_SENSOR_NAME_LEN {
                Some(LineError::NameTooLong)
            } else if matches!(&value, Value::Str(s) if s.len() > MAX_STRING_VALUE_LEN) {
                Some(LineError::ValueTooLong {
                    field: field.chars().take(LOG_EXCERPT_CHARS).collect(),
                })
            } else {
                None
            };
            if let Some(e) = problem {
                out.truncate(start);
                return Err(e);
            }
            let quality = match value {
                Value::F64(x) if !x.is_finite() => Quality::Bad,
                _ => Quality::Good,
            };
            out.push(Reading {
                sensor: sensor.to_owned(),
                time_ms,
                value,
                quality,
            });
        }
        Ok(())
    }

    fn csv_pairs<'t>(&'t self, text: &'t str) -> Result<Vec<(Cow<'t, str>, Value)>, LineError> {
        let fields: Vec<&str> = text.split(',').map(str::trim).collect();
        if fields.len() != self.columns.len() {
            return Err(LineError::CsvFields {
                expected: self.columns.len(),
                got: fields.len(),
            });
        }
        let header = fields
            .iter()
            .zip(&self.columns)
            .all(|(f, c)| c == SKIP_COLUMN || f == c);
        if header {
            return Ok(Vec::new());
        }
        Ok(self
            .columns
            .iter()
            .zip(fields)
            .filter(|(c, f)| c.as_str() != SKIP_COLUMN && !f.is_empty())
            .map(|(c, f)| (Cow::Borrowed(c.as_str()), text_value(f)))
            .collect())
    }
}

fn kv_pairs(text: &str) -> Result<Vec<(Cow<'_, str>, Value)>, LineError> {
    let mut pairs = Vec::new();
    for token in text
        .split(|c: char| c.is_whitespace() || c == ',')
        .filter(|t| !t.is_empty())
    {
        match token.split_once('=') {
            Some((k, v)) if !k.is_empty() => {
                if !v.is_empty() {
                    pairs.push((Cow::Borrowed(k), text_value(v)));
                }
            }
            _ => return Err(LineError::KvToken(excerpt(token))),
        }
    }
    Ok(pairs)
}

fn json_pairs(text: &str) -> Result<Vec<(Cow<'_, str>, Value)>, LineError> {
    let map: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(text).map_err(|e| LineError::Json(e.to_string()))?;
    Ok(map
        .into_iter()
        .filter_map(|(k, v)| {
            let v = match v {
                serde_json::Value::Bool(b) => Value::Bool(b),
                serde_json::Value::Number(n) => match n.as_i64() {
                    Some(i) => Value::Int(i),
                    None => Value::F64(n.as_f64()?),
                },
                serde_json::Value::String(s) => Value::Str(s),
                serde_json::Value::Null
                | serde_json::Value::Array(_)
                | serde_json::Value::Object(_) => return None,
            };
            Some((Cow::Owned(k), v))
        })
        .collect())
}

/// Types a text value; see the module documentation.
pub fn text_value(s: &str) -> Value {
    if s.eq_ignore_ascii_case("true") {
        return Value::Bool(true);
    }
    if s.eq_ignore_ascii_case("false") {
        return Value::Bool(false);
    }
    let digits = s.strip_prefix(['+', '-']).unwrap_or(s);
    if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
        if let Ok(i) = s.parse::<i64>() {
            return Value::Int(i);
        }
    }
    match s.parse::<f64>() {
        Ok(x) => Value::F64(x),
        Err(_) => Value::Str(s.to_owned()),
    }
}

/// A timestamp field's value as Unix ms.
fn unix_ms(v: &Value) -> Option<i64> {
    let x = match v {
        Value::Int(i) => *i as f64,
        Value::F64(x) => *x,
        Value::F32(x) => f64::from(*x),
        Value::Str(s) => s.trim().parse::<f64>().ok()?,
        Value::Bool(_) => return None,
    };
    if !x.is_finite() || x <= 0.0 {
        return None;
    }
    let ms = if x >= UNIX_MS_THRESHOLD {
        x
    } else {
        x * 1000.0
    };
    // i64 ms reach far past any real date; the cast saturates anyway.
    Some(ms.round() as i64)
}

/// The start of `s` for a log message (callers quote it with `{:?}`).
fn excerpt(s: &str) -> String {
    let mut e: String = s.chars().take(LOG_EXCERPT_CHARS).collect();
    if e.len() < s.len() {
        e.push('…');
    }
    e
}

/// Sans-IO decoder of a `serial-lines` byte stream.
#[derive(Debug, Clone)]
pub struct LinesCore {
    splitter: LineSplitter,
    parser: LineParser,
}

impl LinesCore {
    /// A core for `config`.
    pub fn new(config: &SerialLinesConfig) -> Self {
        LinesCore {
            splitter: LineSplitter::new(),
            parser: LineParser::new(config),
        }
    }
}

impl ByteCore for LinesCore {
    fn reset(&mut self) {
        self.splitter.resync();
    }

    fn feed(&mut self, bytes: &[u8], now_ms: i64, out: &mut Vec<Reading>, problems: &mut Problems) {
        let parser = &self.parser;
        self.splitter.feed(bytes, |piece| match piece {
            Piece::Line(line) => {
                if let Err(e) = parser.parse(line, now_ms, out) {
                    problems.add("malformed_line", 1, || {
                        format!("{e} in line {:?}", excerpt(&String::from_utf8_lossy(line)))
                    });
                }
            }
            Piece::TooLong => problems.add("oversize", 1, || {
                format!("line longer than {MAX_LINE_LEN} bytes discarded")
            }),
        });
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn config(extra: &str) -> SerialLinesConfig {
        toml::from_str(&format!("name = \"w\"\npath = \"/dev/null\"\n{extra}")).unwrap()
    }

    fn parse(c: &SerialLinesConfig, line: &str) -> Result<Vec<(String, Value)>, LineError> {
        let mut out = Vec::new();
        LineParser::new(c).parse(line.as_bytes(), 7, &mut out)?;
        Ok(out.into_iter().map(|r| (r.sensor, r.value)).collect())
    }

    fn pairs(p: &[(&str, Value)]) -> Vec<(String, Value)> {
        p.iter().map(|(k, v)| (k.to_string(), v.clone())).collect()
    }

    #[test]
    fn values_are_typed_simply() {
        assert_eq!(text_value("21"), Value::Int(21));
        assert_eq!(text_value("-3"), Value::Int(-3));
        assert_eq!(text_value("+3"), Value::Int(3));
        assert_eq!(text_value("21.5"), Value::F64(21.5));
        assert_eq!(text_value("1e3"), Value::F64(1000.0));
        assert_eq!(text_value("99999999999999999999"), Value::F64(1e20));
        assert_eq!(text_value("TRUE"), Value::Bool(true));
        assert_eq!(text_value("false"), Value::Bool(false));
        assert_eq!(text_value("OPEN"), Value::Str("OPEN".into()));
        assert_eq!(text_value("0x10"), Value::Str("0x10".into()));
        assert!(matches!(text_value("nan"), Value::F64(x) if x.is_nan()));
    }

    #[test]
    fn kv_with_rename_and_include() {
        let c = config("fields = { temp = \"air_temperature\" }\ninclude = [\"temp\", \"state\"]");
        assert_eq!(
            parse(&c, "temp=21.5, hum=40 state=OK").unwrap(),
            pairs(&[
                ("air_temperature", Value::F64(21.5)),
                ("state", Value::Str("OK".into()))
            ])
        );
        assert!(matches!(
            parse(&c, "temp=1 garbage"),
            Err(LineError::KvToken(_))
        ));
        assert!(matches!(parse(&c, "=1"), Err(LineError::KvToken(_))));
        assert_eq!(
            parse(&c, "temp= state=x").unwrap(),
            pairs(&[("state", Value::Str("x".into()))])
        );
    }

    #[test]
    fn csv_columns_skip_and_empty_fields() {
        let c = config("format = \"csv\"\ncolumns = [\"temperature\", \"-\", \"pressure\"]");
        assert_eq!(
            parse(&c, "21.50, 99 ,1013.00").unwrap(),
            pairs(&[
                ("temperature", Value::F64(21.5)),
                ("pressure", Value::F64(1013.0))
            ])
        );
        assert_eq!(
            parse(&c, ",1,7").unwrap(),
            pairs(&[("pressure", Value::Int(7))])
        );
        assert_eq!(
            parse(&c, "temperature,humidity,pressure").unwrap(),
            vec![],
            "header line"
        );
        assert_eq!(
            parse(&c, "1,2"),
            Err(LineError::CsvFields {
                expected: 3,
                got: 2
            })
        );
    }

    #[test]
    fn json_objects() {
        let c = config("format = \"json\"\nfields = { t = \"temp\" }");
        assert_eq!(
            parse(&c, r#"{"t":21.5,"n":3,"ok":true,"s":"x","z":null,"a":[1]}"#).unwrap(),
            pairs(&[
                ("n", Value::Int(3)),
                ("ok", Value::Bool(true)),
                ("s", Value::Str("x".into())),
                ("temp", Value::F64(21.5)),
            ])
        );
        assert!(matches!(parse(&c, "[1,2]"), Err(LineError::Json(_))));
        assert!(matches!(parse(&c, "{\"t\":"), Err(LineError::Json(_))));
    }

    #[test]
    fn timestamp_field_in_seconds_or_ms() {
        let c = config("format = \"json\"\ntimestamp-field = \"ts\"");
        let mut out = Vec::new();
        let p = LineParser::new(&c);
        p.parse(br#"{"ts":1700000000,"v":1}"#, 7, &mut out).unwrap();
        p.parse(br#"{"ts":1700000000123,"v":2}"#, 7, &mut out)
            .unwrap();
        p.parse(br#"{"ts":"1700000000.5","v":3}"#, 7, &mut out)
            .unwrap();
        p.parse(br#"{"v":4}"#, 7, &mut out).unwrap();
        let times: Vec<i64> = out.iter().map(|r| r.time_ms).collect();
        assert_eq!(
            times,
            [1_700_000_000_000, 1_700_000_000_123, 1_700_000_000_500, 7]
        );
        assert!(out.iter().all(|r| r.sensor == "v"));
        assert_eq!(
            p.parse(br#"{"ts":"yesterday","v":5}"#, 7, &mut out),
            Err(LineError::Timestamp { field: "ts".into() })
        );
        assert_eq!(out.len(), 4, "nothing appended on error");
    }

    #[test]
    fn nan_is_kept_with_bad_quality() {
        let c = config("");
        let mut out = Vec::new();
        LineParser::new(&c)
            .parse(b"t=nan h=1", 0, &mut out)
            .unwrap();
        assert_eq!(out[0].quality, Quality::Bad);
        assert_eq!(out[1].quality, Quality::Good);
    }

    #[test]
    fn over_limit_names_and_values_drop_the_line() {
        let c = config("");
        let long_name = format!("{}=1 a=2", "n".repeat(MAX_SENSOR_NAME_LEN + 1));
        assert_eq!(parse(&c, &long_name), Err(LineError::NameTooLong));
        let long_value = format!("a=2 s={}", "v".repeat(MAX_STRING_VALUE_LEN + 1));
        assert!(matches!(
            parse(&c, &long_value),
            Err(LineError::ValueTooLong { .. })
        ));
    }

    fn split(s: &mut LineSplitter, bytes: &[u8]) -> Vec<String> {
        let mut got = Vec::new();
        s.feed(bytes, |p| {
            got.push(match p {
                Piece::Line(l) => String::from_utf8_lossy(l).into_owned(),
                Piece::TooLong => "<too long>".into(),
            })
        });
        got
    }

    #[test]
    fn splitter_handles_cr_lf_partial_and_over_long_lines() {
        let mut s = LineSplitter::new();
        assert_eq!(split(&mut s, b"a=1\r\nb=2\rc="), ["a=1", "b=2"]);
        assert_eq!(split(&mut s, b"3\n\n\n"), ["c=3"]);
        let mut long = vec![b'x'; MAX_LINE_LEN + 10];
        long.extend(b"\nd=4\n");
        assert_eq!(split(&mut s, &long), ["<too long>", "d=4"]);
        let exact = vec![b'y'; MAX_LINE_LEN];
        let mut bytes = exact.clone();
        bytes.push(b'\n');
        assert_eq!(
            split(&mut s, &bytes).len(),
            1,
            "a line of exactly the limit is kept"
        );
        s.resync();
        assert_eq!(split(&mut s, b"rtial=1\ne=5\n"), ["e=5"]);
    }

    #[test]
    fn core_counts_malformed_and_oversize_lines() {
        let mut core = LinesCore::new(&config(""));
        let mut out = Vec::new();
        let mut p = Problems::default();
        let mut bytes = b"a=1\n\xff\xfe=2\nnot a pair\n".to_vec();
        bytes.extend(vec![b'z'; MAX_LINE_LEN + 1]);
        bytes.extend(b"\r\nb=2\n");
        core.feed(&bytes, 0, &mut out, &mut p);
        let got: Vec<&str> = out.iter().map(|r| r.sensor.as_str()).collect();
        assert_eq!(got, ["a", "b"]);
        assert_eq!(p.count("malformed_line"), 2);
        assert_eq!(p.count("oversize"), 1);
    }

    #[test]
    fn validation_reports_csv_mistakes() {
        let c = config(
            "format = \"csv\"\ncolumns = [\"a\", \"a\", \"\"]\nfields = { b = \"x\" }\ninclude = [\"c\"]\ntimestamp-field = \"ts\"",
        );
        let mut e = Vec::new();
        c.validate("sources[1]", &mut e);
        for key in [
            "columns[1]",
            "columns[2]",
            "fields.b",
            "include[0]",
            "timestamp-field",
        ] {
            assert!(
                e.iter()
                    .any(|m| m.starts_with(&format!("sources[1].{key}:"))),
                "{key} missing in {e:?}"
            );
        }
        let mut e = Vec::new();
        config("format = \"csv\"").validate("s", &mut e);
        assert!(e.iter().any(|m| m.starts_with("s.columns:")), "{e:?}");
    }
}
