//! MQTT topic names. No other crate formats or parses a topic string by hand.
//!
//! ```text
//! outpost/v1/{device}/telemetry   agent -> aggregator, QoS 1, TelemetryBatch
//! outpost/v1/{device}/status      agent, retained; birth + last will, DeviceStatus
//! outpost/v1/{device}/ack         aggregator -> agent, Ack
//! outpost/v1/alerts/{severity}/{rule}   aggregator -> operators, JSON
//! ```
//!
//! Device ids are `[A-Za-z0-9_.-]{1,64}`. The id in the topic is the one that
//! counts; "alerts" is reserved (it cannot be a device id) so the two topic
//! trees never collide.

/// Prefix of every Outpost topic.
pub const PREFIX: &str = "outpost/v1";
/// Longest device id.
pub const MAX_DEVICE_ID_LEN: usize = 64;
/// Longest rule name usable in an alert topic.
pub const MAX_RULE_NAME_LEN: usize = 128;
/// The path segment reserved for alerts.
pub const ALERTS: &str = "alerts";

/// Why a device id (or rule name) is not acceptable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdError {
    /// Empty.
    Empty,
    /// Longer than the limit.
    TooLong {
        /// The limit.
        max: usize,
    },
    /// Contains a character outside `[A-Za-z0-9_.-]`.
    BadChar {
        /// Byte offset of the first bad character.
        at: usize,
    },
    /// A reserved word.
    Reserved,
}

impl core::fmt::Display for IdError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            IdError::Empty => f.write_str("id is empty"),
            IdError::TooLong { max } => write!(f, "id is longer than {max} characters"),
            IdError::BadChar { at } => {
                write!(f, "id has a character outside [A-Za-z0-9_.-] at byte {at}")
            }
            IdError::Reserved => write!(f, "`{ALERTS}` is reserved and cannot be a device id"),
        }
    }
}

#[cfg(feature = "std")]
impl std::error::Error for IdError {}

fn allowed(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-')
}

fn validate_name(id: &str, max: usize) -> Result<(), IdError> {
    if id.is_empty() {
        return Err(IdError::Empty);
    }
    if id.len() > max {
        return Err(IdError::TooLong { max });
    }
    if let Some(at) = id.bytes().position(|b| !allowed(b)) {
        return Err(IdError::BadChar { at });
    }
    Ok(())
}

/// Checks a device id against `[A-Za-z0-9_.-]{1,64}` (and the reserved word).
pub fn validate_device_id(id: &str) -> Result<(), IdError> {
    validate_name(id, MAX_DEVICE_ID_LEN)?;
    if id == ALERTS {
        return Err(IdError::Reserved);
    }
    Ok(())
}

/// Checks a rule name for use in an alert topic: `[A-Za-z0-9_.-]{1,128}`.
pub fn validate_rule_name(name: &str) -> Result<(), IdError> {
    validate_name(name, MAX_RULE_NAME_LEN)
}

/// The per-device topics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeviceTopic {
    /// `{device}/telemetry`
    Telemetry,
    /// `{device}/status`
    Status,
    /// `{device}/ack`
    Ack,
}

impl DeviceTopic {
    /// The last path segment.
    pub const fn suffix(self) -> &'static str {
        match self {
            DeviceTopic::Telemetry => "telemetry",
            DeviceTopic::Status => "status",
            DeviceTopic::Ack => "ack",
        }
    }

    fn from_suffix(s: &str) -> Option<Self> {
        match s {
            "telemetry" => Some(DeviceTopic::Telemetry),
            "status" => Some(DeviceTopic::Status),
            "ack" => Some(DeviceTopic::Ack),
            _ => None,
        }
    }
}

/// Why a topic string is not an Outpost device topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopicError {
    /// Does not start with `outpost/v1/`.
    NotOutpost,
    /// The device id segment is invalid.
    DeviceId(IdError),
    /// Unknown last segment or wrong number of segments.
    UnknownKind,
}

impl core::fmt::Display for TopicError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            TopicError::NotOutpost => write!(f, "topic is not under {PREFIX}/"),
            TopicError::DeviceId(e) => write!(f, "invalid device id in topic: {e}"),
            TopicError::UnknownKind => f.write_str("topic is not {device}/telemetry|status|ack"),
        }
    }
}

#[cfg(feature = "std")]
impl std::error::Error for TopicError {}

/// Splits `outpost/v1/{device}/{kind}` into its device id and kind, validating
/// the id. Borrowed from the input, so usable without an allocator.
pub fn parse_device_topic(topic: &str) -> Result<(&str, DeviceTopic), TopicError> {
    let rest = topic
        .strip_prefix(PREFIX)
        .and_then(|r| r.strip_prefix('/'))
        .ok_or(TopicError::NotOutpost)?;
    let (device, kind) = rest.rsplit_once('/').ok_or(TopicError::UnknownKind)?;
    let kind = DeviceTopic::from_suffix(kind).ok_or(TopicError::UnknownKind)?;
    validate_device_id(device).map_err(TopicError::DeviceId)?;
    Ok((device, kind))
}

#[cfg(feature = "std")]
pub use formatting::*;

#[cfg(feature = "std")]
mod formatting {
    use super::*;

    /// `outpost/v1/{device}/{kind}` for a validated device id.
    pub fn device_topic(device: &str, kind: DeviceTopic) -> Result<String, IdError> {
        validate_device_id(device)?;
        Ok(format!("{PREFIX}/{device}/{}", kind.suffix()))
    }

    /// `outpost/v1/{device}/telemetry`.
    pub fn telemetry(device: &str) -> Result<String, IdError> {
        device_topic(device, DeviceTopic::Telemetry)
    }

    /// `outpost/v1/{device}/status`.
    pub fn status(device: &str) -> Result<String, IdError> {
        device_topic(device, DeviceTopic::Status)
    }

    /// `outpost/v1/{device}/ack`.
    pub fn ack(device: &str) -> Result<String, IdError> {
        device_topic(device, DeviceTopic::Ack)
    }

    /// Subscription filter matching one kind for every device:
    /// `outpost/v1/+/{kind}`.
    pub fn all_devices(kind: DeviceTopic) -> String {
        format!("{PREFIX}/+/{}", kind.suffix())
    }

    /// `outpost/v1/alerts/{severity}/{rule}`; severity is `info`, `warning`
    /// or `critical` (anything valid as a name is accepted).
    pub fn alert(severity: &str, rule: &str) -> Result<String, IdError> {
        validate_name(severity, 16)?;
        validate_rule_name(rule)?;
        Ok(format!("{PREFIX}/{ALERTS}/{severity}/{rule}"))
    }

    /// Subscription filter for every alert: `outpost/v1/alerts/#`.
    pub fn all_alerts() -> String {
        format!("{PREFIX}/{ALERTS}/#")
    }
}

#[cfg(all(test, feature = "std"))]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn device_ids() {
        assert!(validate_device_id("pump-house_3.a").is_ok());
        assert!(validate_device_id(&"a".repeat(64)).is_ok());
        assert_eq!(validate_device_id(""), Err(IdError::Empty));
        assert_eq!(
            validate_device_id(&"a".repeat(65)),
            Err(IdError::TooLong { max: 64 })
        );
        assert_eq!(validate_device_id("a/b"), Err(IdError::BadChar { at: 1 }));
        assert_eq!(validate_device_id("a+"), Err(IdError::BadChar { at: 1 }));
        assert_eq!(validate_device_id("#"), Err(IdError::BadChar { at: 0 }));
        assert_eq!(validate_device_id("gerät"), Err(IdError::BadChar { at: 3 }));
        assert_eq!(validate_device_id("alerts"), Err(IdError::Reserved));
    }

    #[test]
    fn topics_round_trip() {
        for kind in [
            DeviceTopic::Telemetry,
            DeviceTopic::Status,
            DeviceTopic::Ack,
        ] {
            let t = device_topic("gw-1", kind).unwrap();
            assert_eq!(parse_device_topic(&t), Ok(("gw-1", kind)));
        }
        assert_eq!(telemetry("gw-1").unwrap(), "outpost/v1/gw-1/telemetry");
        assert_eq!(all_devices(DeviceTopic::Status), "outpost/v1/+/status");
        assert_eq!(
            alert("critical", "boiler-hot").unwrap(),
            "outpost/v1/alerts/critical/boiler-hot"
        );
        assert!(alert("critical", "a/b").is_err());
        assert!(telemetry("bad/id").is_err());
    }

    #[test]
    fn bad_topics_are_rejected() {
        assert_eq!(
            parse_device_topic("other/v1/x/telemetry"),
            Err(TopicError::NotOutpost)
        );
        assert_eq!(
            parse_device_topic("outpost/v1/x/y/telemetry"),
            Err(TopicError::DeviceId(IdError::BadChar { at: 1 }))
        );
        assert_eq!(
            parse_device_topic("outpost/v1/x/metrics"),
            Err(TopicError::UnknownKind)
        );
        assert_eq!(
            parse_device_topic("outpost/v1/telemetry"),
            Err(TopicError::UnknownKind)
        );
        assert_eq!(
            parse_device_topic("outpost/v1//telemetry"),
            Err(TopicError::DeviceId(IdError::Empty))
        );
        assert_eq!(
            parse_device_topic("outpost/v1/alerts/telemetry"),
            Err(TopicError::DeviceId(IdError::Reserved))
        );
    }
}
