//! The device shadow: desired vs reported state, per-leaf metadata, a version, and the delta.
//!
//! Semantics (design.md section 6, AWS IoT Device Shadow compatible):
//! - An update names `state.desired` and/or `state.reported`. Fields named are set; `null`
//!   deletes a key; nested objects merge recursively; arrays are replaced whole; a section set to
//!   `null` is cleared. Objects left with no keys are not stored (setting `{}` stores nothing).
//! - `version` present and non-zero must equal the current version (409 otherwise); every
//!   accepted update increments the version by exactly 1. Deleting the shadow keeps the version.
//! - Every leaf (scalar or whole array) has metadata `{"timestamp": unix_seconds}` of its last set.
//! - The delta is every desired key whose value differs from reported, recursively, with the full
//!   path from the root; numbers compare by value (`22` equals `22.0`).
//!
//! Everything here is pure: time comes in as an argument.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::{Rejection, RejectionKind};

/// Bounds on a shadow document.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShadowLimits {
    /// Largest `state` (desired + reported, compact JSON) after an update, in bytes.
    pub state_bytes_max: usize,
    /// Deepest nesting of objects/arrays inside `desired` or `reported` (the section is level 1).
    pub depth_max: usize,
    /// Longest `clientToken`, in bytes.
    pub client_token_bytes_max: usize,
}

impl Default for ShadowLimits {
    fn default() -> Self {
        ShadowLimits {
            state_bytes_max: 8 * 1024,
            depth_max: 6,
            client_token_bytes_max: 64,
        }
    }
}

/// How an update changes one section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum SectionPatch {
    /// `"desired": null`: the section is cleared.
    #[serde(rename = "clear")]
    Clear,
    /// `"desired": {...}`: merged into the section (`null` leaves delete keys).
    #[serde(rename = "merge")]
    Merge(Map<String, Value>),
}

impl SectionPatch {
    /// The patch as the JSON the device sent (`null` or the object).
    pub fn to_json(&self) -> Value {
        match self {
            SectionPatch::Clear => Value::Null,
            SectionPatch::Merge(map) => Value::Object(map.clone()),
        }
    }
}

/// A validated shadow update request.
#[derive(Debug, Clone, PartialEq)]
pub struct ShadowUpdate {
    /// Change to `desired`, if named.
    pub desired: Option<SectionPatch>,
    /// Change to `reported`, if named.
    pub reported: Option<SectionPatch>,
    /// Correlation token echoed in every reply.
    pub client_token: Option<String>,
    /// Optimistic lock: `Some(v)` with `v > 0` must equal the current version.
    pub expected_version: Option<u64>,
}

impl ShadowUpdate {
    /// Parses a request body (`{"state":{...},"clientToken"?,"version"?}`) from raw bytes.
    ///
    /// Only the parts that matter are built (see [`BodyParts`]); the outcome, errors included,
    /// is that of [`parse_json_object`] then [`ShadowUpdate::from_value`] (a fuzz target checks).
    pub fn parse(bytes: &[u8], limits: &ShadowLimits) -> Result<ShadowUpdate, Rejection> {
        let text = utf8(bytes)?;
        match serde_json::from_str::<Body>(text).map_err(invalid_json)? {
            Body::Object(parts) => ShadowUpdate::from_parts(parts, limits),
            Body::NotObject => Err(not_an_object()),
        }
    }

    /// Validates an already parsed request body. JSON outside `state`, `clientToken` and
    /// `version` is ignored.
    pub fn from_json(body: &Value, limits: &ShadowLimits) -> Result<ShadowUpdate, Rejection> {
        ShadowUpdate::from_value(body.clone(), limits)
    }

    /// [`ShadowUpdate::from_json`] of a body it may take apart: the sections' maps move into
    /// the update rather than being copied.
    pub fn from_value(body: Value, limits: &ShadowLimits) -> Result<ShadowUpdate, Rejection> {
        let Value::Object(mut body) = body else {
            return Err(not_an_object());
        };
        let state = match body.remove("state") {
            None => None,
            Some(Value::Null) => Some(StatePart::Null),
            Some(Value::Object(mut state)) => Some(StatePart::Object {
                desired: state.remove("desired"),
                reported: state.remove("reported"),
            }),
            Some(_) => Some(StatePart::NotObject),
        };
        let parts = BodyParts {
            client_token: body.remove("clientToken"),
            version: body.remove("version"),
            state,
        };
        ShadowUpdate::from_parts(parts, limits)
    }

    fn from_parts(parts: BodyParts, limits: &ShadowLimits) -> Result<ShadowUpdate, Rejection> {
        let client_token = token_of(parts.client_token, limits)?;
        let reject = |message: &str| {
            Err(Rejection::new(RejectionKind::InvalidRequest, message)
                .with_token(client_token.clone()))
        };
        let expected_version = match parts.version {
            None | Some(Value::Null) => None,
            Some(Value::Number(n)) => match n.as_u64() {
                Some(v) => Some(v),
                None => return reject("Invalid version: must be a non-negative integer"),
            },
            Some(_) => return reject("Invalid version: must be a non-negative integer"),
        };
        let (desired, reported) = match parts.state {
            None | Some(StatePart::Null) => return reject("Missing required node: state"),
            Some(StatePart::Object { desired, reported }) => (desired, reported),
            Some(StatePart::NotObject) => return reject("State node must be an object"),
        };
        let mut sections = [None, None];
        for ((slot, name), section) in sections
            .iter_mut()
            .zip(["desired", "reported"])
            .zip([desired, reported])
        {
            *slot = match section {
                None => None,
                Some(Value::Null) => Some(SectionPatch::Clear),
                Some(Value::Object(map)) => {
                    let depth = depth_of_object(&map);
                    if depth > limits.depth_max {
                        return reject(&format!(
                            "JSON contains too many levels of nesting; maximum is {}",
                            limits.depth_max
                        ));
                    }
                    if map.values().any(contains_null_in_array) {
                        return reject(&format!("{name}: arrays must not contain null"));
                    }
                    Some(SectionPatch::Merge(map))
                }
                Some(_) => return reject(&format!("{} node must be an object", capital(name))),
            };
        }
        let [desired, reported] = sections;
        if desired.is_none() && reported.is_none() {
            return reject("State contains no desired or reported node");
        }
        Ok(ShadowUpdate {
            desired,
            reported,
            client_token,
            expected_version,
        })
    }
}

/// What an update body holds for [`ShadowUpdate`]: read straight from the text, the body's
/// and the state's own maps and keys are never built (with the token's copy they were 8 of
/// the 9 allocations of parsing a small report). Keys appearing twice keep the last value, and
/// every other value is still parsed (and dropped), as a `Value` would be.
enum Body {
    Object(BodyParts),
    NotObject,
}

#[derive(Default)]
struct BodyParts {
    client_token: Option<Value>,
    version: Option<Value>,
    state: Option<StatePart>,
}

enum StatePart {
    Null,
    NotObject,
    Object {
        desired: Option<Value>,
        reported: Option<Value>,
    },
}

/// The keys [`Body`] and [`StatePart`] look for, matched without allocating.
enum Key {
    State,
    ClientToken,
    Version,
    Desired,
    Reported,
    Other,
}

impl<'de> Deserialize<'de> for Key {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Key, D::Error> {
        struct KeyVisitor;
        impl serde::de::Visitor<'_> for KeyVisitor {
            type Value = Key;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a key")
            }
            fn visit_str<E: serde::de::Error>(self, key: &str) -> Result<Key, E> {
                Ok(match key {
                    "state" => Key::State,
                    "clientToken" => Key::ClientToken,
                    "version" => Key::Version,
                    "desired" => Key::Desired,
                    "reported" => Key::Reported,
                    _ => Key::Other,
                })
            }
        }
        deserializer.deserialize_str(KeyVisitor)
    }
}

/// Consumes what is left of a value that is not an object (as a `Value` would be read).
fn drain_seq<'de, A: serde::de::SeqAccess<'de>>(mut seq: A) -> Result<(), A::Error> {
    while seq.next_element::<Value>()?.is_some() {}
    Ok(())
}

/// The part of a visitor that maps `null` to `$null` and every other value that is not an
/// object to `$other` (consumed as a `Value` would be).
macro_rules! other_values {
    ($null:expr, $other:expr) => {
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("any valid JSON value")
        }
        fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok($null)
        }
        fn visit_bool<E: serde::de::Error>(self, _: bool) -> Result<Self::Value, E> {
            Ok($other)
        }
        fn visit_i64<E: serde::de::Error>(self, _: i64) -> Result<Self::Value, E> {
            Ok($other)
        }
        fn visit_u64<E: serde::de::Error>(self, _: u64) -> Result<Self::Value, E> {
            Ok($other)
        }
        fn visit_f64<E: serde::de::Error>(self, _: f64) -> Result<Self::Value, E> {
            Ok($other)
        }
        fn visit_str<E: serde::de::Error>(self, _: &str) -> Result<Self::Value, E> {
            Ok($other)
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
            drain_seq(seq)?;
            Ok($other)
        }
    };
}

impl<'de> Deserialize<'de> for Body {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Body, D::Error> {
        struct BodyVisitor;
        impl<'de> serde::de::Visitor<'de> for BodyVisitor {
            type Value = Body;
            other_values!(Body::NotObject, Body::NotObject);
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Body, A::Error> {
                let mut parts = BodyParts::default();
                while let Some(key) = map.next_key::<Key>()? {
                    match key {
                        Key::State => parts.state = Some(map.next_value()?),
                        Key::ClientToken => parts.client_token = Some(map.next_value()?),
                        Key::Version => parts.version = Some(map.next_value()?),
                        _ => drop(map.next_value::<Value>()?),
                    }
                }
                Ok(Body::Object(parts))
            }
        }
        deserializer.deserialize_any(BodyVisitor)
    }
}

impl<'de> Deserialize<'de> for StatePart {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<StatePart, D::Error> {
        struct StateVisitor;
        impl<'de> serde::de::Visitor<'de> for StateVisitor {
            type Value = StatePart;
            other_values!(StatePart::Null, StatePart::NotObject);
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<StatePart, A::Error> {
                let (mut desired, mut reported) = (None, None);
                while let Some(key) = map.next_key::<Key>()? {
                    match key {
                        Key::Desired => desired = Some(map.next_value()?),
                        Key::Reported => reported = Some(map.next_value()?),
                        _ => drop(map.next_value::<Value>()?),
                    }
                }
                Ok(StatePart::Object { desired, reported })
            }
        }
        deserializer.deserialize_any(StateVisitor)
    }
}

fn utf8(bytes: &[u8]) -> Result<&str, Rejection> {
    std::str::from_utf8(bytes).map_err(|_| {
        Rejection::new(
            RejectionKind::UnsupportedEncoding,
            "Unsupported document encoding; supported encoding is UTF-8",
        )
    })
}

fn invalid_json(e: serde_json::Error) -> Rejection {
    Rejection::new(
        RejectionKind::InvalidJson,
        format!("Payload contains invalid json: {e}"),
    )
}

fn not_an_object() -> Rejection {
    Rejection::new(
        RejectionKind::InvalidRequest,
        "Payload must be a JSON object",
    )
}

/// Parses bytes as a JSON object, with the shadow contract's errors (415 for non-UTF-8, 400 for
/// invalid JSON). Used by every device-plane parser.
pub fn parse_json_object(bytes: &[u8]) -> Result<Value, Rejection> {
    let value: Value = serde_json::from_str(utf8(bytes)?).map_err(invalid_json)?;
    if !value.is_object() {
        return Err(not_an_object());
    }
    Ok(value)
}

/// Reads and bounds `clientToken` (absent or null = none).
pub fn client_token_of(
    body: &Map<String, Value>,
    limits: &ShadowLimits,
) -> Result<Option<String>, Rejection> {
    Ok(checked_token(body.get("clientToken"), limits)?.map(str::to_owned))
}

/// [`client_token_of`] of the `clientToken` value itself, taken rather than copied.
fn token_of(token: Option<Value>, limits: &ShadowLimits) -> Result<Option<String>, Rejection> {
    checked_token(token.as_ref(), limits)?;
    Ok(match token {
        Some(Value::String(token)) => Some(token),
        _ => None,
    })
}

fn checked_token<'v>(
    token: Option<&'v Value>,
    limits: &ShadowLimits,
) -> Result<Option<&'v str>, Rejection> {
    match token {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(token)) if token.len() <= limits.client_token_bytes_max => {
            Ok(Some(token))
        }
        Some(Value::String(_)) => Err(Rejection::new(
            RejectionKind::InvalidRequest,
            format!(
                "clientToken must be at most {} bytes",
                limits.client_token_bytes_max
            ),
        )),
        Some(_) => Err(Rejection::new(
            RejectionKind::InvalidRequest,
            "clientToken must be a string",
        )),
    }
}

fn capital(name: &str) -> String {
    let mut chars = name.chars();
    match chars.next() {
        Some(first) => first.to_uppercase().chain(chars).collect(),
        None => String::new(),
    }
}

/// Nesting depth of an object counted as level 1, each nested object/array one more.
fn depth_of_object(map: &Map<String, Value>) -> usize {
    1 + map.values().map(depth_of).max().unwrap_or(0)
}

fn depth_of(value: &Value) -> usize {
    match value {
        Value::Object(map) => depth_of_object(map),
        Value::Array(items) => 1 + items.iter().map(depth_of).max().unwrap_or(0),
        _ => 0,
    }
}

fn contains_null_in_array(value: &Value) -> bool {
    match value {
        Value::Array(items) => items
            .iter()
            .any(|v| v.is_null() || contains_null_anywhere(v)),
        Value::Object(map) => map.values().any(contains_null_in_array),
        _ => false,
    }
}

fn contains_null_anywhere(value: &Value) -> bool {
    match value {
        Value::Null => true,
        Value::Array(items) => items.iter().any(contains_null_anywhere),
        Value::Object(map) => map.values().any(contains_null_anywhere),
        _ => false,
    }
}

/// A Thing's shadow. `exists` is false before the first update and after a delete; the version
/// survives deletes so it never repeats.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Shadow {
    /// Desired state (no empty objects).
    #[serde(default)]
    pub desired: Map<String, Value>,
    /// Reported state (no empty objects).
    #[serde(default)]
    pub reported: Map<String, Value>,
    /// Same shape as `desired`: each leaf's last-set time.
    #[serde(default)]
    pub metadata_desired: Metadata,
    /// Same shape as `reported`: each leaf's last-set time.
    #[serde(default)]
    pub metadata_reported: Metadata,
    /// Current version; 0 before the first update.
    #[serde(default)]
    pub version: u64,
    /// Whether a shadow document exists.
    #[serde(default)]
    pub exists: bool,
    /// Unix seconds of the last accepted change.
    #[serde(default)]
    pub updated_at_s: u64,
}

/// A section's metadata: the section's shape, with the Unix seconds each leaf was last set.
///
/// Rendered and stored (snapshots) as AWS IoT shows it, every leaf `{"timestamp": seconds}`;
/// held in memory with the bare number as the leaf. A one-entry JSON object is a whole map node
/// (about 630 bytes with serde_json's map), so the rendered form cost an active Thing that much
/// per leaf of its shadow.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Metadata(Map<String, Value>);

impl Metadata {
    /// The rendered form: every leaf `{"timestamp": seconds}`.
    pub fn expanded(&self) -> Map<String, Value> {
        expand_metadata(&self.0)
    }

    /// The rendered form for a document, `None` for a section with no leaves (omitted).
    pub fn rendered(&self) -> Option<Map<String, Value>> {
        (!self.0.is_empty()).then(|| self.expanded())
    }

    /// Top-level keys (those of the section it describes).
    pub fn keys(&self) -> impl Iterator<Item = &String> {
        self.0.keys()
    }

    /// True when the section has no leaves.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Rendered metadata from the compact form: a number is a leaf's time, an object a node.
fn expand_metadata(compact: &Map<String, Value>) -> Map<String, Value> {
    compact
        .iter()
        .map(|(key, value)| {
            let rendered = match value {
                Value::Object(node) => Value::Object(expand_metadata(node)),
                stamp => leaf_metadata(stamp),
            };
            (key.clone(), rendered)
        })
        .collect()
}

/// The compact form of rendered metadata. In the rendered form a node's values are always
/// objects, so an object whose only entry is a numeric `timestamp` is exactly a leaf (a data key
/// named `timestamp` gives a node `{"timestamp": {..}}`, whose value is an object).
fn compact_metadata(rendered: Map<String, Value>) -> Map<String, Value> {
    rendered
        .into_iter()
        .map(|(key, value)| match value {
            Value::Object(mut node) => {
                if node.len() == 1 && matches!(node.get("timestamp"), Some(Value::Number(_))) {
                    let stamp = node.remove("timestamp").unwrap_or_default();
                    (key, stamp)
                } else {
                    (key, Value::Object(compact_metadata(node)))
                }
            }
            other => (key, other),
        })
        .collect()
}

impl Serialize for Metadata {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        // The stored form is the rendered one, so snapshots keep their shape.
        self.expanded().serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for Metadata {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Map::<String, Value>::deserialize(deserializer)
            .map(|rendered| Metadata(compact_metadata(rendered)))
    }
}

/// The event of an accepted update: what the request changed, as it will be replayed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShadowUpdated {
    /// Change to `desired`.
    #[serde(default)]
    pub desired: Option<SectionPatch>,
    /// Change to `reported`.
    #[serde(default)]
    pub reported: Option<SectionPatch>,
    /// The version the shadow has after this update.
    pub version: u64,
    /// Unix seconds stamped on every leaf this update set.
    pub timestamp_s: u64,
    /// The request's client token (kept for the audit trail).
    #[serde(default)]
    pub client_token: Option<String>,
    /// Who asked for the change.
    pub origin: Origin,
    /// The delta after the update (desired fields that differ from reported), when there is
    /// one: for the integrations and auditors reading the log (v2; absent in v1 records).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delta: Option<Map<String, Value>>,
}

/// The event of a deleted shadow document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShadowDeleted {
    /// The version the shadow had; the next update gets `version + 1`.
    pub version: u64,
    /// Unix seconds of the deletion.
    pub timestamp_s: u64,
    /// The request's client token.
    #[serde(default)]
    pub client_token: Option<String>,
    /// Who asked for the deletion.
    pub origin: Origin,
}

/// Which side of the contract asked for a change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Origin {
    /// The device itself (MQTT or the ThingDatas HTTP API).
    #[serde(rename = "device")]
    Device,
    /// An operator or backend through the management API.
    #[serde(rename = "operator")]
    Operator,
}

/// The full document: `{state:{desired,reported,delta}, metadata:{desired,reported}, version, timestamp}`.
#[derive(Debug, Clone, PartialEq)]
pub struct ShadowDocument {
    /// Desired state, if any.
    pub desired: Option<Map<String, Value>>,
    /// Reported state, if any.
    pub reported: Option<Map<String, Value>>,
    /// Delta of desired vs reported, if non-empty.
    pub delta: Option<Map<String, Value>>,
    /// Metadata of desired.
    pub metadata_desired: Option<Map<String, Value>>,
    /// Metadata of reported.
    pub metadata_reported: Option<Map<String, Value>>,
    /// Current version.
    pub version: u64,
    /// Unix seconds of the document's last change.
    pub timestamp_s: u64,
}

impl ShadowDocument {
    /// Renders `{state, metadata, version, timestamp}` (+ `clientToken` when given). Empty
    /// sections are omitted, as AWS IoT does.
    pub fn to_json(&self, client_token: Option<&str>) -> Value {
        let mut state = Map::new();
        let mut metadata = Map::new();
        put_some(&mut state, "desired", &self.desired);
        put_some(&mut state, "reported", &self.reported);
        put_some(&mut state, "delta", &self.delta);
        put_some(&mut metadata, "desired", &self.metadata_desired);
        put_some(&mut metadata, "reported", &self.metadata_reported);
        let mut doc = Map::new();
        doc.insert("state".into(), Value::Object(state));
        doc.insert("metadata".into(), Value::Object(metadata));
        doc.insert("version".into(), self.version.into());
        doc.insert("timestamp".into(), self.timestamp_s.into());
        if let Some(token) = client_token {
            doc.insert("clientToken".into(), token.into());
        }
        Value::Object(doc)
    }
}

fn put_some(target: &mut Map<String, Value>, key: &str, value: &Option<Map<String, Value>>) {
    if let Some(map) = value {
        target.insert(key.into(), Value::Object(map.clone()));
    }
}

fn non_empty(map: &Map<String, Value>) -> Option<Map<String, Value>> {
    (!map.is_empty()).then(|| map.clone())
}

impl Shadow {
    /// The full document, or `None` if no shadow exists.
    pub fn document(&self) -> Option<ShadowDocument> {
        if !self.exists {
            return None;
        }
        let (delta, _) = self.delta();
        Some(ShadowDocument {
            desired: non_empty(&self.desired),
            reported: non_empty(&self.reported),
            delta: non_empty(&delta),
            metadata_desired: self.metadata_desired.rendered(),
            metadata_reported: self.metadata_reported.rendered(),
            version: self.version,
            timestamp_s: self.updated_at_s,
        })
    }

    /// `(delta state, delta metadata)`: desired keys whose value differs from reported.
    pub fn delta(&self) -> (Map<String, Value>, Map<String, Value>) {
        let mut state = Map::new();
        let mut metadata = Map::new();
        delta_into(
            &self.desired,
            &self.reported,
            &self.metadata_desired.0,
            &mut state,
            &mut metadata,
        );
        (state, expand_metadata(&metadata))
    }

    /// Bytes of `{"desired":..,"reported":..}` as compact JSON (the size limit's measure).
    pub fn state_bytes(&self) -> usize {
        /// The state as it is measured, borrowed (no copy of either section).
        #[derive(Serialize)]
        struct State<'a> {
            desired: &'a Map<String, Value>,
            reported: &'a Map<String, Value>,
        }
        let mut counter = ByteCounter(0);
        let state = State {
            desired: &self.desired,
            reported: &self.reported,
        };
        // Writing to a counter cannot fail.
        let _ = serde_json::to_writer(&mut counter, &state);
        counter.0
    }

    /// Applies an accepted update (the event's apply; no validation here).
    pub fn apply_updated(&mut self, event: &ShadowUpdated) {
        let stamp = Value::from(event.timestamp_s);
        if let Some(patch) = &event.desired {
            apply_patch(
                &mut self.desired,
                &mut self.metadata_desired.0,
                patch,
                &stamp,
            );
        }
        if let Some(patch) = &event.reported {
            apply_patch(
                &mut self.reported,
                &mut self.metadata_reported.0,
                patch,
                &stamp,
            );
        }
        self.version = event.version;
        self.exists = true;
        self.updated_at_s = event.timestamp_s;
    }

    /// Applies a deletion: the document is gone, the version stays.
    pub fn apply_deleted(&mut self, event: &ShadowDeleted) {
        let version = self.version.max(event.version);
        *self = Shadow {
            version,
            updated_at_s: event.timestamp_s,
            ..Shadow::default()
        };
    }
}

struct ByteCounter(usize);

impl std::io::Write for ByteCounter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len();
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn apply_patch(
    data: &mut Map<String, Value>,
    metadata: &mut Map<String, Value>,
    patch: &SectionPatch,
    stamp: &Value,
) {
    match patch {
        SectionPatch::Clear => {
            data.clear();
            metadata.clear();
        }
        SectionPatch::Merge(patch) => merge_object(data, metadata, patch, stamp),
    }
}

fn leaf_metadata(stamp: &Value) -> Value {
    let mut leaf = Map::new();
    leaf.insert("timestamp".into(), stamp.clone());
    Value::Object(leaf)
}

/// Merges `patch` into `data`, keeping `metadata` the same shape, then drops emptied objects.
fn merge_object(
    data: &mut Map<String, Value>,
    metadata: &mut Map<String, Value>,
    patch: &Map<String, Value>,
    stamp: &Value,
) {
    for (key, change) in patch {
        match change {
            Value::Null => {
                data.remove(key);
                metadata.remove(key);
            }
            Value::Object(child_patch) => {
                if !matches!(data.get(key), Some(Value::Object(_))) {
                    data.insert(key.clone(), Value::Object(Map::new()));
                    metadata.insert(key.clone(), Value::Object(Map::new()));
                }
                if !matches!(metadata.get(key), Some(Value::Object(_))) {
                    metadata.insert(key.clone(), Value::Object(Map::new()));
                }
                let emptied = match (data.get_mut(key), metadata.get_mut(key)) {
                    (Some(Value::Object(child)), Some(Value::Object(child_meta))) => {
                        merge_object(child, child_meta, child_patch, stamp);
                        child.is_empty()
                    }
                    _ => false,
                };
                if emptied {
                    data.remove(key);
                    metadata.remove(key);
                }
            }
            leaf => {
                data.insert(key.clone(), leaf.clone());
                metadata.insert(key.clone(), stamp.clone());
            }
        }
    }
}

fn delta_into(
    desired: &Map<String, Value>,
    reported: &Map<String, Value>,
    metadata: &Map<String, Value>,
    out_state: &mut Map<String, Value>,
    out_metadata: &mut Map<String, Value>,
) {
    for (key, wanted) in desired {
        let have = reported.get(key);
        if have.is_some_and(|have| json_eq(wanted, have)) {
            continue;
        }
        match (wanted, have) {
            (Value::Object(wanted), Some(Value::Object(have))) => {
                let empty = Map::new();
                let child_meta = match metadata.get(key) {
                    Some(Value::Object(m)) => m,
                    _ => &empty,
                };
                let mut sub_state = Map::new();
                let mut sub_meta = Map::new();
                delta_into(wanted, have, child_meta, &mut sub_state, &mut sub_meta);
                if !sub_state.is_empty() {
                    out_state.insert(key.clone(), Value::Object(sub_state));
                    out_metadata.insert(key.clone(), Value::Object(sub_meta));
                }
            }
            _ => {
                out_state.insert(key.clone(), wanted.clone());
                if let Some(meta) = metadata.get(key) {
                    out_metadata.insert(key.clone(), meta.clone());
                }
            }
        }
    }
}

/// JSON equality where numbers compare by value (`22 == 22.0`), as firmware expects.
pub fn json_eq(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => {
            if x == y {
                return true;
            }
            match (x.as_f64(), y.as_f64()) {
                (Some(x), Some(y)) => x == y && (x.fract() != 0.0 || x.abs() < 9.0e15),
                _ => false,
            }
        }
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(x, y)| json_eq(x, y))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|other| json_eq(v, other)))
        }
        _ => a == b,
    }
}

/// What an accepted update produced, for every channel to render.
///
/// The documents are shared (`Arc`): the requester's reply and the effects for everyone else
/// hold the same one, where each used to be a deep copy of the JSON tree (~3% of the server's
/// CPU per durable shadow round trip).
#[derive(Debug, Clone, PartialEq)]
pub struct ShadowUpdateResult {
    /// `{state, metadata, version, timestamp, clientToken}` as AWS `update/accepted`, as JSON
    /// text (every channel sends it as it is).
    pub accepted: Arc<str>,
    /// `{version, timestamp, state, metadata}` if desired differs from reported afterwards.
    pub delta: Option<Arc<Value>>,
    /// `{previous, current, timestamp, clientToken}` as AWS `update/documents`, when asked for
    /// (it copies the whole document twice, so it is rendered only if someone listens).
    pub documents: Option<Arc<Value>>,
    /// The desired change made by an operator (`{state:{desired}, version, timestamp}`), to be
    /// published to the device on `shadow/update`; `None` for device updates.
    pub desired_published: Option<Arc<Value>>,
    /// The new version.
    pub version: u64,
}

/// Decides an update against `shadow`: the event to append, the replies it will produce and
/// the shadow the event makes (the state takes it as it is, see `thing::apply_decision`).
pub fn decide_update(
    shadow: &Shadow,
    update: &ShadowUpdate,
    origin: Origin,
    now_ms: u64,
    limits: &ShadowLimits,
    want_documents: bool,
) -> Result<(ShadowUpdated, ShadowUpdateResult, Shadow), Rejection> {
    let token = update.client_token.clone();
    if let Some(expected) = update.expected_version.filter(|v| *v != 0) {
        if expected != shadow.version {
            return Err(
                Rejection::new(RejectionKind::VersionConflict, "Version conflict")
                    .with_token(token),
            );
        }
    }
    let timestamp_s = now_ms / 1000;
    let event = ShadowUpdated {
        desired: update.desired.clone(),
        reported: update.reported.clone(),
        version: shadow.version + 1,
        timestamp_s,
        client_token: token.clone(),
        origin,
        delta: None,
    };
    let mut next = shadow.clone();
    next.apply_updated(&event);
    let state_bytes = next.state_bytes();
    if state_bytes > limits.state_bytes_max {
        return Err(Rejection::new(
            RejectionKind::PayloadTooLarge,
            format!(
                "The payload exceeds the maximum size allowed: state would be {state_bytes} bytes, maximum is {}",
                limits.state_bytes_max
            ),
        )
        .with_token(token));
    }
    let result = update_result(shadow, &next, &event, want_documents);
    let event = ShadowUpdated {
        delta: result
            .delta
            .as_ref()
            .and_then(|d| d["state"].as_object().cloned()),
        ..event
    };
    Ok((event, result, next))
}

/// `update/accepted` of an update as JSON text, rendered from its event alone: `{clientToken?,
/// metadata, state, timestamp, version}` (keys in order, as a JSON map of them would print).
///
/// Serialized straight from the event: building it as a `serde_json::Value` first and then
/// printing that was 8% of the server's CPU per durable shadow round trip.
pub fn accepted_of(event: &ShadowUpdated) -> Arc<str> {
    // Serializing borrowed maps and numbers into a String cannot fail.
    serde_json::to_string(&Accepted(event))
        .unwrap_or_default()
        .into()
}

/// The `update/accepted` document of an event, serialized without a copy of its patches.
struct Accepted<'a>(&'a ShadowUpdated);

impl Serialize for Accepted<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let event = self.0;
        let mut map = serializer.serialize_map(None)?;
        if let Some(token) = &event.client_token {
            map.serialize_entry("clientToken", token)?;
        }
        map.serialize_entry("metadata", &Sections(event, Some(event.timestamp_s)))?;
        map.serialize_entry("state", &Sections(event, None))?;
        map.serialize_entry("timestamp", &event.timestamp_s)?;
        map.serialize_entry("version", &event.version)?;
        map.end()
    }
}

/// The patched sections of an event (`desired`, then `reported`): the patches themselves, or
/// with `Some(stamp)` their metadata (each leaf `{"timestamp": stamp}`). A cleared section is
/// `null` in both.
struct Sections<'a>(&'a ShadowUpdated, Option<u64>);

impl Serialize for Sections<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let Sections(event, stamp) = *self;
        let mut map = serializer.serialize_map(None)?;
        for (name, patch) in [("desired", &event.desired), ("reported", &event.reported)] {
            match (patch, stamp) {
                (None, _) => {}
                (Some(SectionPatch::Clear), _) => map.serialize_entry(name, &())?,
                (Some(SectionPatch::Merge(patch)), None) => map.serialize_entry(name, patch)?,
                (Some(SectionPatch::Merge(patch)), Some(stamp)) => {
                    map.serialize_entry(name, &PatchMetadata(patch, stamp))?
                }
            }
        }
        map.end()
    }
}

/// Metadata for the leaves a patch names (null leaves included), for the accepted reply: the
/// patch's shape with every leaf `{"timestamp": stamp}`.
struct PatchMetadata<'a>(&'a Map<String, Value>, u64);

impl Serialize for PatchMetadata<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        #[derive(Serialize)]
        struct Leaf {
            timestamp: u64,
        }
        let PatchMetadata(patch, stamp) = *self;
        let mut map = serializer.serialize_map(Some(patch.len()))?;
        for (key, value) in patch {
            match value {
                Value::Object(child) => map.serialize_entry(key, &PatchMetadata(child, stamp))?,
                _ => map.serialize_entry(key, &Leaf { timestamp: stamp })?,
            }
        }
        map.end()
    }
}

/// The desired change an operator's update pushes to the device, if it is one.
pub fn desired_pushed_of(event: &ShadowUpdated) -> Option<Value> {
    match (&event.origin, &event.desired) {
        (Origin::Operator, Some(patch)) => Some(serde_json::json!({
            "state": {"desired": patch.to_json()},
            "version": event.version,
            "timestamp": event.timestamp_s,
        })),
        _ => None,
    }
}

/// `delete/accepted` of a deletion: `{version, timestamp, clientToken?}`.
pub fn deleted_of(event: &ShadowDeleted) -> Value {
    let mut reply = serde_json::json!({
        "version": event.version,
        "timestamp": event.timestamp_s,
    });
    if let Some(token) = &event.client_token {
        reply["clientToken"] = token.clone().into();
    }
    reply
}

fn update_result(
    previous: &Shadow,
    next: &Shadow,
    event: &ShadowUpdated,
    want_documents: bool,
) -> ShadowUpdateResult {
    let (delta_state, delta_meta) = next.delta();
    let delta = (!delta_state.is_empty()).then(|| {
        let mut delta = Map::new();
        delta.insert("version".into(), event.version.into());
        delta.insert("timestamp".into(), event.timestamp_s.into());
        delta.insert("state".into(), Value::Object(delta_state));
        delta.insert("metadata".into(), Value::Object(delta_meta));
        if let Some(token) = &event.client_token {
            delta.insert("clientToken".into(), token.clone().into());
        }
        Arc::new(Value::Object(delta))
    });

    let documents = want_documents.then(|| {
        let mut documents = Map::new();
        documents.insert("previous".into(), documents_side(previous));
        documents.insert("current".into(), documents_side(next));
        documents.insert("timestamp".into(), event.timestamp_s.into());
        if let Some(token) = &event.client_token {
            documents.insert("clientToken".into(), token.clone().into());
        }
        Arc::new(Value::Object(documents))
    });

    ShadowUpdateResult {
        accepted: accepted_of(event),
        desired_published: desired_pushed_of(event).map(Arc::new),
        delta,
        documents,
        version: event.version,
    }
}

/// One side of `update/documents`: `{state:{desired,reported}, metadata, version}` or `null`
/// when no shadow existed.
fn documents_side(shadow: &Shadow) -> Value {
    if !shadow.exists {
        return Value::Null;
    }
    let mut state = Map::new();
    let mut metadata = Map::new();
    put_some(&mut state, "desired", &non_empty(&shadow.desired));
    put_some(&mut state, "reported", &non_empty(&shadow.reported));
    put_some(
        &mut metadata,
        "desired",
        &shadow.metadata_desired.rendered(),
    );
    put_some(
        &mut metadata,
        "reported",
        &shadow.metadata_reported.rendered(),
    );
    serde_json::json!({"state": state, "metadata": metadata, "version": shadow.version})
}

/// Decides a deletion: 404 when no shadow exists.
pub fn decide_delete(
    shadow: &Shadow,
    client_token: Option<String>,
    origin: Origin,
    now_ms: u64,
    thing: &str,
) -> Result<ShadowDeleted, Rejection> {
    if !shadow.exists {
        return Err(no_shadow(thing).with_token(client_token));
    }
    Ok(ShadowDeleted {
        version: shadow.version,
        timestamp_s: now_ms / 1000,
        client_token,
        origin,
    })
}

/// The 404 of a missing shadow document.
pub fn no_shadow(thing: &str) -> Rejection {
    Rejection::new(
        RejectionKind::ShadowNotFound,
        format!("No shadow exists with name: '{thing}'"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::thing::ErrorCode;
    use serde_json::json;

    const NOW_MS: u64 = 1_700_000_000_000;
    const NOW_S: u64 = 1_700_000_000;

    fn limits() -> ShadowLimits {
        ShadowLimits::default()
    }

    fn update(body: Value) -> ShadowUpdate {
        ShadowUpdate::from_json(&body, &limits()).expect("valid update")
    }

    /// given: the events already accepted; when: an update; then: the outcome.
    fn given(updates: &[Value]) -> Shadow {
        let mut shadow = Shadow::default();
        for (i, body) in updates.iter().enumerate() {
            let (event, _, _) = decide_update(
                &shadow,
                &update(body.clone()),
                Origin::Device,
                NOW_MS + i as u64 * 1000,
                &limits(),
                true,
            )
            .expect("given update accepted");
            shadow.apply_updated(&event);
        }
        shadow
    }

    fn when(shadow: &Shadow, body: Value) -> Result<(Shadow, ShadowUpdateResult), Rejection> {
        let request = ShadowUpdate::from_json(&body, &limits())?;
        let (event, result, next) =
            decide_update(shadow, &request, Origin::Device, NOW_MS, &limits(), true)?;
        let mut applied = shadow.clone();
        applied.apply_updated(&event);
        assert_eq!(
            applied, next,
            "the shadow decide saw is the one the event makes"
        );
        Ok((next, result))
    }

    fn rejected(body: Value) -> Rejection {
        ShadowUpdate::from_json(&body, &limits()).expect_err("rejected")
    }

    /// The size limit measures `{"desired":..,"reported":..}` as compact JSON.
    #[test]
    fn state_bytes_are_the_compact_json_of_both_sections() {
        let shadow = given(&[
            json!({"state": {"reported": {"temp": 21.5, "fw": {"v": "1.2"}}}}),
            json!({"state": {"desired": {"led": "on", "list": [1, 2, 3]}}}),
        ]);
        let state = json!({"desired": shadow.desired, "reported": shadow.reported});
        assert_eq!(shadow.state_bytes(), state.to_string().len());
        assert_eq!(
            Shadow::default().state_bytes(),
            r#"{"desired":{},"reported":{}}"#.len()
        );
    }

    #[test]
    fn first_report_creates_the_shadow_at_version_1_with_leaf_metadata() {
        let (shadow, result) = when(
            &given(&[]),
            json!({"state":{"reported":{"temp":21.5,"nested":{"a":1}}},"clientToken":"t1"}),
        )
        .expect("accepted");
        assert_eq!(shadow.version, 1);
        assert!(shadow.exists);
        assert_eq!(
            shadow.reported,
            *json!({"temp":21.5,"nested":{"a":1}})
                .as_object()
                .expect("object")
        );
        assert_eq!(
            Value::Object(shadow.metadata_reported.expanded()),
            json!({"temp":{"timestamp":NOW_S},"nested":{"a":{"timestamp":NOW_S}}})
        );
        assert_eq!(
            serde_json::from_str::<Value>(&result.accepted).expect("JSON"),
            json!({"state":{"reported":{"temp":21.5,"nested":{"a":1}}},
                   "metadata":{"reported":{"temp":{"timestamp":NOW_S},"nested":{"a":{"timestamp":NOW_S}}}},
                   "version":1,"timestamp":NOW_S,"clientToken":"t1"})
        );
        assert_eq!(result.delta, None, "no desired, no delta");
        assert_eq!(
            result.documents.expect("asked for")["previous"],
            Value::Null
        );
    }

    #[test]
    fn nested_objects_merge_null_deletes_and_arrays_replace_whole() {
        let shadow =
            given(&[json!({"state":{"reported":{"a":{"x":1,"y":2},"list":[1,2,3],"gone":true}}})]);
        let (shadow, _) = when(
            &shadow,
            json!({"state":{"reported":{"a":{"y":null,"z":3},"list":[9],"gone":null}}}),
        )
        .expect("accepted");
        assert_eq!(
            Value::Object(shadow.reported.clone()),
            json!({"a":{"x":1,"z":3},"list":[9]})
        );
        assert_eq!(shadow.version, 2);
        assert!(shadow.metadata_reported.expanded().get("gone").is_none());
    }

    #[test]
    fn deleting_every_child_removes_the_object() {
        let shadow = given(&[json!({"state":{"reported":{"a":{"x":1}}}})]);
        let (shadow, _) =
            when(&shadow, json!({"state":{"reported":{"a":{"x":null}}}})).expect("accepted");
        assert_eq!(Value::Object(shadow.reported.clone()), json!({}));
        assert_eq!(
            Value::Object(shadow.metadata_reported.expanded()),
            json!({})
        );
    }

    #[test]
    fn section_null_clears_it() {
        let shadow = given(&[json!({"state":{"desired":{"a":1},"reported":{"b":2}}})]);
        let (shadow, _) = when(&shadow, json!({"state":{"desired":null}})).expect("accepted");
        assert!(shadow.desired.is_empty());
        assert!(shadow.metadata_desired.is_empty());
        assert_eq!(Value::Object(shadow.reported.clone()), json!({"b":2}));
    }

    #[test]
    fn delta_has_full_paths_of_only_the_differing_desired_keys() {
        let shadow = given(&[
            json!({"state":{"reported":{"light":{"color":"red","level":5},"fan":1}}}),
            json!({"state":{"desired":{"light":{"color":"green","level":5},"fan":1.0,"new":true}}}),
        ]);
        let (delta, meta) = shadow.delta();
        assert_eq!(
            Value::Object(delta),
            json!({"light":{"color":"green"},"new":true}),
            "level and fan (1 == 1.0) agree and are left out"
        );
        assert_eq!(
            Value::Object(meta),
            json!({"light":{"color":{"timestamp":NOW_S + 1}},"new":{"timestamp":NOW_S + 1}})
        );
    }

    #[test]
    fn delta_is_published_only_while_desired_differs() {
        let shadow = given(&[json!({"state":{"desired":{"t":24}}})]);
        let (shadow, result) =
            when(&shadow, json!({"state":{"reported":{"t":22}}})).expect("accepted");
        assert_eq!(result.delta.expect("delta")["state"], json!({"t":24}));
        let (_, result) = when(&shadow, json!({"state":{"reported":{"t":24}}})).expect("accepted");
        assert_eq!(result.delta, None);
    }

    #[test]
    fn matching_version_is_accepted_and_a_stale_one_conflicts() {
        let shadow = given(&[json!({"state":{"reported":{"a":1}}})]);
        let (next, _) =
            when(&shadow, json!({"state":{"reported":{"a":2}},"version":1})).expect("accepted");
        assert_eq!(next.version, 2);
        let err = when(
            &next,
            json!({"state":{"reported":{"a":3}},"version":1,"clientToken":"c"}),
        )
        .expect_err("conflict");
        assert_eq!(err.code(), ErrorCode::Conflict);
        assert_eq!(err.message, "Version conflict");
        assert_eq!(err.client_token.as_deref(), Some("c"));
        let (next, _) =
            when(&next, json!({"state":{"reported":{"a":3}},"version":0})).expect("0 = no check");
        assert_eq!(next.version, 3);
    }

    #[test]
    fn malformed_requests_are_400_with_a_specific_message() {
        let cases = [
            (json!({"clientToken":"x"}), "Missing required node: state"),
            (json!({"state":5}), "State node must be an object"),
            (
                json!({"state":{"reported":[1]}}),
                "Reported node must be an object",
            ),
            (
                json!({"state":{"desired":"x"}}),
                "Desired node must be an object",
            ),
            (
                json!({"state":{}}),
                "State contains no desired or reported node",
            ),
            (
                json!({"state":{"reported":{}},"version":-1}),
                "Invalid version: must be a non-negative integer",
            ),
            (
                json!({"state":{"reported":{}},"version":"3"}),
                "Invalid version: must be a non-negative integer",
            ),
            (
                json!({"state":{"reported":{"a":[1,null]}}}),
                "reported: arrays must not contain null",
            ),
            (
                json!({"state":{"reported":{}},"clientToken":"x".repeat(65)}),
                "clientToken must be at most 64 bytes",
            ),
            (
                json!({"state":{"reported":{}},"clientToken":5}),
                "clientToken must be a string",
            ),
        ];
        for (body, message) in cases {
            let err = rejected(body.clone());
            assert_eq!(err.code(), ErrorCode::BadRequest, "{body}");
            assert_eq!(err.message, message, "{body}");
        }
    }

    #[test]
    fn rejections_echo_the_client_token() {
        let err = rejected(json!({"clientToken":"abc","state":7}));
        assert_eq!(err.client_token.as_deref(), Some("abc"));
    }

    #[test]
    fn nesting_deeper_than_six_levels_is_rejected() {
        let six = json!({"state":{"reported":{"a":{"b":{"c":{"d":{"e":{"f":1}}}}}}}});
        assert!(ShadowUpdate::from_json(&six, &limits()).is_ok());
        let seven = json!({"state":{"reported":{"a":{"b":{"c":{"d":{"e":{"f":{"g":1}}}}}}}}});
        let err = rejected(seven);
        assert_eq!(
            err.message,
            "JSON contains too many levels of nesting; maximum is 6"
        );
    }

    #[test]
    fn state_over_8_kib_after_merge_is_413() {
        let shadow = given(&[json!({"state":{"reported":{"a":"x".repeat(5000)}}})]);
        let err = when(&shadow, json!({"state":{"desired":{"b":"y".repeat(4000)}}}))
            .expect_err("too large");
        assert_eq!(err.code(), ErrorCode::PayloadTooLarge);
    }

    #[test]
    fn invalid_json_is_400_and_non_utf8_is_415() {
        assert_eq!(
            ShadowUpdate::parse(b"{nope", &limits())
                .expect_err("bad")
                .code(),
            ErrorCode::BadRequest
        );
        assert_eq!(
            ShadowUpdate::parse(&[0xff, 0xfe], &limits())
                .expect_err("bad")
                .code(),
            ErrorCode::UnsupportedEncoding
        );
    }

    #[test]
    fn delete_keeps_the_version_and_the_next_update_continues_it() {
        let shadow = given(&[
            json!({"state":{"reported":{"a":1}}}),
            json!({"state":{"reported":{"a":2}}}),
        ]);
        let deleted = decide_delete(&shadow, None, Origin::Operator, NOW_MS, "t").expect("delete");
        let mut shadow = shadow;
        shadow.apply_deleted(&deleted);
        assert!(shadow.document().is_none());
        assert_eq!(
            decide_delete(&shadow, None, Origin::Operator, NOW_MS, "t")
                .expect_err("gone")
                .code(),
            ErrorCode::NotFound
        );
        let (shadow, _) = when(&shadow, json!({"state":{"reported":{"b":1}}})).expect("accepted");
        assert_eq!(shadow.version, 3);
        assert_eq!(Value::Object(shadow.reported.clone()), json!({"b":1}));
    }

    #[test]
    fn operator_desired_changes_are_published_to_the_device() {
        let request = update(json!({"state":{"desired":{"t":24}}}));
        let (_, result, _) = decide_update(
            &Shadow::default(),
            &request,
            Origin::Operator,
            NOW_MS,
            &limits(),
            false,
        )
        .expect("accepted");
        assert_eq!(
            result.desired_published.as_deref(),
            Some(&json!({"state":{"desired":{"t":24}},"version":1,"timestamp":NOW_S}))
        );
    }

    #[test]
    fn document_shows_state_delta_metadata_and_omits_empty_sections() {
        let shadow = given(&[json!({"state":{"desired":{"t":24}}})]);
        let doc = shadow.document().expect("exists").to_json(Some("tok"));
        assert_eq!(
            doc,
            json!({"state":{"desired":{"t":24},"delta":{"t":24}},
                   "metadata":{"desired":{"t":{"timestamp":NOW_S}}},
                   "version":1,"timestamp":NOW_S,"clientToken":"tok"})
        );
    }

    #[test]
    fn metadata_is_stored_as_rendered_and_a_data_key_named_timestamp_survives_the_round_trip() {
        let shadow = given(&[
            json!({"state":{"reported":{"timestamp":{"timestamp":7},"t":1}}}),
            json!({"state":{"desired":{"timestamp":5}}}),
        ]);
        let rendered =
            json!({"timestamp":{"timestamp":{"timestamp":NOW_S}},"t":{"timestamp":NOW_S}});
        assert_eq!(Value::Object(shadow.metadata_reported.expanded()), rendered);
        // Snapshots keep the rendered shape (what older snapshots hold and older code reads).
        let stored = thinghub_storage::codec::encode(&shadow.metadata_reported).expect("encode");
        let stored: Value = thinghub_storage::codec::decode(&stored).expect("decode");
        assert_eq!(stored, rendered);
        let stored = thinghub_storage::codec::encode(&shadow).expect("encode");
        let reread: Shadow = thinghub_storage::codec::decode(&stored).expect("decode");
        assert_eq!(reread, shadow);
        assert_eq!(
            Value::Object(reread.metadata_desired.expanded()),
            json!({"timestamp":{"timestamp":NOW_S + 1}}),
            "the second update came a second later"
        );
    }
}
