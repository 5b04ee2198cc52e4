//! Fuzzing, on the stable toolchain: every parser that reads bytes from the network or from
//! disk gets mutated and generated inputs, in process, and must neither panic nor break its
//! laws. No coverage guidance (cargo fuzz needs nightly); instead each target starts from a
//! corpus of valid inputs, mutates them (bit flips, interesting bytes, insertions, deletions,
//! duplications, splices, truncations) and, for JSON, also generates documents from the
//! contract's own field names, so the checks behind the syntax are reached.
//!
//! CI runs a short pass (`THINGHUB_FUZZ_ITERATIONS`, default 20,000 per target). The long run:
//!
//! ```sh
//! THINGHUB_FUZZ_ITERATIONS=10000000 cargo test --release --test fuzz -- --nocapture
//! ```
//!
//! A failure prints its target, seed, iteration and input (hex); `THINGHUB_FUZZ_SEED=N`
//! replays a run exactly.

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Once;
use std::time::Instant;

use bytes::BytesMut;
use rand::rngs::StdRng as SmallRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Map, Value};
use thinghub::cumulocity::smartrest;
use thinghub::http::bulk::parse_line;
use thinghub::http::ndjson::{Line, LineSplitter};
use thinghub::mqtt::codec::{self, Version};
use thinghub::mqtt::topic::{self, FilterTrie};
use thinghub_actors::codec as actor_codec;
use thinghub_actors::thing::shadow::{client_token_of, parse_json_object};
use thinghub_actors::thing::{
    self, CommandResponse, IngestEvent, Limits, Origin, RegisterThing, SendCommand, ShadowUpdate,
    ThingCommand, ThingState,
};
use thinghub_storage::{Envelope, RecordedEvent};

const ITERATIONS_DEFAULT: u64 = 20_000;

fn iterations() -> u64 {
    std::env::var("THINGHUB_FUZZ_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(ITERATIONS_DEFAULT)
}

fn seed() -> u64 {
    std::env::var("THINGHUB_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
        })
}

thread_local! {
    /// The message of the last panic on this thread (set by the hook, read by the runner).
    static LAST_PANIC: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Panics inside rumqttd's codec that our adapter catches by design (counted, not failures).
static CAUGHT_INSIDE: AtomicU64 = AtomicU64::new(0);

fn quiet_panics() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        std::panic::set_hook(Box::new(|info| {
            CAUGHT_INSIDE.fetch_add(1, Ordering::Relaxed);
            let message = format!("{info}");
            LAST_PANIC.with(|last| *last.borrow_mut() = Some(message));
        }));
    });
}

// --- Mutation -----------------------------------------------------------------------------

const INTERESTING: [u8; 12] = [
    0x00, 0x01, 0x02, 0x7f, 0x80, 0xff, 0xfe, b'/', b'+', b'#', b'"', b'$',
];

fn mutate(rng: &mut SmallRng, corpus: &[Vec<u8>], input: &mut Vec<u8>) {
    let rounds = rng.gen_range(1..=8);
    for _ in 0..rounds {
        let len = input.len();
        match rng.gen_range(0..9) {
            0 if len > 0 => {
                let at = rng.gen_range(0..len);
                input[at] ^= 1 << rng.gen_range(0..8);
            }
            1 if len > 0 => {
                let at = rng.gen_range(0..len);
                input[at] = INTERESTING[rng.gen_range(0..INTERESTING.len())];
            }
            2 => {
                let at = rng.gen_range(0..=len);
                let n = rng.gen_range(1..=16);
                let bytes: Vec<u8> = (0..n).map(|_| rng.gen()).collect();
                input.splice(at..at, bytes);
            }
            3 if len > 0 => {
                let from = rng.gen_range(0..len);
                let to = (from + rng.gen_range(1..=16)).min(len);
                input.drain(from..to);
            }
            4 if len > 0 => {
                let from = rng.gen_range(0..len);
                let to = (from + rng.gen_range(1..=32)).min(len);
                let copy = input[from..to].to_vec();
                let at = rng.gen_range(0..=input.len());
                input.splice(at..at, copy);
            }
            5 if !corpus.is_empty() => {
                let other = &corpus[rng.gen_range(0..corpus.len())];
                if !other.is_empty() {
                    let from = rng.gen_range(0..other.len());
                    let to = (from + rng.gen_range(1..=64)).min(other.len());
                    let at = rng.gen_range(0..=input.len());
                    input.splice(at..at, other[from..to].iter().copied());
                }
            }
            6 if len > 0 => input.truncate(rng.gen_range(0..len)),
            7 if len > 1 => {
                // A length-like byte pair set to an edge value.
                let at = rng.gen_range(0..len - 1);
                let value: u16 = [0, 1, 0x7f, 0x80, 0xff, 0x3fff, 0xffff][rng.gen_range(0..7)];
                input[at..at + 2].copy_from_slice(&value.to_be_bytes());
            }
            _ => input.push(rng.gen()),
        }
    }
}

/// Field names of the contract, so generated documents reach semantic checks.
const KEYS: [&str; 24] = [
    "state",
    "desired",
    "reported",
    "version",
    "clientToken",
    "eventType",
    "severity",
    "data",
    "timestamp",
    "status",
    "result",
    "statusReason",
    "reasonCode",
    "reasonDescription",
    "thingName",
    "password",
    "mqttClientId",
    "thingType",
    "attributes",
    "action",
    "params",
    "ttl",
    "commandId",
    "x",
];
const STRINGS: [&str; 10] = [
    "info",
    "warn",
    "error",
    "SUCCEEDED",
    "FAILED",
    "IN_PROGRESS",
    "t1",
    "",
    "x/y",
    "\u{0}",
];

fn gen_value(rng: &mut SmallRng, depth: u32) -> Value {
    match rng.gen_range(0..if depth > 8 { 6 } else { 9 }) {
        0 => Value::Null,
        1 => Value::Bool(rng.gen()),
        2 => json!(rng.gen_range(-3i64..1_000_000)),
        3 => json!([u64::MAX, 0u64, 1u64 << 53][rng.gen_range(0..3)]),
        4 => json!(rng.gen::<f64>() * 1e6),
        5 => Value::String(STRINGS[rng.gen_range(0..STRINGS.len())].to_owned()),
        6 | 7 => {
            let mut map = Map::new();
            for _ in 0..rng.gen_range(0..6) {
                let key = KEYS[rng.gen_range(0..KEYS.len())].to_owned();
                map.insert(key, gen_value(rng, depth + 1));
            }
            Value::Object(map)
        }
        _ => Value::Array(
            (0..rng.gen_range(0..4))
                .map(|_| gen_value(rng, depth + 1))
                .collect(),
        ),
    }
}

/// A generated JSON object in the shape of `template` (its keys kept, values regenerated or
/// replaced at random).
fn gen_document(rng: &mut SmallRng, template: &Value) -> Vec<u8> {
    let value = match template {
        Value::Object(map) => {
            let mut out = Map::new();
            for (key, value) in map {
                let replaced = match rng.gen_range(0..4) {
                    0 => continue,
                    1 => gen_value(rng, 1),
                    2 => match value {
                        Value::Object(_) => {
                            serde_json::from_slice(&gen_document(rng, value)).unwrap_or(Value::Null)
                        }
                        other => other.clone(),
                    },
                    _ => value.clone(),
                };
                out.insert(key.clone(), replaced);
            }
            if rng.gen_bool(0.3) {
                out.insert(
                    KEYS[rng.gen_range(0..KEYS.len())].to_owned(),
                    gen_value(rng, 1),
                );
            }
            Value::Object(out)
        }
        _ => gen_value(rng, 0),
    };
    value.to_string().into_bytes()
}

// --- The runner ---------------------------------------------------------------------------

struct Target {
    name: &'static str,
    corpus: Vec<Vec<u8>>,
    /// JSON targets: generate documents shaped like the corpus half of the time.
    json: bool,
    run: fn(&[u8]),
}

fn fuzz(target: Target) {
    quiet_panics();
    let iterations = iterations();
    let seed = seed();
    let mut rng = SmallRng::seed_from_u64(seed);
    let templates: Vec<Value> = if target.json {
        target
            .corpus
            .iter()
            .filter_map(|c| serde_json::from_slice(c).ok())
            .collect()
    } else {
        Vec::new()
    };
    let started = Instant::now();
    let caught_before = CAUGHT_INSIDE.load(Ordering::Relaxed);
    let mut failures = Vec::new();
    let mut input = Vec::new();
    for iteration in 0..iterations {
        input.clear();
        if !templates.is_empty() && rng.gen_bool(0.5) {
            let template = &templates[rng.gen_range(0..templates.len())];
            input.extend(gen_document(&mut rng, template));
            if rng.gen_bool(0.2) {
                mutate(&mut rng, &target.corpus, &mut input);
            }
        } else {
            input.extend_from_slice(&target.corpus[rng.gen_range(0..target.corpus.len())]);
            mutate(&mut rng, &target.corpus, &mut input);
        }
        LAST_PANIC.with(|last| last.borrow_mut().take());
        let outcome = std::panic::catch_unwind(|| (target.run)(&input));
        if outcome.is_err() {
            let message = LAST_PANIC
                .with(|last| last.borrow_mut().take())
                .unwrap_or_default();
            failures.push(format!(
                "{} seed={seed} iteration={iteration}: {message}\n  input ({} bytes): {}",
                target.name,
                input.len(),
                input.iter().map(|b| format!("{b:02x}")).collect::<String>()
            ));
            if failures.len() >= 5 {
                break;
            }
        }
    }
    let elapsed = started.elapsed();
    // Panics the adapter catches inside rumqttd are its design; only escapes fail.
    let caught = CAUGHT_INSIDE
        .load(Ordering::Relaxed)
        .saturating_sub(caught_before)
        .saturating_sub(failures.len() as u64);
    eprintln!(
        "fuzz {}: {iterations} executions in {:.1} s ({:.0}/s), seed {seed}, {} escaped panics, {caught} caught inside dependencies (all targets of this process)",
        target.name,
        elapsed.as_secs_f64(),
        iterations as f64 / elapsed.as_secs_f64().max(1e-9),
        failures.len()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

// --- Targets ------------------------------------------------------------------------------

fn mqtt_corpus() -> Vec<Vec<u8>> {
    use rumqttd::protocol::*;
    let mut corpus = Vec::new();
    let publish_properties = PublishProperties {
        payload_format_indicator: Some(1),
        message_expiry_interval: Some(60),
        topic_alias: Some(3),
        response_topic: Some("r/t".into()),
        correlation_data: Some(bytes::Bytes::from_static(b"c")),
        user_properties: vec![("k".into(), "v".into())],
        subscription_identifiers: vec![7, 300],
        content_type: Some("application/json".into()),
    };
    for version in [Version::V311, Version::V5] {
        let v5 = version == Version::V5;
        let mut packets = vec![
            Packet::Publish(
                codec::make_publish(
                    "$emqx/things/t1/shadow/update",
                    &bytes::Bytes::from_static(b"{\"state\":{}}"),
                    1,
                    7,
                    false,
                    false,
                ),
                v5.then(|| publish_properties.clone()),
            ),
            Packet::Publish(
                codec::make_publish("a/b", &bytes::Bytes::from_static(b"x"), 2, 9, true, true),
                None,
            ),
            Packet::Publish(
                codec::make_publish("q0", &bytes::Bytes::new(), 0, 0, false, false),
                None,
            ),
            Packet::Subscribe(
                Subscribe {
                    pkid: 3,
                    filters: vec![
                        Filter {
                            path: "$share/g/a/+".into(),
                            qos: QoS::AtLeastOnce,
                            nolocal: true,
                            preserve_retain: true,
                            retain_forward_rule: RetainForwardRule::OnNewSubscribe,
                        },
                        Filter {
                            path: "#".into(),
                            qos: QoS::ExactlyOnce,
                            nolocal: false,
                            preserve_retain: false,
                            retain_forward_rule: RetainForwardRule::Never,
                        },
                    ],
                },
                v5.then(|| SubscribeProperties {
                    id: Some(12),
                    user_properties: vec![],
                }),
            ),
            Packet::Unsubscribe(
                Unsubscribe {
                    pkid: 4,
                    filters: vec!["a/+".into(), "b".into()],
                },
                None,
            ),
            Packet::PubAck(
                PubAck {
                    pkid: 5,
                    reason: PubAckReason::Success,
                },
                None,
            ),
            Packet::PubRec(
                PubRec {
                    pkid: 5,
                    reason: PubRecReason::Success,
                },
                None,
            ),
            Packet::PubRel(
                PubRel {
                    pkid: 5,
                    reason: PubRelReason::Success,
                },
                None,
            ),
            Packet::PubComp(
                PubComp {
                    pkid: 5,
                    reason: PubCompReason::Success,
                },
                None,
            ),
            Packet::PingReq(PingReq),
        ];
        packets.insert(
            0,
            Packet::Connect(
                Connect {
                    keep_alive: 30,
                    client_id: "dev-1".into(),
                    clean_session: false,
                },
                v5.then(|| ConnectProperties {
                    session_expiry_interval: Some(60),
                    receive_maximum: Some(10),
                    max_packet_size: Some(4096),
                    topic_alias_max: Some(4),
                    request_response_info: None,
                    request_problem_info: None,
                    user_properties: vec![],
                    authentication_method: None,
                    authentication_data: None,
                }),
                Some(LastWill {
                    topic: bytes::Bytes::from_static(b"will/t"),
                    message: bytes::Bytes::from_static(b"bye"),
                    qos: QoS::AtLeastOnce,
                    retain: false,
                }),
                None,
                Some(Login {
                    username: "dev-1".into(),
                    password: "pw".into(),
                }),
            ),
        );
        let mut stream = Vec::new();
        for packet in packets {
            let mut buffer = BytesMut::new();
            if codec::write(version, packet, &mut buffer).is_ok() {
                corpus.push(buffer.to_vec());
                stream.extend_from_slice(&buffer);
            }
        }
        corpus.push(stream);
    }
    corpus.push(vec![0xe0, 0x01, 0x04]);
    corpus.push(vec![0xe0, 0x00]);
    corpus
}

/// Decodes packets from `bytes` as both versions until the bytes run out; each decoded packet
/// is encoded again (which must not panic either). The same bytes are also framed as one
/// packet with a correct remaining length, so mutations reach the decoders behind the framing.
fn mqtt_codec(bytes: &[u8]) {
    decode_stream(bytes);
    if let Some((&first, body)) = bytes.split_first() {
        let mut framed = vec![first];
        let mut length = body.len();
        loop {
            let mut byte = (length % 128) as u8;
            length /= 128;
            if length > 0 {
                byte |= 0x80;
            }
            framed.push(byte);
            if length == 0 {
                break;
            }
        }
        framed.extend_from_slice(body);
        decode_stream(&framed);
    }
}

/// Packets the codec accepted (how deep the mutations reach).
static PACKETS_DECODED: AtomicU64 = AtomicU64::new(0);

fn decode_stream(bytes: &[u8]) {
    if let Ok(header) = codec::connect_header(bytes) {
        let _ = header.check();
    }
    for version in [Version::V311, Version::V5] {
        let mut buffer = BytesMut::from(bytes);
        for _ in 0..64 {
            match codec::read(version, &mut buffer, 64 * 1024) {
                Ok(packet) => {
                    PACKETS_DECODED.fetch_add(1, Ordering::Relaxed);
                    if let rumqttd::protocol::Packet::Publish(publish, _) = &packet {
                        let _ = codec::publish_header(publish);
                    }
                    let _ = codec::write(version, packet, &mut BytesMut::new());
                }
                Err(_) => break,
            }
        }
    }
}

#[test]
fn fuzz_mqtt_codec() {
    fuzz(Target {
        name: "mqtt-codec",
        corpus: mqtt_corpus(),
        json: false,
        run: mqtt_codec,
    });
    eprintln!(
        "fuzz mqtt-codec: {} packets decoded",
        PACKETS_DECODED.load(Ordering::Relaxed)
    );
}

/// Three lines: two filters and a topic. Laws: a valid topic matches itself; a filter covers
/// itself; covering implies intersecting and is sound (what the inner filter matches, the
/// outer does); intersection is symmetric; the trie finds exactly what `matches` says.
fn topics(bytes: &[u8]) {
    let text = String::from_utf8_lossy(bytes);
    let mut parts = text.splitn(3, '\n');
    let (a, b, t) = (
        parts.next().unwrap_or(""),
        parts.next().unwrap_or(""),
        parts.next().unwrap_or(""),
    );
    for f in [a, b] {
        let _ = topic::parse_filter(f);
    }
    let topic_ok = topic::validate_topic_name(t).is_ok();
    if topic_ok {
        assert!(topic::matches(t, t), "{t:?} matches itself");
    }
    let (a_ok, b_ok) = (
        topic::validate_filter(a).is_ok(),
        topic::validate_filter(b).is_ok(),
    );
    if a_ok {
        assert!(topic::covers(a, a), "{a:?} covers itself");
    }
    if a_ok && b_ok {
        assert_eq!(
            topic::intersects(a, b),
            topic::intersects(b, a),
            "{a:?} {b:?}"
        );
        if topic::covers(a, b) {
            assert!(topic::intersects(a, b), "{a:?} covers {b:?}");
            if topic_ok && topic::matches(b, t) {
                assert!(
                    topic::matches(a, t),
                    "{a:?} covers {b:?} which matches {t:?}"
                );
            }
        }
        if topic_ok && topic::matches(a, t) && topic::matches(b, t) {
            assert!(topic::intersects(a, b), "{a:?} and {b:?} both match {t:?}");
        }
    }
    if a_ok && topic_ok {
        // The trie holds exact filters and wildcard filters apart; with both of the two
        // filters in it, it finds each once exactly when `matches` says so, and forgets each.
        let mut trie = FilterTrie::default();
        assert!(trie.insert(a, 1u8));
        assert!(!trie.insert(a, 1u8), "a duplicate is refused: {a:?}");
        if b_ok {
            assert!(trie.insert(b, 2u8));
            assert!(!trie.insert(b, 2u8), "a duplicate is refused: {b:?}");
        }
        assert_eq!(trie.len(), 1 + usize::from(b_ok));
        let mut found = Vec::new();
        trie.matching(t, &mut found);
        found.sort_unstable();
        let mut expected = Vec::new();
        if topic::matches(a, t) {
            expected.push(1u8);
        }
        if b_ok && topic::matches(b, t) {
            expected.push(2u8);
        }
        assert_eq!(found, expected, "trie vs matches: {a:?} {b:?} {t:?}");
        assert_eq!(
            trie.matches_any(t),
            !expected.is_empty(),
            "{a:?} {b:?} {t:?}"
        );
        assert!(trie.remove(a, &1u8));
        if b_ok {
            assert!(trie.remove(b, &2u8));
        }
        assert!(trie.is_empty());
        found.clear();
        trie.matching(t, &mut found);
        assert!(
            found.is_empty(),
            "removed filters still match: {a:?} {b:?} {t:?}"
        );
    }
}

#[test]
fn fuzz_topics() {
    let corpus = [
        "a/b/c\na/+/c\na/b/c",
        "#\n+/#\n$SYS/x",
        "$share/g/a/+\na/#\na/x",
        "a//b\n+/+/+\na//b",
        "/\n+\n/",
        "$emqx/things/t1/#\n$emqx/things/+/shadow/update\n$emqx/things/t1/shadow/update",
        "devices/c1/#\ndevices/#\ndevices/c1/x/y",
    ];
    fuzz(Target {
        name: "topics",
        corpus: corpus.iter().map(|s| s.as_bytes().to_vec()).collect(),
        json: false,
        run: topics,
    });
}

fn registered() -> ThingState {
    let mut state = ThingState::new("t1");
    let limits = Limits::default();
    let decision = thing::decide(
        &state,
        &ThingCommand::Register(RegisterThing {
            mqtt_client_id: None,
            thing_type: None,
            attributes: Default::default(),
        }),
        1_000,
        &limits,
    )
    .expect("register");
    for event in &decision.events {
        thing::apply(&mut state, event);
    }
    state
}

/// Runs `command` on `state` like the actor would (decide, then apply what it decided), and
/// replays the events on a copy: the two must agree.
fn decide_and_apply(state: &mut ThingState, command: &ThingCommand, now_ms: u64) {
    let limits = Limits::default();
    if let Ok(mut decision) = thing::decide(state, command, now_ms, &limits) {
        let before = state.clone();
        // As the actor applies it; the replay below folds `apply` over the events.
        thing::apply_decision(state, &mut decision);
        for event in &decision.events {
            // Every event survives its stored form.
            let envelope = actor_codec::encode_event(event, now_ms).expect("encodes");
            let recorded = RecordedEvent {
                seq: 1,
                envelope: Envelope::from_bytes(&envelope.to_bytes().expect("bytes"))
                    .expect("envelope"),
            };
            assert_eq!(
                &actor_codec::decode_event("t1", &recorded).expect("decodes"),
                event
            );
        }
        let mut replayed = before;
        for event in &decision.events {
            thing::apply(&mut replayed, event);
        }
        assert_eq!(&replayed, state);
    }
}

fn shadow_json(bytes: &[u8]) {
    let limits = Limits::default();
    let mut state = registered();
    if let Ok(body) = parse_json_object(bytes) {
        let _ = client_token_of(body.as_object().unwrap_or(&Map::new()), &limits.shadow);
    }
    // The parser that reads only the parts it needs agrees with the one through a `Value`,
    // errors and their messages included.
    let parsed = ShadowUpdate::parse(bytes, &limits.shadow);
    let through_value =
        parse_json_object(bytes).and_then(|body| ShadowUpdate::from_value(body, &limits.shadow));
    assert_eq!(parsed, through_value);
    let Ok(update) = parsed else {
        return;
    };
    for origin in [Origin::Device, Origin::Operator] {
        let version = state.shadow.version;
        let command = ThingCommand::UpdateShadow {
            update: update.clone(),
            origin,
            want_documents: true,
        };
        decide_and_apply(&mut state, &command, 2_000);
        assert!(state.shadow.version == version || state.shadow.version == version + 1);
        if let Some(document) = state.shadow.document() {
            let _ = document.to_json(Some("token"));
        }
    }
}

#[test]
fn fuzz_shadow_json() {
    let corpus = [
        r#"{"state":{"reported":{"speed":3,"temp":21.5}},"clientToken":"c1","version":0}"#,
        r#"{"state":{"desired":{"speed":5,"schedule":{"on":[6,18]}}}}"#,
        r#"{"state":{"desired":{"speed":null},"reported":null}}"#,
        r#"{"state":{"reported":{"a":{"b":{"c":{"d":{"e":1}}}}}},"version":7}"#,
        r#"{"state":{"desired":{"arr":[1,[2,3],{"x":true}]}},"clientToken":"0123456789"}"#,
        r#"{"state":{"reported":{"a":1}},"state":{"desired":null},"other":[1e400]}"#,
        r#"{"clientToken":7,"state":[{"desired":{}}],"version":-1}"#,
        r#"{"state":{"desired":{"a":1},"desired":"x","reported":{"b":[null]}},"clientToken":"t"}"#,
        r#"["state",{"desired":{}}]"#,
    ];
    fuzz(Target {
        name: "shadow-json",
        corpus: corpus.iter().map(|s| s.as_bytes().to_vec()).collect(),
        json: true,
        run: shadow_json,
    });
}

fn event_json(bytes: &[u8]) {
    let limits = Limits::default();
    let Ok(body) = parse_json_object(bytes) else {
        return;
    };
    let mut state = registered();
    for topic_type in [Some("overheat"), None] {
        if let Ok(event) = IngestEvent::from_json(&body, topic_type, &limits.events) {
            decide_and_apply(&mut state, &ThingCommand::IngestEvent(event), 3_000);
        }
    }
}

#[test]
fn fuzz_event_json() {
    let corpus = [
        r#"{"eventType":"overheat","severity":"warn","data":{"temp":93.5},"timestamp":1700000000000}"#,
        r#"{"eventType":"overheat","severity":"info"}"#,
        r#"{"eventType":"door","severity":"error","data":{"open":true,"at":[1,2]}}"#,
    ];
    fuzz(Target {
        name: "event-json",
        corpus: corpus.iter().map(|s| s.as_bytes().to_vec()).collect(),
        json: true,
        run: event_json,
    });
}

fn command_json(bytes: &[u8]) {
    let limits = Limits::default();
    let Ok(body) = parse_json_object(bytes) else {
        return;
    };
    let mut state = registered();
    // As an operator's send request, then as the device's answer to it.
    if let Ok(send) = SendCommand::from_json(&body, "e1".into(), || "c1".into(), &limits.commands) {
        decide_and_apply(&mut state, &ThingCommand::SendCommand(send), 4_000);
    }
    let pending = SendCommand::from_json(
        &json!({"action":"reboot","ttl":60}),
        "e2".into(),
        || "c2".into(),
        &limits.commands,
    )
    .expect("a valid send");
    decide_and_apply(&mut state, &ThingCommand::SendCommand(pending), 4_000);
    for id in ["e1", "e2", "e/3", ""] {
        if let Ok(response) = CommandResponse::from_json(id, &body, &limits.commands) {
            decide_and_apply(&mut state, &ThingCommand::RespondCommand(response), 5_000);
        }
    }
    decide_and_apply(
        &mut state,
        &ThingCommand::FireDeadlines {
            offline_rules: Vec::new(),
            serving_since_ms: 0,
        },
        10_000_000,
    );
}

#[test]
fn fuzz_command_json() {
    let corpus = [
        r#"{"action":"setSpeed","params":{"value":4},"ttl":30,"commandId":"cmd-1"}"#,
        r#"{"status":"SUCCEEDED","result":{"speed":4}}"#,
        r#"{"status":"FAILED","statusReason":{"reasonCode":"E1","reasonDescription":"jammed"}}"#,
        r#"{"status":"IN_PROGRESS"}"#,
    ];
    fuzz(Target {
        name: "command-json",
        corpus: corpus.iter().map(|s| s.as_bytes().to_vec()).collect(),
        json: true,
        run: command_json,
    });
}

/// The body cut at input-chosen places. Laws: numbers only grow, lines hold no `\n`, no line
/// is longer than the bound, and each entry is a parse away from an answer.
fn ndjson(bytes: &[u8]) {
    let (cut, body) = bytes.split_first().map_or((7, &[][..]), |(c, b)| (*c, b));
    let chunk = usize::from(cut % 32) + 1;
    let mut splitter = LineSplitter::new(256);
    let mut lines = Vec::new();
    for piece in body.chunks(chunk) {
        splitter.push(piece, &mut lines);
    }
    splitter.finish(&mut lines);
    let mut last = 0;
    for line in &lines {
        let number = match line {
            Line::Entry { number, bytes } => {
                assert!(!bytes.contains(&b'\n') && bytes.len() <= 256);
                let _ = parse_line(bytes);
                *number
            }
            Line::TooLong { number } => *number,
        };
        assert!(number > last, "line numbers grow");
        last = number;
    }
    let newlines = body.iter().filter(|&&b| b == b'\n').count() as u64;
    assert!(last <= newlines + 1);
}

#[test]
fn fuzz_ndjson() {
    let corpus = [
        "\x05{\"thingName\":\"a\",\"thingType\":\"meter\"}\n\n{\"thingName\":\"b\",\"password\":\"pw\"}\n",
        "\x01{\"thingName\":\"c\",\"mqttClientId\":\"c-1\",\"attributes\":{\"site\":\"x\"}}",
        "\x20not json\n{}\n{\"thingName\":\"bad name!\"}",
    ];
    fuzz(Target {
        name: "ndjson",
        corpus: corpus.iter().map(|s| s.as_bytes().to_vec()).collect(),
        json: false,
        run: ndjson,
    });
}

/// Stored records as read back from disk: every decoder of the product, on any bytes.
fn envelopes(bytes: &[u8]) {
    let _ = thinghub::users::check_stored_user(bytes);
    let _ = thinghub::auth::check_stored_key(bytes);
    let _ = thinghub::mqtt::acl::check_stored_rule(bytes);
    let _ = actor_codec::decode_index_record("t1", bytes);
    let Ok(envelope) = Envelope::from_bytes(bytes) else {
        return;
    };
    let _ = actor_codec::decode_state("t1", &envelope);
    let recorded = RecordedEvent { seq: 1, envelope };
    if let Ok(event) = actor_codec::decode_event("t1", &recorded) {
        let mut state = registered();
        thing::apply(&mut state, &event);
        let _ = actor_codec::summarize(&event);
    }
}

#[test]
fn fuzz_envelopes() {
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("actors/tests/fixtures");
    let mut corpus: Vec<Vec<u8>> = std::fs::read_dir(&fixtures)
        .expect("golden fixtures")
        .filter_map(Result::ok)
        .filter_map(|e| std::fs::read(e.path()).ok())
        .collect();
    let state = registered();
    corpus.push(
        actor_codec::encode_state(&state, 0)
            .expect("state")
            .to_bytes()
            .expect("bytes"),
    );
    assert!(
        corpus.len() > 10,
        "fixtures found in {}",
        fixtures.display()
    );
    fuzz(Target {
        name: "envelopes",
        corpus,
        json: false,
        run: envelopes,
    });
}

/// SmartREST CSV from a device: any bytes parse or fail with a position; each row decodes into
/// a template's request or an `s/e` error row; rows that parse are written back and parse to
/// the same rows.
fn smartrest(bytes: &[u8]) {
    let text = String::from_utf8_lossy(bytes);
    match smartrest::parse(&text) {
        Ok(rows) => {
            for row in &rows {
                if let Err(e) = thinghub::cumulocity::templates::decode(row) {
                    assert!(matches!(e.code, 40 | 41), "{e:?}");
                    let _ = e.to_row();
                }
            }
            // A field SmartREST cannot carry back (quoted, ending in a backslash) is the
            // codec's one documented gap: the round trip holds for every other message.
            if rows.iter().flatten().any(|f| !smartrest::representable(f)) {
                return;
            }
            let written: Vec<String> = rows.iter().map(|row| smartrest::write_row(row)).collect();
            assert_eq!(
                smartrest::parse(&written.join("\n")).as_ref(),
                Ok(&rows),
                "{text:?} -> {written:?}"
            );
        }
        Err(e) => assert!(e.row >= 1 && e.column >= 1, "{e:?}"),
    }
}

#[test]
fn fuzz_smartrest() {
    let corpus = [
        "100,My Device,c8y_Linux\n101,child-1,Child,c8y_Sensor",
        "200,c8y_Temperature,T,25.3,C\r\n201,S,2026-12-03T10:00:00Z,c8y_T,T,1,C",
        "400,c8y_Event,\"Door, \"\"front\"\"\nopened\"\n500",
        "301,c8y_Overheat,\"\",\n\n\"\"",
        "511,dev,\"execute this\nand \\\"this\\\"\"\n400,t,\"C:\\dir\\\"x\\\"\"",
    ];
    fuzz(Target {
        name: "smartrest",
        corpus: corpus.iter().map(|s| s.as_bytes().to_vec()).collect(),
        json: false,
        run: smartrest,
    });
}
