//! Replays every capture in ../shared/comfyui-protocol/captures through the parser.

use gantry_comfy::rest::{
    Features, HistoryEntry, HistoryStatus, PromptAccepted, PromptInfo, PromptRejected, Queue,
    SystemStats,
};
use gantry_comfy::ws::{BinaryMessage, ServerMessage};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{json, Value};
use std::path::PathBuf;

fn captures_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/comfyui/captures")
}

pub(crate) fn captures() -> Vec<(String, Value)> {
    let dir = captures_dir();
    let mut out = Vec::new();
    let entries = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("captures folder {} must exist: {e}", dir.display()));
    for entry in entries {
        let path = entry.expect("dir entry").path();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        if !name.ends_with(".json") || name.starts_with('_') {
            continue;
        }
        let text = std::fs::read_to_string(&path).expect("read capture");
        out.push((name, serde_json::from_str(&text).expect("capture is JSON")));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    assert!(
        out.len() >= 18,
        "expected every capture, found {}",
        out.len()
    );
    out
}

pub(crate) fn events(capture: &Value) -> &Vec<Value> {
    capture["events"].as_array().expect("events array")
}

/// Parses `v` as `T` and checks that it serializes back to the same JSON.
fn round_trip<T: DeserializeOwned + Serialize>(what: &str, v: &Value) -> T {
    let typed: T = serde_json::from_value(v.clone())
        .unwrap_or_else(|e| panic!("{what}: does not parse: {e}\n{v:#}"));
    let back = serde_json::to_value(&typed).expect("serialize");
    assert_eq!(&back, v, "{what}: round trip changed the JSON");
    typed
}

#[test]
fn every_text_frame_parses_and_round_trips() {
    let mut n_frames = 0;
    let mut kinds = std::collections::BTreeSet::new();
    for (name, capture) in captures() {
        for ev in events(&capture) {
            if ev["kind"] != "ws_text" || ev["direction"] != "in" {
                continue;
            }
            let body = &ev["body"];
            let msg = ServerMessage::parse(&body.to_string())
                .unwrap_or_else(|e| panic!("{name}: frame does not parse: {e}\n{body}"));
            assert!(
                !matches!(msg, ServerMessage::Unknown { .. }),
                "{name}: a frame type the real server sends must be typed: {body}"
            );
            assert_eq!(
                &msg.to_value(),
                body,
                "{name}: round trip changed the frame"
            );
            kinds.insert(msg.kind().to_string());
            n_frames += 1;
        }
    }
    let expected = [
        "executed",
        "executing",
        "execution_cached",
        "execution_error",
        "execution_interrupted",
        "execution_start",
        "execution_success",
        "feature_flags",
        "progress",
        "progress_state",
        "status",
    ];
    assert_eq!(kinds.into_iter().collect::<Vec<_>>(), expected);
    assert!(n_frames > 500, "only {n_frames} frames read");
}

#[test]
fn unknown_types_and_fields_are_kept() {
    let text = r#"{"type":"executing","data":{"node":"3","display_node":"3","prompt_id":"p","new_field":{"a":[1,2.5]}}}"#;
    let msg = ServerMessage::parse(text).unwrap();
    let ServerMessage::Executing(e) = &msg else {
        panic!("not executing: {msg:?}")
    };
    assert_eq!(e.extra["new_field"], json!({"a": [1, 2.5]}));
    assert_eq!(msg.to_value(), serde_json::from_str::<Value>(text).unwrap());

    let text = r#"{"type":"crystools.monitor","data":{"cpu_utilization":3.5}}"#;
    let msg = ServerMessage::parse(text).unwrap();
    assert_eq!(msg.kind(), "crystools.monitor");
    assert!(matches!(msg, ServerMessage::Unknown { .. }));
    assert_eq!(msg.to_value(), serde_json::from_str::<Value>(text).unwrap());

    // A known type missing a required field is an error that names the type.
    let err = ServerMessage::parse(r#"{"type":"progress","data":{"value":1}}"#).unwrap_err();
    assert!(err.to_string().starts_with("progress message"), "{err}");
    assert!(ServerMessage::parse("{not json").is_err());
    assert!(ServerMessage::parse(r#"{"data":{}}"#).is_err());
}

#[test]
fn end_marker_and_prompt_ids() {
    let end = ServerMessage::parse(r#"{"type":"executing","data":{"node":null,"prompt_id":"p1"}}"#)
        .unwrap();
    assert!(end.is_end_marker());
    assert_eq!(end.prompt_id(), Some("p1"));
    let late = ServerMessage::parse(r#"{"type":"executing","data":{"node":"2"}}"#).unwrap();
    assert!(!late.is_end_marker());
    assert_eq!(late.prompt_id(), None);
}

#[test]
fn every_json_answer_parses_into_its_shape() {
    let mut n = 0;
    for (name, capture) in captures() {
        let evs = events(&capture);
        let mut last_request: Option<&Value> = None;
        for ev in evs {
            match ev["kind"].as_str() {
                Some("http_request") => last_request = Some(&ev["body"]),
                Some("http_response") => {
                    let req = last_request.take().expect("response follows a request");
                    let body = &ev["body"];
                    let Some(json) = body.get("json").filter(|j| !j.is_null()) else {
                        continue;
                    };
                    let method = req["method"].as_str().unwrap();
                    let path = req["path"].as_str().unwrap().trim_start_matches("/api");
                    let status = body["status"].as_u64().unwrap();
                    let what = format!("{name}: {method} {path} -> {status}");
                    // Captures keep a summary instead of two very large bodies.
                    if json.get("node_count").is_some() || json.get("entries").is_some() {
                        continue;
                    }
                    match (method, path, status) {
                        ("POST", "/prompt", 200) => {
                            round_trip::<PromptAccepted>(&what, json);
                        }
                        ("POST", "/prompt", 400) => {
                            round_trip::<PromptRejected>(&what, json);
                        }
                        ("GET", "/prompt", 200) => {
                            round_trip::<PromptInfo>(&what, json);
                        }
                        ("GET", "/queue", 200) if is_abbreviated_queue(json) => {
                            // The capture tool kept only [number, prompt_id] of each item.
                            let q: Queue = serde_json::from_value(json.clone()).expect(&what);
                            assert!(!q.queue_running.is_empty() || !q.queue_pending.is_empty());
                        }
                        ("GET", "/queue", 200) => {
                            round_trip::<Queue>(&what, json);
                        }
                        ("GET", p, 200) if p.starts_with("/history") => {
                            for (id, entry) in json.as_object().unwrap() {
                                if entry.get("prompt").is_some() {
                                    round_trip::<HistoryEntry>(&what, entry);
                                } else {
                                    // The capture tool dropped the large `prompt` of some
                                    // entries; what it kept must still parse.
                                    round_trip::<HistoryStatus>(
                                        &format!("{what} {id}"),
                                        &entry["status"],
                                    );
                                }
                            }
                        }
                        ("GET", "/system_stats", 200) => {
                            round_trip::<SystemStats>(&what, json);
                        }
                        ("GET", "/features", 200) => {
                            round_trip::<Features>(&what, json);
                        }
                        ("GET", p, 200) if p.starts_with("/object_info") => {
                            round_trip::<gantry_comfy::rest::ObjectInfo>(&what, json);
                        }
                        _ => panic!("{what}: no shape for this answer: {json}"),
                    }
                    n += 1;
                }
                _ => {}
            }
        }
    }
    assert!(n > 60, "only {n} answers read");
}

fn is_abbreviated_queue(json: &Value) -> bool {
    ["queue_running", "queue_pending"].iter().any(|k| {
        json[k].as_array().is_some_and(|items| {
            items
                .iter()
                .any(|i| i.as_array().is_some_and(|a| a.len() < 5))
        })
    })
}

#[test]
fn history_outcomes_follow_status_and_messages() {
    use gantry_comfy::rest::Outcome;
    let mut seen = std::collections::BTreeMap::new();
    for (name, capture) in captures() {
        for ev in events(&capture) {
            let Some(json) = ev["body"].get("json") else {
                continue;
            };
            let Some(map) = json.as_object() else {
                continue;
            };
            for (id, entry) in map {
                let Some(status) = entry.get("status") else {
                    continue;
                };
                let Ok(status) = serde_json::from_value::<HistoryStatus>(status.clone()) else {
                    continue;
                };
                seen.insert(format!("{name}/{id}"), Outcome::of(&status));
            }
        }
    }
    let of = |prefix: &str| {
        seen.iter()
            .filter(|(k, _)| k.starts_with(prefix))
            .map(|(_, v)| *v)
            .collect::<Vec<_>>()
    };
    assert!(of("a_normal_run").iter().all(|o| *o == Outcome::Success));
    assert!(of("c_execution_error").contains(&Outcome::Error));
    assert!(of("d_interrupt_targeted").contains(&Outcome::Interrupted));
    assert!(of("d3_interrupt_unresponsive").contains(&Outcome::Interrupted));
}

#[test]
fn binary_frames_round_trip() {
    let jpeg = bytes::Bytes::from_static(&[0xff, 0xd8, 0xff, 0xe0, 1, 2, 3]);
    let cases = vec![
        BinaryMessage::PreviewImage {
            format: 1,
            image: jpeg.clone(),
        },
        BinaryMessage::Text {
            node_id: "12".into(),
            text: "step 3/20".into(),
        },
        BinaryMessage::PreviewImageWithMetadata {
            metadata: json!({"node_id": "2", "prompt_id": "p", "display_node_id": "2",
                "parent_node_id": null, "real_node_id": "2", "image_type": "image/jpeg"}),
            image: jpeg.clone(),
        },
        BinaryMessage::Unknown {
            event_type: 9,
            payload: jpeg.clone(),
        },
    ];
    for m in cases {
        let wire = m.encode();
        assert_eq!(
            u32::from_be_bytes(wire[..4].try_into().unwrap()),
            m.event_type()
        );
        assert_eq!(BinaryMessage::parse(&wire).unwrap(), m);
    }
    // A type-4 frame names its prompt; a truncated one is kept as Unknown, not dropped.
    let m = BinaryMessage::parse(&[0, 0, 0, 4, 0, 0, 0, 99, b'{']).unwrap();
    assert!(matches!(m, BinaryMessage::Unknown { event_type: 4, .. }));
    assert!(BinaryMessage::parse(&[0, 0]).is_err());
}
