//! Decoding the aggregator's application acks (`outpost/v1/{device}/ack`).

use outpost_proto::pb::Ack;
use prost::Message;

/// Why an ack payload was ignored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AckError {
    /// Not a protobuf `Ack`.
    #[error("malformed ack payload: {0}")]
    Malformed(String),
    /// An ack for another device (the topic said us; the payload did not).
    #[error("ack names device {0:?}, not this one")]
    WrongDevice(String),
}

/// The acknowledged sequence number in an ack payload for `device`. An
/// empty `device_id` in the payload is accepted (the topic already names
/// the device).
pub fn decode_ack(payload: &[u8], device: &str) -> Result<u64, AckError> {
    let ack = Ack::decode(payload).map_err(|e| AckError::Malformed(e.to_string()))?;
    if !ack.device_id.is_empty() && ack.device_id != device {
        return Err(AckError::WrongDevice(ack.device_id));
    }
    Ok(ack.seq)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn acks_decode_and_are_checked() {
        let ok = Ack {
            device_id: "gw".into(),
            seq: 42,
            time_ms: 1,
        }
        .encode_to_vec();
        assert_eq!(decode_ack(&ok, "gw"), Ok(42));
        assert_eq!(
            decode_ack(&ok, "other"),
            Err(AckError::WrongDevice("gw".into()))
        );
        assert!(matches!(
            decode_ack(&[0xff, 0xff, 0xff], "gw"),
            Err(AckError::Malformed(_))
        ));
    }
}
