//! Comparing HTTP answers with the captured ones: status, Content-Type and body, with the
//! rules for answers the capture stored in part (summaries, abbreviated history entries
//! and queue items, unstored bodies, /view files, /system_stats' shape).

use super::compare::Report;
use super::normalize::{norm, norm_history_entry, norm_queue_item, Labels};
use super::replay::Replayed;
use super::script::{route, Script};
use super::Rule;
use crate::support::{HttpFailure, HttpOutcome, HttpReply};
use serde_json::{json, Map, Value};

/// Compares one HTTP answer with the captured one.
pub(super) fn compare_exchange(
    report: &mut Report,
    script: &Script,
    run: &Replayed,
    index: usize,
    outcome: &HttpOutcome,
    cap: &Labels,
    sim: &Labels,
) {
    let request = &script.cap.events[index];
    let (method, path) = route(&request.body);
    let what = format!(
        "{method} {} (event #{index}, t={} ms)",
        request.body["path"].as_str().unwrap_or_default(),
        request.t_ms
    );
    let Some(response) = script.response_to(index) else {
        return;
    };
    let captured = &response.body;
    if captured.get("error").is_some() {
        // The captured server was down: connection refused.
        if !matches!(outcome.result, Err(HttpFailure::Connect(_))) {
            report.mismatch(format!(
                "{what}: the captured server was down (connection refused); the simulator gave {:?}",
                outcome.result
            ));
        }
        return;
    }
    let reply = match &outcome.result {
        Ok(reply) => reply,
        Err(e) => {
            report.mismatch(format!("{what}: the request failed: {e}"));
            return;
        }
    };
    report.check_eq(
        &format!("{what}: status"),
        &captured["status"],
        &json!(reply.status),
    );
    let captured_type = captured["headers"]["Content-Type"].as_str();
    report.check_eq(
        &format!("{what}: Content-Type"),
        &json!(captured_type),
        &json!(reply.header("content-type")),
    );
    let body_bytes = captured["body_bytes"].as_u64().unwrap_or(0);
    match captured.get("json").filter(|j| !j.is_null()) {
        Some(json) => compare_json_body(report, &what, &method, &path, json, reply, cap, sim),
        None if body_bytes == 0 => {
            if !reply.body.is_empty() {
                report.mismatch(format!(
                    "{what}: the capture's body was empty; the simulator sent {:?}",
                    String::from_utf8_lossy(&reply.body)
                ));
            }
        }
        None if captured["text"].is_string() => report.check_eq(
            &format!("{what}: body text"),
            &captured["text"],
            &json!(String::from_utf8_lossy(&reply.body)),
        ),
        None if captured_type.is_some_and(|t| t.starts_with("application/json")) => {
            // Rule::UnstoredJsonBody: an earlier identical request of the same size.
            let earlier = script
                .exchanges
                .iter()
                .filter(|(r, _)| *r < index)
                .rev()
                .find_map(|(r, resp)| {
                    let same = script.cap.events[*r].body["path"] == request.body["path"]
                        && script.cap.events[*r].body["method"] == request.body["method"];
                    let resp = &script.cap.events[(*resp)?].body;
                    (same && resp["body_bytes"] == captured["body_bytes"])
                        .then(|| resp.get("json").cloned())?
                });
            match earlier {
                Some(json) => {
                    report.rule(Rule::UnstoredJsonBody, &what);
                    compare_json_body(report, &what, &method, &path, &json, reply, cap, sim);
                }
                None => {
                    if reply.json().is_none() {
                        report.mismatch(format!("{what}: the body is not JSON"));
                    }
                }
            }
        }
        None => {
            // Rule::ViewFile (the only non-JSON, non-empty, non-text body in the captures).
            report.rule(Rule::ViewFile, &what);
            if reply.body.is_empty() {
                report.mismatch(format!(
                    "{what}: empty body; the capture's had {body_bytes} bytes"
                ));
            }
            let disposition = captured["headers"]["Content-Disposition"].as_str();
            let expected = disposition.map(|d| {
                run.file_map.iter().fold(d.to_string(), |d, (c, s)| {
                    d.replace(&format!("\"{c}\""), &format!("\"{s}\""))
                })
            });
            report.check_eq(
                &format!("{what}: Content-Disposition (file name mapped)"),
                &json!(expected),
                &json!(reply.header("content-disposition")),
            );
            for header in ["Etag", "Last-Modified"] {
                let present = reply.header(header).is_some_and(|v| !v.is_empty());
                if captured["headers"].get(header).is_some() && !present {
                    report.mismatch(format!("{what}: header {header} is missing"));
                }
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
pub(super) fn compare_json_body(
    report: &mut Report,
    what: &str,
    method: &str,
    path: &str,
    captured: &Value,
    reply: &HttpReply,
    cap: &Labels,
    sim: &Labels,
) {
    let Some(answer) = reply.json() else {
        let text = String::from_utf8_lossy(&reply.body);
        let text: String = text.chars().take(300).collect();
        report.mismatch(format!("{what}: the body is not JSON: {text:?}"));
        return;
    };
    let summary_of = |keys: &[&str]| {
        captured
            .as_object()
            .is_some_and(|m| m.len() == keys.len() && keys.iter().all(|k| m.contains_key(*k)))
    };
    match (method, path) {
        ("GET", "/object_info") if summary_of(&["node_count", "present"]) => {
            report.rule(Rule::ObjectInfoSummary, what);
            // The real server had 499 classes; the simulator serves only those it can
            // execute, so the count is not compared: the classes the capture looked for are.
            for (class, present) in captured["present"].as_object().into_iter().flatten() {
                let has = answer.get(class).is_some();
                report.check_eq(
                    &format!("{what}: class {class} present"),
                    present,
                    &json!(has),
                );
            }
        }
        ("GET", "/history") if summary_of(&["entries"]) => {
            report.rule(Rule::HistoryCountSummary, what);
            let entries = answer.as_object().map_or(0, Map::len);
            report.check_eq(
                &format!("{what}: number of entries"),
                &captured["entries"],
                &json!(entries),
            );
        }
        ("GET", "/system_stats") => {
            report.rule(Rule::SystemStatsShape, what);
            report.check_eq(
                &format!("{what}: key structure"),
                &shape(captured),
                &shape(&answer),
            );
            let types = |v: &Value| -> Value {
                v["devices"]
                    .as_array()
                    .map(|d| d.iter().map(|x| x["type"].clone()).collect())
                    .unwrap_or_default()
            };
            let as_gpu = |v: Value| -> Value {
                match v {
                    Value::Array(a) => Value::Array(
                        a.into_iter()
                            .map(|t| if t == "cpu" { json!("cuda") } else { t })
                            .collect(),
                    ),
                    other => other,
                }
            };
            report.check_eq(
                &format!("{what}: device types (cpu in the capture is cuda in the simulator)"),
                &if types(&answer) == types(captured) {
                    types(captured)
                } else {
                    as_gpu(types(captured))
                },
                &types(&answer),
            );
        }
        ("GET", p) if p == "/history" || p.starts_with("/history/") => {
            compare_history(report, what, captured, &answer, cap, sim);
        }
        ("GET", "/queue") => compare_queue(report, what, captured, &answer, cap, sim),
        ("POST", "/prompt") => {
            let accepted = |l: &Labels, v: &Value| {
                let mut n = norm(l, v);
                if let Some(number) = v.get("number") {
                    n["number"] = l.number(number, v["prompt_id"].as_str());
                }
                n
            };
            report.check_eq(
                &format!("{what}: body"),
                &accepted(cap, captured),
                &accepted(sim, &answer),
            );
        }
        _ => report.check_eq(
            &format!("{what}: body"),
            &norm(cap, captured),
            &norm(sim, &answer),
        ),
    }
}

/// Rule::SystemStatsShape: keys at every level, with every scalar replaced. A list of
/// scalars (`argv`) depends on how the server was launched: its length is not structure.
pub(super) fn shape(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(m.iter().map(|(k, x)| (k.clone(), shape(x))).collect()),
        Value::Array(a) if a.iter().any(|x| x.is_object() || x.is_array()) => {
            Value::Array(a.iter().map(shape).collect())
        }
        Value::Array(_) => json!("<list of scalars>"),
        _ => json!("<scalar>"),
    }
}

pub(super) const HISTORY_ENTRY_KEYS: [&str; 4] = ["meta", "outputs", "prompt", "status"];

/// History answers: `{prompt_id: entry}` in insertion order. Entries the capture stored
/// whole are compared whole; abbreviated ones under Rule::AbbreviatedHistoryEntry.
pub(super) fn compare_history(
    report: &mut Report,
    what: &str,
    captured: &Value,
    answer: &Value,
    cap: &Labels,
    sim: &Labels,
) {
    let (Some(c), Some(s)) = (captured.as_object(), answer.as_object()) else {
        report.check_eq(
            &format!("{what}: body"),
            &norm(cap, captured),
            &norm(sim, answer),
        );
        return;
    };
    let c_ids: Vec<Value> = c.keys().map(|k| cap.prompt(k)).collect();
    let s_ids: Vec<Value> = s.keys().map(|k| sim.prompt(k)).collect();
    report.check_eq(
        &format!("{what}: history entries"),
        &json!(c_ids),
        &json!(s_ids),
    );
    for ((c_id, c_entry), (s_id, s_entry)) in c.iter().zip(s) {
        let label = cap.prompt(c_id);
        let full = c_entry
            .as_object()
            .is_some_and(|m| m.len() == 4 && HISTORY_ENTRY_KEYS.iter().all(|k| m.contains_key(*k)));
        if full {
            report.check_eq(
                &format!("{what}: entry {label}"),
                &norm_history_entry(cap, c_entry),
                &norm_history_entry(sim, s_entry),
            );
            continue;
        }
        report.rule(
            Rule::AbbreviatedHistoryEntry,
            &format!("{what}, entry {label}"),
        );
        let s_keys: Vec<&String> = s_entry
            .as_object()
            .map(|m| m.keys().collect())
            .unwrap_or_default();
        let mut sorted_keys: Vec<&str> = s_keys.iter().map(|k| k.as_str()).collect();
        sorted_keys.sort_unstable();
        if sorted_keys != HISTORY_ENTRY_KEYS {
            report.mismatch(format!(
                "{what}: entry {label} has keys {s_keys:?}, not prompt, outputs, status and meta"
            ));
        }
        let item = &s_entry["prompt"];
        for (key, c_value) in c_entry.as_object().into_iter().flatten() {
            let (c_norm, s_norm) = match key.as_str() {
                "prompt[0]" => (
                    cap.number(c_value, Some(c_id)),
                    sim.number(&item[0], Some(s_id)),
                ),
                "prompt[0:2]" => {
                    let head: Vec<Value> = item
                        .as_array()
                        .map(|a| a.iter().take(2).cloned().collect())
                        .unwrap_or_default();
                    (
                        norm_queue_item(cap, c_value),
                        norm_queue_item(sim, &json!(head)),
                    )
                }
                "prompt" => (norm_queue_item(cap, c_value), norm_queue_item(sim, item)),
                other => (norm(cap, c_value), norm(sim, &s_entry[other])),
            };
            report.check_eq(&format!("{what}: entry {label}, {key}"), &c_norm, &s_norm);
        }
    }
}

/// GET /queue: running and pending items, in order. Items the capture cut short are
/// compared on their kept elements (Rule::AbbreviatedQueueItem).
pub(super) fn compare_queue(
    report: &mut Report,
    what: &str,
    captured: &Value,
    answer: &Value,
    cap: &Labels,
    sim: &Labels,
) {
    let mut c_norm = Map::new();
    let mut s_norm = Map::new();
    for key in ["queue_running", "queue_pending"] {
        let c_items = captured[key].as_array().cloned().unwrap_or_default();
        let s_items = answer[key].as_array().cloned().unwrap_or_default();
        let mut c_out = Vec::new();
        let mut s_out = Vec::new();
        for (i, c_item) in c_items.iter().enumerate() {
            let kept = c_item.as_array().map_or(5, Vec::len);
            c_out.push(norm_queue_item(cap, c_item));
            let Some(s_item) = s_items.get(i) else {
                continue;
            };
            if kept < 5 {
                report.rule(Rule::AbbreviatedQueueItem, what);
                let len = s_item.as_array().map_or(0, Vec::len);
                if len != 5 {
                    report.mismatch(format!("{what}: {key}[{i}] has {len} elements, not 5"));
                }
                let head: Vec<Value> = s_item
                    .as_array()
                    .map(|a| a.iter().take(kept).cloned().collect())
                    .unwrap_or_default();
                s_out.push(norm_queue_item(sim, &json!(head)));
            } else {
                s_out.push(norm_queue_item(sim, s_item));
            }
        }
        s_out.extend(
            s_items
                .iter()
                .skip(c_items.len())
                .map(|x| norm_queue_item(sim, x)),
        );
        c_norm.insert(key.to_string(), Value::Array(c_out));
        s_norm.insert(key.to_string(), Value::Array(s_out));
    }
    for (key, v) in answer.as_object().into_iter().flatten() {
        if !c_norm.contains_key(key) {
            s_norm.insert(key.clone(), norm(sim, v));
        }
    }
    report.check_eq(
        &format!("{what}: body"),
        &Value::Object(c_norm),
        &Value::Object(s_norm),
    );
}
