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

/// What the fixed part of a CONNECT says before the codec reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectHeader {
    /// Protocol level (4 = 3.1.1, 5 = 5.0).
    pub level: u8,
    /// The connect flags byte.
    pub flags: u8,
}

impl ConnectHeader {
    /// The flag rules rumqttd's codec does not check: the reserved bit is 0 (3.1.1 and 5.0,
    /// section 3.1.2.3), and in 3.1.1 a password needs a username (3.1.2.9).
    pub fn check(self) -> Result<(), CodecError> {
        if self.flags & 0b0000_0001 != 0 {
            return Err(CodecError::Malformed("CONNECT reserved flag is set".into()));
        }
        if self.level == 4 && self.flags & 0b0100_0000 != 0 && self.flags & 0b1000_0000 == 0 {
            return Err(CodecError::Malformed(
                "CONNECT has a password flag without a username flag".into(),
            ));
        }
        Ok(())
    }
}

/// Reads the protocol level and flags of a CONNECT at the start of `buffer`, if enough bytes
/// are there.
pub fn connect_header(buffer: &[u8]) -> Result<ConnectHeader, CodecError> {
    let mut cursor = buffer;
    if cursor.is_empty() {
        return Err(CodecError::Incomplete);
    }
    if cursor[0] != 0x10 {
        return Err(CodecError::Malformed(
            "the first packet must be CONNECT (with fixed-header flags 0)".into(),
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
    if cursor.len() < name_len + 2 {
        return Err(CodecError::Incomplete);
    }
    let name = &cursor[..name_len];
    if name != b"MQTT" && name != b"MQIsdp" {
        return Err(CodecError::Malformed("protocol name is not MQTT".into()));
    }
    Ok(ConnectHeader {
        level: cursor[name_len],
        flags: cursor[name_len + 1],
    })
}

fn codec_error(error: rumqttd::protocol::Error) -> CodecError {
    match error {
        rumqttd::protocol::Error::InsufficientBytes(_) => CodecError::Incomplete,
        rumqttd::protocol::Error::PayloadSizeLimitExceeded(n) => CodecError::TooLarge(n),
        e => CodecError::Malformed(e.to_string()),
    }
}

/// Checks the fixed header of the packet at the front of `buffer` (rumqttd checks none of
/// these flags): PUBREL, SUBSCRIBE and UNSUBSCRIBE carry flags 0b0010, the other packets a
/// client sends carry 0, a PUBLISH has no QoS 3 and no DUP at QoS 0, and packets only a server
/// sends are refused. Returns the header once the whole packet is buffered.
fn check_fixed_header(
    buffer: &BytesMut,
    packet_bytes_max: usize,
) -> Result<rumqttd::protocol::v4::FixedHeader, CodecError> {
    let header =
        rumqttd::protocol::v4::check(buffer.iter(), packet_bytes_max).map_err(codec_error)?;
    let (kind, flags) = (header.byte1 >> 4, header.byte1 & 0x0f);
    let qos = (flags >> 1) & 0b11;
    let valid = match kind {
        3 => qos != 3 && !(qos == 0 && flags & 0b1000 != 0),
        6 | 8 | 10 => flags == 0b0010,
        1 | 4 | 5 | 7 | 14 => flags == 0,
        12 => flags == 0 && header.remaining_len == 0,
        // 0 (reserved), CONNACK, SUBACK, UNSUBACK, PINGRESP: server-only; AUTH: not served.
        _ => false,
    };
    if valid {
        Ok(header)
    } else {
        Err(CodecError::Malformed(format!(
            "invalid fixed header 0x{:02x} (packet type {kind}, flags 0b{flags:04b})",
            header.byte1
        )))
    }
}

/// Decodes one packet from the front of `buffer` (consuming it), or says more bytes are needed.
pub fn read(
    version: Version,
    buffer: &mut BytesMut,
    packet_bytes_max: usize,
) -> Result<Packet, CodecError> {
    let header = check_fixed_header(buffer, packet_bytes_max)?;
    if version == Version::V5 && header.byte1 == 0xe0 && header.remaining_len == 1 {
        // A v5 DISCONNECT with only a reason code: rumqttd would need a property length too.
        let code = buffer[header.fixed_header_len];
        buffer.advance(header.frame_length());
        let reason_code = if code == 0 {
            rumqttd::protocol::DisconnectReasonCode::NormalDisconnection
        } else {
            // Any other code means the will is published (MQTT 5 section 3.14.2.1).
            rumqttd::protocol::DisconnectReasonCode::DisconnectWithWillMessage
        };
        return Ok(Packet::Disconnect(
            rumqttd::protocol::Disconnect { reason_code },
            None,
        ));
    }
    let framed = buffer.len();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match version {
        Version::V311 => V4.read_mut(buffer, packet_bytes_max),
        Version::V5 => V5.read_mut(buffer, packet_bytes_max),
    }));
    match result {
        Ok(Ok(packet)) => Ok(packet),
        // The packet was framed whole: "more bytes" from inside it means it is cut short.
        Ok(Err(rumqttd::protocol::Error::InsufficientBytes(_))) if buffer.len() < framed => Err(
            CodecError::Malformed("packet shorter than its contents say".into()),
        ),
        Ok(Err(e)) => Err(codec_error(e)),
        Err(_) => Err(CodecError::Malformed(
            "the codec could not parse the packet".into(),
        )),
    }
}

/// A v5 DISCONNECT from the server with `reason_code` (written by hand: rumqttd's writer drops
/// the reason code or the property length, and rumqttc refuses a DISCONNECT shorter than 2).
pub fn server_disconnect_v5(reason_code: u8) -> [u8; 4] {
    [0xe0, 0x02, reason_code, 0x00]
}

/// Encodes `packet` onto `buffer`.
pub fn write(version: Version, packet: Packet, buffer: &mut BytesMut) -> Result<(), CodecError> {
    let before = buffer.len();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match version {
        Version::V311 => V4.write(packet, buffer),
        Version::V5 => V5.write(packet, buffer),
    }));
    let error = match result {
        Ok(Ok(_)) => return Ok(()),
        Ok(Err(e)) => CodecError::Malformed(e.to_string()),
        Err(_) => CodecError::Malformed("the codec could not encode the packet".into()),
    };
    // A failed write may have left half a packet behind: never send it.
    buffer.truncate(before);
    Err(error)
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
    // Serialized without its topic and payload (a clone shares their bytes): reading three
    // header fields copied the whole payload.
    let mut header = publish.clone();
    header.topic = Bytes::new();
    header.payload = Bytes::new();
    let bytes = header.serialize();
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
    /// A bound (sessions) is reached.
    QuotaExceeded,
    /// Too many failed authentications from this address or for this username: retry later.
    Throttled,
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
        (Version::V311, Refusal::ServerBusy | Refusal::QuotaExceeded | Refusal::Throttled) => {
            ConnectReturnCode::ServiceUnavailable
        }
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
        (Version::V5, Refusal::QuotaExceeded) => ConnectReturnCode::QuotaExceeded,
        (Version::V5, Refusal::Throttled) => ConnectReturnCode::ConnectionRateExceeded,
        (Version::V5, Refusal::Malformed) => ConnectReturnCode::MalformedPacket,
    }
}

/// A raw MQTT 3.1.1 CONNACK (for refusing MQTT 3.1 clients, which no codec here speaks).
pub fn raw_connack_v3(code: u8) -> [u8; 4] {
    [0x20, 0x02, 0x00, code]
}

/// MQTT control packet type names, by type number (index 0 unused; AUTH, 15, is not read).
pub const PACKET_TYPES: [&str; 15] = [
    "",
    "connect",
    "connack",
    "publish",
    "puback",
    "pubrec",
    "pubrel",
    "pubcomp",
    "subscribe",
    "suback",
    "unsubscribe",
    "unsuback",
    "pingreq",
    "pingresp",
    "disconnect",
];

/// The control packet type number of `packet` (1 CONNECT .. 14 DISCONNECT).
pub fn packet_type(packet: &Packet) -> usize {
    match packet {
        Packet::Connect(..) => 1,
        Packet::ConnAck(..) => 2,
        Packet::Publish(..) => 3,
        Packet::PubAck(..) => 4,
        Packet::PubRec(..) => 5,
        Packet::PubRel(..) => 6,
        Packet::PubComp(..) => 7,
        Packet::Subscribe(..) => 8,
        Packet::SubAck(..) => 9,
        Packet::Unsubscribe(..) => 10,
        Packet::UnsubAck(..) => 11,
        Packet::PingReq(..) => 12,
        Packet::PingResp(..) => 13,
        Packet::Disconnect(..) => 14,
    }
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
    fn connect_header_is_read_from_partial_and_whole_packets() {
        // CONNECT, remaining length 12, "MQTT", level 5, flags 2 (clean start), ...
        let connect = [0x10, 12, 0, 4, b'M', b'Q', b'T', b'T', 5, 2, 0, 60, 0, 0];
        let header = connect_header(&connect).expect("header");
        assert_eq!((header.level, header.flags), (5, 2));
        assert_eq!(header.check(), Ok(()));
        assert_eq!(connect_header(&connect[..5]), Err(CodecError::Incomplete));
        assert_eq!(connect_header(&connect[..9]), Err(CodecError::Incomplete));
        for bad_first in [[0x30, 0], [0x11, 0]] {
            assert!(matches!(
                connect_header(&bad_first),
                Err(CodecError::Malformed(_))
            ));
        }
        let v31 = [
            0x10, 14, 0, 6, b'M', b'Q', b'I', b's', b'd', b'p', 3, 2, 0, 60, 0, 0,
        ];
        assert_eq!(connect_header(&v31).map(|h| h.level), Ok(3));
        let reserved = ConnectHeader {
            level: 5,
            flags: 0b0000_0011,
        };
        assert!(reserved.check().is_err());
        let password_only = ConnectHeader {
            level: 4,
            flags: 0b0100_0010,
        };
        assert!(password_only.check().is_err());
    }

    #[test]
    fn fixed_header_flags_are_checked_per_packet_type() {
        let malformed = [
            vec![0x80, 0x06, 0x00, 0x01, 0x00, 0x01, b'a', 0x00], // SUBSCRIBE, flags 0
            vec![0xa0, 0x05, 0x00, 0x01, 0x00, 0x01, b'a'],       // UNSUBSCRIBE, flags 0
            vec![0x60, 0x02, 0x00, 0x01],                         // PUBREL, flags 0
            vec![0x41, 0x02, 0x00, 0x01],                         // PUBACK, flags 1
            vec![0x36, 0x05, 0x00, 0x01, b'a', 0x00, 0x01],       // PUBLISH QoS 3
            vec![0x38, 0x03, 0x00, 0x01, b'a'],                   // PUBLISH QoS 0 + DUP
            vec![0xc1, 0x00],                                     // PINGREQ, flags 1
            vec![0x20, 0x02, 0x00, 0x00],                         // CONNACK from a client
            vec![0x90, 0x03, 0x00, 0x01, 0x00],                   // SUBACK from a client
        ];
        for bytes in malformed {
            for version in [Version::V311, Version::V5] {
                let mut buffer = BytesMut::from(&bytes[..]);
                assert!(
                    matches!(
                        read(version, &mut buffer, 1024),
                        Err(CodecError::Malformed(_))
                    ),
                    "{bytes:02x?} {version:?}"
                );
            }
        }
        let mut ok = BytesMut::from(&[0x62, 0x02, 0x00, 0x01][..]);
        assert!(matches!(
            read(Version::V311, &mut ok, 1024),
            Ok(Packet::PubRel(..))
        ));
    }

    #[test]
    fn a_v5_disconnect_with_only_a_reason_code_is_read_and_a_cut_short_packet_is_malformed() {
        for (code, expected) in [
            (
                0x00,
                rumqttd::protocol::DisconnectReasonCode::NormalDisconnection,
            ),
            (
                0x04,
                rumqttd::protocol::DisconnectReasonCode::DisconnectWithWillMessage,
            ),
            (
                0x80,
                rumqttd::protocol::DisconnectReasonCode::DisconnectWithWillMessage,
            ),
        ] {
            let mut buffer = BytesMut::from(&[0xe0, 0x01, code][..]);
            match read(Version::V5, &mut buffer, 1024) {
                Ok(Packet::Disconnect(disconnect, None)) => {
                    assert_eq!(disconnect.reason_code, expected)
                }
                other => panic!("{code:#x}: {other:?}"),
            }
            assert!(buffer.is_empty());
        }
        // A v5 PUBLISH without its property length.
        let mut cut = BytesMut::from(&[0x30, 0x03, 0x00, 0x01, b'a'][..]);
        assert!(matches!(
            read(Version::V5, &mut cut, 1024),
            Err(CodecError::Malformed(_))
        ));
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
                Refusal::QuotaExceeded,
                Refusal::Throttled,
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
