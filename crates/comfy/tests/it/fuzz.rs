//! Property tests of everything gantry reads from a ComfyUI server: WebSocket text and
//! binary frames, and the JSON answers of `/prompt`, `/queue`, `/history`,
//! `/object_info` and `/system_stats`. Inputs are arbitrary bytes and JSON, and
//! mutations of the frames and answers a real server sent (the captures). Whatever
//! comes, a parser answers a value or an error and never panics; what parses reads back
//! the same after a round trip. `PROPTEST_CASES` asks for more cases.

use crate::captures::{captures, events};
use gantry_comfy::rest::{
    HistoryEntry, ObjectInfo, PromptAccepted, PromptRejected, Queue, SystemStats,
};
use gantry_comfy::ws::{BinaryMessage, ServerMessage};
use proptest::prelude::*;
use serde_json::{json, Map, Value};
use std::sync::OnceLock;

/// A fixed seed (another with `PROPTEST_RNG_SEED`), so that a run is the same on every
/// machine; a failing case is kept as a plain test rather than in a regressions file.
fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        rng_seed: proptest::test_runner::RngSeed::Fixed(24),
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Any JSON value, with odd numbers, unicode strings and some nesting.
fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        "\\PC{0,10}".prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 32, 5, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            prop::collection::vec(("\\PC{0,6}", inner), 0..5)
                .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

/// Every text frame and every JSON answer of the captures, read once.
struct Captured {
    frames: Vec<Value>,
    /// (request path without `/api`, answer JSON) of each 200 or 400 answer.
    answers: Vec<(String, Value)>,
}

fn captured() -> &'static Captured {
    static CAPTURED: OnceLock<Captured> = OnceLock::new();
    CAPTURED.get_or_init(|| {
        let mut frames = Vec::new();
        let mut answers = Vec::new();
        for (_, capture) in captures() {
            let mut path = String::new();
            for ev in events(&capture) {
                match (ev["kind"].as_str(), ev["direction"].as_str()) {
                    (Some("ws_text"), Some("in")) => frames.push(ev["body"].clone()),
                    (Some("http_request"), _) => {
                        let p = ev["body"]["path"].as_str().unwrap_or_default();
                        path = p.trim_start_matches("/api").to_owned();
                    }
                    (Some("http_response"), _) => {
                        if let Some(j) = ev["body"].get("json").filter(|j| !j.is_null()) {
                            answers.push((path.clone(), j.clone()));
                        }
                    }
                    _ => {}
                }
            }
        }
        assert!(
            frames.len() > 500 && answers.len() > 60,
            "the captures are read"
        );
        Captured { frames, answers }
    })
}

/// Replaces one value somewhere inside `v` (picked by `at`) with `junk`, or removes it
/// from its object or array when `remove`.
fn mutate(v: &mut Value, at: usize, junk: Value, remove: bool) {
    // Every path into `v`, to pick one.
    fn paths(v: &Value, here: &mut Vec<Key>, out: &mut Vec<Vec<Key>>) {
        out.push(here.clone());
        match v {
            Value::Object(m) => {
                for (k, child) in m {
                    here.push(Key::Field(k.clone()));
                    paths(child, here, out);
                    here.pop();
                }
            }
            Value::Array(a) => {
                for (i, child) in a.iter().enumerate() {
                    here.push(Key::Item(i));
                    paths(child, here, out);
                    here.pop();
                }
            }
            _ => {}
        }
    }
    let mut all = Vec::new();
    paths(v, &mut Vec::new(), &mut all);
    let path = &all[at % all.len()];
    let Some((last, parent)) = path.split_last() else {
        *v = junk;
        return;
    };
    let mut node = v;
    for k in parent {
        node = match (k, node) {
            (Key::Field(f), Value::Object(m)) => &mut m[f],
            (Key::Item(i), Value::Array(a)) => &mut a[*i],
            _ => return,
        };
    }
    match (last, node) {
        (Key::Field(f), Value::Object(m)) if remove => {
            m.remove(f);
        }
        (Key::Field(f), Value::Object(m)) => {
            m.insert(f.clone(), junk);
        }
        (Key::Item(i), Value::Array(a)) if remove => {
            a.remove(*i);
        }
        (Key::Item(i), Value::Array(a)) => a[*i] = junk,
        _ => {}
    }
}

#[derive(Clone)]
enum Key {
    Field(String),
    Item(usize),
}

/// A text frame: the message it parses to reads back the same from its own text.
fn check_text(text: &str) -> Result<(), TestCaseError> {
    match ServerMessage::parse(text) {
        Ok(msg) => {
            let again = ServerMessage::parse(&msg.to_text());
            prop_assert_eq!(again.ok(), Some(msg.clone()), "{}", text);
            // The accessors the driver uses take any parsed message.
            let _ = (msg.prompt_id(), msg.is_end_marker(), msg.kind());
        }
        Err(e) => prop_assert!(!e.to_string().is_empty()),
    }
    Ok(())
}

/// An answer read as every shape gantry reads answers as; what parses round-trips, and
/// the helpers the driver calls on it take it.
fn check_answer(json: &Value) -> Result<(), TestCaseError> {
    fn again<T: serde::de::DeserializeOwned + serde::Serialize + PartialEq + std::fmt::Debug>(
        v: &Value,
    ) -> Result<Option<T>, TestCaseError> {
        let Ok(typed) = serde_json::from_value::<T>(v.clone()) else {
            return Ok(None);
        };
        let back: T = serde_json::from_value(serde_json::to_value(&typed).map_err(|e| {
            TestCaseError::fail(format!("a parsed answer does not serialize: {e}"))
        })?)
        .map_err(|e| TestCaseError::fail(format!("a serialized answer does not parse: {e}")))?;
        prop_assert_eq!(&back, &typed);
        Ok(Some(typed))
    }
    again::<PromptAccepted>(json)?;
    again::<PromptRejected>(json)?;
    if let Some(q) = again::<Queue>(json)? {
        for item in q.queue_running.iter().chain(&q.queue_pending) {
            let _ = item.client_id();
        }
    }
    // `/history` answers a map of entries; `/history/{id}` one of them, or none.
    if let Some(entries) = json.as_object() {
        for entry in entries.values() {
            if let Some(h) = again::<HistoryEntry>(entry)? {
                let _ = (h.outcome(), h.files());
            }
        }
    }
    again::<ObjectInfo>(json)?;
    again::<SystemStats>(json)?;
    Ok(())
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn any_text_is_a_message_or_an_error(text in "\\PC{0,64}") {
        check_text(&text)?;
    }

    #[test]
    fn any_json_frame_is_a_message_or_an_error(kind in prop_oneof![
        Just("status"), Just("executing"), Just("executed"), Just("progress"),
        Just("progress_state"), Just("execution_start"), Just("execution_cached"),
        Just("execution_success"), Just("execution_error"), Just("execution_interrupted"),
        Just("feature_flags"), Just("crystools.monitor"),
    ], data in any_json()) {
        check_text(&json!({"type": kind, "data": data}).to_string())?;
    }

    #[test]
    fn mutated_real_frames_are_messages_or_errors(
        pick in any::<prop::sample::Index>(),
        at in any::<usize>(),
        junk in any_json(),
        remove in any::<bool>(),
        cut in any::<prop::sample::Index>(),
    ) {
        let frames = &captured().frames;
        let mut frame = pick.get(frames).clone();
        mutate(&mut frame, at, junk, remove);
        let text = frame.to_string();
        check_text(&text)?;
        // The same frame cut short, as a dropped connection would leave it.
        let end = cut.index(text.len() + 1);
        if let Some(part) = text.get(..end) {
            check_text(part)?;
        }
    }

    #[test]
    fn any_bytes_are_a_binary_message_or_an_error(frame in prop::collection::vec(any::<u8>(), 0..64)) {
        check_binary(&frame)?;
    }

    #[test]
    fn binary_frames_shaped_like_real_ones_parse_whole(
        kind in prop::sample::select(vec![1u32, 2, 3, 4, 5, u32::MAX]),
        head in any::<u32>(),
        meta in prop_oneof![Just(None), any_json().prop_map(Some)],
        body in prop::collection::vec(any::<u8>(), 0..32),
        lie in prop_oneof![Just(0i64), -3i64..3, Just(i64::from(u32::MAX))],
    ) {
        // Type 4 as the captures show it (the metadata of a real preview), or junk.
        let metadata = meta.unwrap_or_else(|| json!({"node_id": "2", "prompt_id": "123ab190-3611-4728-8148-98dd722f4c9f",
            "display_node_id": "2", "parent_node_id": null, "real_node_id": "2", "image_type": "image/jpeg"}));
        let mut frame = kind.to_be_bytes().to_vec();
        match kind {
            3 | 4 => {
                let inner = if kind == 4 { metadata.to_string().into_bytes() } else { body.clone() };
                // A length prefix that is right, a little off, or absurd.
                let len = (inner.len() as i64 + lie).clamp(0, i64::from(u32::MAX)) as u32;
                frame.extend_from_slice(&len.to_be_bytes());
                frame.extend_from_slice(&inner);
                frame.extend_from_slice(&body);
            }
            _ => {
                frame.extend_from_slice(&head.to_be_bytes());
                frame.extend_from_slice(&body);
            }
        }
        check_binary(&frame)?;
    }

    #[test]
    fn any_json_answer_is_a_shape_or_an_error(json in any_json()) {
        check_answer(&json)?;
    }

    #[test]
    fn mutated_real_answers_are_shapes_or_errors(
        pick in any::<prop::sample::Index>(),
        at in any::<usize>(),
        junk in any_json(),
        remove in any::<bool>(),
    ) {
        let (path, answer) = pick.get(&captured().answers);
        let mut answer = answer.clone();
        mutate(&mut answer, at, junk, remove);
        check_answer(&answer).map_err(|e| TestCaseError::fail(format!("{path}: {e}")))?;
    }
}

/// A binary frame: only one shorter than its 4-byte type is an error, and what parses
/// encodes to a frame that parses the same.
fn check_binary(frame: &[u8]) -> Result<(), TestCaseError> {
    match BinaryMessage::parse(frame) {
        Ok(m) => {
            prop_assert!(frame.len() >= 4);
            prop_assert_eq!(BinaryMessage::parse(&m.encode()).ok(), Some(m.clone()));
            let _ = m.prompt_id();
        }
        Err(e) => {
            prop_assert!(frame.len() < 4, "{}", e);
            prop_assert!(!e.to_string().is_empty());
        }
    }
    Ok(())
}

#[test]
fn a_mutation_reaches_nested_values() {
    let mut v = json!({"a": {"b": [1, 2]}});
    let n_paths = 5; // root, a, a.b, a.b[0], a.b[1]
    let mut changed = Map::new();
    for at in 0..n_paths {
        let mut m = v.clone();
        mutate(&mut m, at, json!("x"), false);
        changed.insert(at.to_string(), m);
    }
    assert_eq!(changed["0"], json!("x"));
    assert_eq!(changed["4"], json!({"a": {"b": [1, "x"]}}));
    mutate(&mut v, 2, Value::Null, true);
    assert_eq!(v, json!({"a": {}}));
}

/// Found by the properties above: without serde_json's `float_roundtrip`, a number such
/// as this one read back one unit in the last place off, so a frame kept as `extra`
/// (or `Unknown`) was not sent on as it came.
#[test]
fn a_float_reads_back_exactly() {
    for text in [
        r#"{"type":"executing","data":{"node":null,"":[5.0801492000177235e-200]}}"#,
        r#"{"type":"crystools.monitor","data":[6.597051059611958e-212]}"#,
    ] {
        let msg = ServerMessage::parse(text).unwrap();
        assert_eq!(msg.to_text(), text);
    }
}
