//! A thin, safe adapter over rumqttd's public MQTT codec (`rumqttd::protocol`).
//!
//! What it adds, each for a measured reason:
//! - The protocol version is read from the CONNECT bytes (`V4` refuses any level but 4, `V5` any
//!   but 5), and MQTT 3.1 (level 3) gets a proper refusal.
//! - `Publish` keeps `qos`, `pkid` and `dup` crate-private; its public `serialize`/`deserialize`
//!   round-trip them, so [`publish_header`] and [`make_publish`] go through those.
//! - The codec's CONNACK writers end in `unreachable!()` for the other version's codes, and its
//!   readers in `unreachable!()` for some packet types: codes are mapped per version here, and
//!   every read runs under `catch_unwind` so hostile bytes close one connection, never a task
//!   by panic.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use rumqttd::protocol::{v4::V4, v5::V5, ConnectReturnCode, Packet, Protocol, Publish, QoS};

/// Which MQTT version a connection speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// MQTT 3.1.1 (protocol level 4).
    V311,
    /// MQTT 5.0 (protocol level 5).
    V5,
}

/// Why bytes could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    /// More bytes are needed (not an error yet).
    #[error("incomplete packet")]
    Incomplete,
    /// The packet is larger than allowed.
    #[error("packet of {0} bytes exceeds the maximum packet size")]
    TooLarge(usize),
    /// The bytes are not a valid packet.
    #[error("malformed packet: {0}")]
    Malformed(String),
    /// CONNECT with a protocol level we do not serve (3 = MQTT 3.1).
    #[error("unsupported protocol level {0}")]
    UnsupportedLevel(u8),
}

/// Reads the protocol level of a CONNECT at the start of `buffer`, if enough bytes are there.
pub fn connect_level(buffer: &[u8]) -> Result<u8, CodecError> {
    let mut cursor = buffer;
    if cursor.is_empty() {
        return Err(CodecError::Incomplete);
    }
    if cursor[0] >> 4 != 1 {
        return Err(CodecError::Malformed(
            "the first packet must be CONNECT".into(),
        ));
    }
    cursor.advance(1);
    // Remaining length: 1-4 bytes of varint.
    let mut consumed = 0;
    loop {
        let Some(&byte) = cursor.first() else {
            return Err(CodecError::Incomplete);
        };
        cursor.advance(1);
        consumed += 1;
        if byte & 0x80 == 0 {
            break;
        }
        if consumed == 4 {
            return Err(CodecError::Malformed("bad remaining length".into()));
        }
    }
    if cursor.len() < 2 {
        return Err(CodecError::Incomplete);
    }
    let name_len = u16::from_be_bytes([cursor[0], cursor[1]]) as usize;
    cursor.advance(2);
    if cursor.len() < name_len + 1 {
        return Err(CodecError::Incomplete);
    }
    let name = &cursor[..name_len];
    if name != b"MQTT" && name != b"MQIsdp" {
        return Err(CodecError::Malformed("protocol name is not MQTT".into()));
    }
    Ok(cursor[name_len])
}

/// Decodes one packet from the front of `buffer` (consuming it), or says more bytes are needed.
pub fn read(
    version: Version,
    buffer: &mut BytesMut,
    packet_bytes_max: usize,
) -> Result<Packet, CodecError> {
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match version {
        Version::V311 => V4.read_mut(buffer, packet_bytes_max),
        Version::V5 => V5.read_mut(buffer, packet_bytes_max),
    }));
    match result {
        Ok(Ok(packet)) => Ok(packet),
        Ok(Err(rumqttd::protocol::Error::InsufficientBytes(_))) => Err(CodecError::Incomplete),
        Ok(Err(rumqttd::protocol::Error::PayloadSizeLimitExceeded(n))) => {
            Err(CodecError::TooLarge(n))
        }
        Ok(Err(e)) => Err(CodecError::Malformed(e.to_string())),
        Err(_) => Err(CodecError::Malformed(
            "the codec could not parse the packet".into(),
        )),
    }
}

/// Encodes `packet` onto `buffer`.
pub fn write(version: Version, packet: Packet, buffer: &mut BytesMut) -> Result<(), CodecError> {
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match version {
        Version::V311 => V4.write(packet, buffer),
        Version::V5 => V5.write(packet, buffer),
    }));
    match result {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(CodecError::Malformed(e.to_string())),
        Err(_) => Err(CodecError::Malformed(
            "the codec could not encode the packet".into(),
        )),
    }
}

/// QoS as a number.
pub fn qos_number(qos: QoS) -> u8 {
    match qos {
        QoS::AtMostOnce => 0,
        QoS::AtLeastOnce => 1,
        QoS::ExactlyOnce => 2,
    }
}

/// QoS from a number (0..=2, anything higher is clamped to 2 by callers that validated it).
pub fn qos_of(number: u8) -> QoS {
    match number {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    }
}

/// The header fields rumqttd keeps private: (qos, packet id, dup).
pub fn publish_header(publish: &Publish) -> (u8, u16, bool) {
    let bytes = publish.serialize();
    let header = bytes[0];
    let pkid = u16::from_be_bytes([bytes[1], bytes[2]]);
    ((header >> 1) & 0b11, pkid, header & 0b1000 != 0)
}

/// A PUBLISH with every header field set.
pub fn make_publish(
    topic: &str,
    payload: &Bytes,
    qos: u8,
    pkid: u16,
    retain: bool,
    dup: bool,
) -> Publish {
    let mut bytes = BytesMut::with_capacity(5 + topic.len() + payload.len());
    bytes.put_u8(0b0011_0000 | u8::from(retain) | ((qos & 0b11) << 1) | (u8::from(dup) << 3));
    bytes.put_u16(pkid);
    bytes.put_u16(topic.len() as u16);
    bytes.put_slice(topic.as_bytes());
    bytes.put_slice(payload);
    Publish::deserialize(bytes.freeze())
}

/// A CONNACK refusal reason, independent of version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Protocol version not served.
    UnsupportedProtocol,
    /// Client id not acceptable.
    BadClientId,
    /// Wrong or missing credentials.
    BadCredentials,
    /// Authenticated but not allowed.
    NotAuthorized,
    /// Too many connections.
    ServerBusy,
    /// Malformed CONNECT.
    Malformed,
}

/// The CONNACK code of a refusal in `version`.
pub fn refusal_code(version: Version, refusal: Refusal) -> ConnectReturnCode {
    match (version, refusal) {
        (Version::V311, Refusal::UnsupportedProtocol) => ConnectReturnCode::RefusedProtocolVersion,
        (Version::V311, Refusal::BadClientId) => ConnectReturnCode::ClientIdentifierNotValid,
        (Version::V311, Refusal::BadCredentials) => ConnectReturnCode::BadUserNamePassword,
        (Version::V311, Refusal::NotAuthorized) => ConnectReturnCode::NotAuthorized,
        (Version::V311, Refusal::ServerBusy) => ConnectReturnCode::ServiceUnavailable,
        // 3.1.1 has no code for a malformed CONNECT: the spec says close without CONNACK;
        // "identifier rejected" is never sent for it (see connection.rs).
        (Version::V311, Refusal::Malformed) => ConnectReturnCode::ServiceUnavailable,
        (Version::V5, Refusal::UnsupportedProtocol) => {
            ConnectReturnCode::UnsupportedProtocolVersion
        }
        (Version::V5, Refusal::BadClientId) => ConnectReturnCode::ClientIdentifierNotValid,
        (Version::V5, Refusal::BadCredentials) => ConnectReturnCode::BadUserNamePassword,
        (Version::V5, Refusal::NotAuthorized) => ConnectReturnCode::NotAuthorized,
        (Version::V5, Refusal::ServerBusy) => ConnectReturnCode::ServerBusy,
        (Version::V5, Refusal::Malformed) => ConnectReturnCode::MalformedPacket,
    }
}

/// A raw MQTT 3.1.1 CONNACK (for refusing MQTT 3.1 clients, which no codec here speaks).
pub fn raw_connack_v3(code: u8) -> [u8; 4] {
    [0x20, 0x02, 0x00, code]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_header_fields_round_trip_through_the_public_api() {
        let payload = Bytes::from_static(b"{\"a\":1}");
        for (qos, pkid, retain, dup) in [
            (0, 0, false, false),
            (1, 7, true, false),
            (2, 65535, false, true),
        ] {
            let publish = make_publish("a/b", &payload, qos, pkid, retain, dup);
            assert_eq!(publish_header(&publish), (qos, pkid, dup));
            assert_eq!(publish.retain, retain);
            assert_eq!(&publish.topic[..], b"a/b");
            assert_eq!(publish.payload, payload);
        }
    }

    #[test]
    fn connect_level_is_read_from_partial_and_whole_packets() {
        // CONNECT, remaining length 12, "MQTT", level 5, ...
        let connect = [0x10, 12, 0, 4, b'M', b'Q', b'T', b'T', 5, 2, 0, 60, 0, 0];
        assert_eq!(connect_level(&connect), Ok(5));
        assert_eq!(connect_level(&connect[..5]), Err(CodecError::Incomplete));
        assert!(matches!(
            connect_level(&[0x30, 0]),
            Err(CodecError::Malformed(_))
        ));
        let v31 = [
            0x10, 14, 0, 6, b'M', b'Q', b'I', b's', b'd', b'p', 3, 2, 0, 60, 0, 0,
        ];
        assert_eq!(connect_level(&v31), Ok(3));
    }

    #[test]
    fn garbage_is_a_malformed_packet_not_a_panic() {
        for garbage in [
            vec![0xf0, 0x00],
            vec![0x00, 0x00],
            vec![0x30, 0x02, 0xff, 0xff],
            vec![0x82, 0x03, 0x00, 0x01, 0x00],
            vec![0xff; 64],
        ] {
            for version in [Version::V311, Version::V5] {
                let mut buffer = BytesMut::from(&garbage[..]);
                let result = read(version, &mut buffer, 1024);
                assert!(
                    matches!(
                        result,
                        Err(CodecError::Malformed(_))
                            | Err(CodecError::Incomplete)
                            | Err(CodecError::TooLarge(_))
                    ),
                    "{garbage:?} {version:?}: {result:?}"
                );
            }
        }
    }

    #[test]
    fn refusals_never_hit_the_codecs_unreachable_arms() {
        for version in [Version::V311, Version::V5] {
            for refusal in [
                Refusal::UnsupportedProtocol,
                Refusal::BadClientId,
                Refusal::BadCredentials,
                Refusal::NotAuthorized,
                Refusal::ServerBusy,
                Refusal::Malformed,
            ] {
                let connack = rumqttd::protocol::ConnAck {
                    session_present: false,
                    code: refusal_code(version, refusal),
                };
                let mut buffer = BytesMut::new();
                write(version, Packet::ConnAck(connack, None), &mut buffer).expect("encodes");
                assert!(!buffer.is_empty());
            }
        }
    }
}
