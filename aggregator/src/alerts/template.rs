//! `{field}` templates for notification texts (the e-mail subject and body).
//!
//! Fields: `id`, `fingerprint`, `number`, `repeat`, `rule`, `device`,
//! `sensor`, `severity`, `state` (upper case: `FIRING`, `RESOLVED`; a repeat
//! says `FIRING (repeat 2)`), `summary`, `value`, `threshold` (empty when
//! absent), `event_time`, `active_since`, `queued` (RFC 3339 UTC),
//! `labels` (`a=1, b=2`) and `labels.NAME`. `{{` and `}}` are literal
//! braces. An unknown field is an error when the config is checked, not
//! when an alert is sent.

use super::Notification;

/// Known field names (besides `labels.NAME`).
pub const FIELDS: &[&str] = &[
    "id",
    "fingerprint",
    "number",
    "repeat",
    "rule",
    "device",
    "sensor",
    "severity",
    "state",
    "summary",
    "value",
    "threshold",
    "event_time",
    "active_since",
    "queued",
    "labels",
];

#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Text(String),
    Field(String),
}

/// A parsed template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template(Vec<Piece>);

impl Template {
    /// Parses `text`; fails on an unclosed `{` or an unknown field.
    pub fn parse(text: &str) -> Result<Template, String> {
        let mut pieces = Vec::new();
        let mut lit = String::new();
        let mut chars = text.char_indices().peekable();
        while let Some((i, c)) = chars.next() {
            match c {
                '{' if chars.peek().map(|p| p.1) == Some('{') => {
                    chars.next();
                    lit.push('{');
                }
                '}' if chars.peek().map(|p| p.1) == Some('}') => {
                    chars.next();
                    lit.push('}');
                }
                '{' => {
                    let rest = &text[i + 1..];
                    let Some(end) = rest.find('}') else {
                        return Err(format!("unclosed '{{' at byte {i}"));
                    };
                    let name = rest[..end].trim();
                    let ok = FIELDS.contains(&name)
                        || name.strip_prefix("labels.").is_some_and(|l| !l.is_empty());
                    if !ok {
                        return Err(format!(
                            "unknown field {{{name}}} (fields: {}, labels.NAME)",
                            FIELDS.join(", ")
                        ));
                    }
                    if !lit.is_empty() {
                        pieces.push(Piece::Text(std::mem::take(&mut lit)));
                    }
                    pieces.push(Piece::Field(name.to_owned()));
                    for _ in 0..rest[..=end].chars().count() {
                        chars.next();
                    }
                }
                '}' => return Err(format!("unmatched '}}' at byte {i} (write '}}}}')")),
                c => lit.push(c),
            }
        }
        if !lit.is_empty() {
            pieces.push(Piece::Text(lit));
        }
        Ok(Template(pieces))
    }

    /// The text for `n`.
    pub fn render(&self, n: &Notification) -> String {
        let mut out = String::new();
        for p in &self.0 {
            match p {
                Piece::Text(t) => out.push_str(t),
                Piece::Field(f) => out.push_str(&field(n, f)),
            }
        }
        out
    }
}

/// RFC 3339 UTC with milliseconds for Unix ms (empty for a time before 1970).
/// A time humantime cannot format (after the year 9999: a device clock
/// in microseconds, say) is shown as its number of milliseconds instead of
/// panicking.
pub fn rfc3339_ms(ms: i64) -> String {
    use std::fmt::Write;
    let Ok(u) = u64::try_from(ms) else {
        return String::new();
    };
    let Some(t) = std::time::UNIX_EPOCH.checked_add(std::time::Duration::from_millis(u)) else {
        return format!("{ms} ms");
    };
    let mut out = String::new();
    if write!(out, "{}", humantime::format_rfc3339_millis(t)).is_err() {
        return format!("{ms} ms");
    }
    out
}

fn num(v: Option<f64>) -> String {
    v.map(|v| format!("{v}")).unwrap_or_default()
}

fn field(n: &Notification, f: &str) -> String {
    match f {
        "id" => n.id.clone(),
        "fingerprint" => n.fingerprint.clone(),
        "number" => n.number.to_string(),
        "repeat" => n.repeat.to_string(),
        "rule" => n.rule.clone(),
        "device" => n.device.clone(),
        "sensor" => n.sensor.clone(),
        "severity" => n.severity_name().to_owned(),
        "state" => {
            let s = n.state_name().to_ascii_uppercase();
            if n.repeat > 0 {
                format!("{s} (repeat {})", n.repeat)
            } else {
                s
            }
        }
        "summary" => n.summary.clone(),
        "value" => num(n.value),
        "threshold" => num(n.threshold),
        "event_time" => rfc3339_ms(n.event_time_ms),
        "active_since" => n.active_since_ms.map(rfc3339_ms).unwrap_or_default(),
        "queued" => rfc3339_ms(n.queued_ms),
        "labels" => n
            .labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(", "),
        other => other
            .strip_prefix("labels.")
            .and_then(|l| n.labels.get(l).cloned())
            .unwrap_or_default(),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::rules::model::{AlertState, Severity};

    fn n() -> Notification {
        Notification {
            schema: super::super::SCHEMA.into(),
            id: "abc-3".into(),
            fingerprint: "abc".into(),
            number: 3,
            repeat: 0,
            state: AlertState::Firing,
            rule: "boiler-overheat".into(),
            device: "gw-1".into(),
            sensor: "temp".into(),
            severity: Severity::Critical,
            labels: [("site".to_owned(), "north".to_owned())].into(),
            summary: "temp 91.5 > 90".into(),
            value: Some(91.5),
            threshold: Some(90.0),
            event_time_ms: 1_700_000_000_123,
            processing_time_ms: 1_700_000_000_200,
            active_since_ms: Some(1_700_000_000_123),
            queued_ms: 1_700_000_000_250,
            history_id: 7,
        }
    }

    #[test]
    fn renders_fields_labels_and_braces() {
        let t = Template::parse(
            "[{state}] {rule}@{device} {{x}} {labels.site}/{labels.none} v={value} t={event_time}",
        )
        .unwrap();
        assert_eq!(
            t.render(&n()),
            "[FIRING] boiler-overheat@gw-1 {x} north/ v=91.5 t=2023-11-14T22:13:20.123Z"
        );
        let mut r = n();
        r.repeat = 2;
        assert_eq!(
            Template::parse("{state}").unwrap().render(&r),
            "FIRING (repeat 2)"
        );
    }

    #[test]
    fn unknown_fields_and_unclosed_braces_are_errors() {
        assert!(Template::parse("{nope}")
            .unwrap_err()
            .contains("unknown field {nope}"));
        assert!(Template::parse("a {rule").unwrap_err().contains("unclosed"));
        assert!(Template::parse("a } b").unwrap_err().contains("unmatched"));
        assert!(Template::parse(super::super::config::DEFAULT_EMAIL_BODY).is_ok());
        assert!(Template::parse(super::super::config::DEFAULT_EMAIL_SUBJECT).is_ok());
    }

    #[test]
    fn times_past_the_year_9999_do_not_panic() {
        // A device clock in microseconds: year ~55,000.
        assert_eq!(rfc3339_ms(1_700_000_000_000_000), "1700000000000000 ms");
        assert_eq!(rfc3339_ms(i64::MAX), format!("{} ms", i64::MAX));
        assert_eq!(rfc3339_ms(-1), "");
    }
}
