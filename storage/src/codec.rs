//! The stored form of every record: a versioned envelope around an rmp-serde payload.
//!
//! Payloads are encoded with `rmp_serde::to_vec_named` (structs as maps), so fields can be added
//! with `#[serde(default)]` and old code skips fields it does not know. A shipped
//! `(event_type, event_version)` shape is never edited: a new version is added and the reader
//! upcasts the old one (see the domain codec in `thinghub-actors`).
//!
//! The envelope itself is a fixed four-element array (`[event_type, event_version,
//! recorded_at_ms, payload]`): its field names, repeated in every stored record, were about a
//! quarter of a small event. It never gains fields (that is what `event_version` is for), and
//! rmp-serde reads a struct from an array or a map, so envelopes written as maps before
//! 2026-12 read the same, and so does this form for older code.

use serde::{de::DeserializeOwned, Deserialize, Serialize};

/// One stored record: what happened, in which shape version, when, and the encoded payload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    /// Past-tense name of the event (`ShadowUpdated`), or of the snapshot/record type.
    pub event_type: String,
    /// Shape version of `payload` for this `event_type`, starting at 1.
    pub event_version: u16,
    /// Wall-clock time the record was decided, Unix milliseconds.
    pub recorded_at_ms: u64,
    /// The payload, itself `rmp_serde::to_vec_named` of the typed shape.
    #[serde(with = "serde_bytes")]
    pub payload: Vec<u8>,
}

/// Why bytes could not be turned into a record (or a record into bytes).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct CodecError(pub String);

impl Envelope {
    /// Builds an envelope by encoding `payload` with named fields.
    pub fn new<T: Serialize>(
        event_type: &str,
        event_version: u16,
        recorded_at_ms: u64,
        payload: &T,
    ) -> Result<Envelope, CodecError> {
        Ok(Envelope::of(
            event_type,
            event_version,
            recorded_at_ms,
            encode(payload)?,
        ))
    }

    /// Builds an envelope whose payload is a positional array (no field names): for a hot
    /// event shape pinned to its version, where the names would be most of the bytes. Its fields
    /// can never be added to or reordered; a change is a new version. Decoded with
    /// [`Envelope::payload_as`] like any other.
    pub fn new_positional<T: Serialize>(
        event_type: &str,
        event_version: u16,
        recorded_at_ms: u64,
        payload: &T,
    ) -> Result<Envelope, CodecError> {
        let payload = encode_positional(payload)?;
        Ok(Envelope::of(
            event_type,
            event_version,
            recorded_at_ms,
            payload,
        ))
    }

    fn of(event_type: &str, event_version: u16, recorded_at_ms: u64, payload: Vec<u8>) -> Envelope {
        Envelope {
            event_type: event_type.to_owned(),
            event_version,
            recorded_at_ms,
            payload,
        }
    }

    /// Decodes the payload as `T` (the caller has matched `event_type`/`event_version`).
    pub fn payload_as<T: DeserializeOwned>(&self) -> Result<T, CodecError> {
        decode(&self.payload)
    }

    /// The envelope's stored bytes: a four-element array (see the module docs).
    pub fn to_bytes(&self) -> Result<Vec<u8>, CodecError> {
        // The array's header, the type's and the payload's length headers and the two integers
        // take at most 23 bytes.
        let capacity = self.payload.len() + self.event_type.len() + 24;
        encode_positional_into(Vec::with_capacity(capacity), self)
    }

    /// Parses stored bytes into an envelope.
    pub fn from_bytes(bytes: &[u8]) -> Result<Envelope, CodecError> {
        decode(bytes)
    }
}

/// Encodes a value as MessagePack with named fields (payloads; see the module docs).
pub fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, CodecError> {
    rmp_serde::to_vec_named(value).map_err(|e| CodecError(format!("encode: {e}")))
}

/// Encodes a value as MessagePack with structs as arrays (no field names).
fn encode_positional<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, CodecError> {
    encode_positional_into(Vec::with_capacity(ENCODE_CAPACITY_BYTES), value)
}

/// Where a positional encoding starts: a shadow update's payload fits, where a buffer grown
/// from nothing was reallocated five or six times on every append.
const ENCODE_CAPACITY_BYTES: usize = 256;

fn encode_positional_into<T: Serialize + ?Sized>(
    mut buf: Vec<u8>,
    value: &T,
) -> Result<Vec<u8>, CodecError> {
    rmp_serde::encode::write(&mut buf, value).map_err(|e| CodecError(format!("encode: {e}")))?;
    Ok(buf)
}

/// Decodes MessagePack written by [`encode`] or [`encode_positional`].
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    rmp_serde::from_slice(bytes).map_err(|e| CodecError(format!("decode: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct V1 {
        a: u32,
    }

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct V1WithAddedField {
        a: u32,
        #[serde(default)]
        b: Option<String>,
    }

    #[test]
    fn named_encoding_tolerates_added_fields_both_ways() {
        let old = encode(&V1 { a: 7 }).expect("encode");
        let read_by_new: V1WithAddedField = decode(&old).expect("new reads old");
        assert_eq!(read_by_new, V1WithAddedField { a: 7, b: None });

        let new = encode(&V1WithAddedField {
            a: 8,
            b: Some("x".into()),
        })
        .expect("encode");
        let read_by_old: V1 = decode(&new).expect("old reads new");
        assert_eq!(read_by_old, V1 { a: 8 });
    }

    #[test]
    fn envelope_round_trips() {
        let envelope = Envelope::new("Thing", 1, 42, &V1 { a: 1 }).expect("envelope");
        let bytes = envelope.to_bytes().expect("bytes");
        assert_eq!(Envelope::from_bytes(&bytes).expect("decode"), envelope);
        assert_eq!(envelope.payload_as::<V1>().expect("payload"), V1 { a: 1 });
    }

    #[test]
    fn envelopes_stored_as_maps_read_the_same_and_new_ones_are_arrays() {
        let envelope =
            Envelope::new("ShadowUpdated", 2, 1_700_000_000_000, &V1 { a: 1 }).expect("envelope");
        let as_map = encode(&envelope).expect("named");
        assert_eq!(as_map[0], 0x84, "the old form: a map of 4");
        assert_eq!(Envelope::from_bytes(&as_map).expect("old form"), envelope);
        let stored = envelope.to_bytes().expect("bytes");
        assert_eq!(stored[0], 0x94, "the stored form: an array of 4");
        assert!(stored.len() + 40 < as_map.len(), "no field names");
        let read_as_old_code_does: Envelope = decode(&stored).expect("array form");
        assert_eq!(read_as_old_code_does, envelope);
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(Envelope::from_bytes(&[0xc1, 0xff, 0x00]).is_err());
        assert!(Envelope::from_bytes(&[]).is_err());
    }
}
