//! Normalization: run-specific values (prompt, client and file ids, timestamps, queue
//! numbers) become labels both sides share, frames become comparable JSON, and each frame
//! is attributed to the prompt it belongs to.

use super::{Rule, EARLIER_NUMBER, REPR_LIST, SERVER_MADE_ID, STRING_LIST, TIMESTAMP};
use crate::support::{Event, FrameBody};
use serde_json::{json, Value};
use std::cell::RefCell;
use std::collections::{BTreeSet, HashMap, HashSet};

/// What replaces run-specific values on one side (capture or simulator).
#[derive(Default)]
pub(super) struct Labels {
    /// Raw prompt id -> `P1`, `P2`... (the same label on both sides for mapped ids).
    pub(super) prompts: HashMap<String, String>,
    /// Raw ids of prompts re-created before the replay.
    pub(super) earlier: HashSet<String>,
    /// The first queue number the scenario's own prompts got.
    pub(super) number_base: Option<i64>,
    /// Client ids the client chose -> `C1`, `C2`... (identical strings on both sides).
    pub(super) clients: HashMap<String, String>,
    /// Raw output file name -> `prefix_<Fn>_.png`, numbered in the order normalization
    /// meets them. Both sides are normalized in the same order (sockets, then answers), and
    /// only the parts that are compared get normalized, so a file the capture abbreviated
    /// away (h3's history) does not shift the numbers.
    pub(super) files: RefCell<HashMap<String, String>>,
    /// The rules normalization needed, for the report.
    pub(super) used: RefCell<BTreeSet<Rule>>,
}

impl Labels {
    pub(super) fn used(&self, rule: Rule) {
        self.used.borrow_mut().insert(rule);
    }

    pub(super) fn prompt(&self, raw: &str) -> Value {
        match self.prompts.get(raw) {
            Some(label) => json!(label),
            None => json!(format!("<unknown prompt id {raw}>")),
        }
    }

    pub(super) fn client(&self, raw: &str) -> Value {
        if let Some(label) = self.clients.get(raw) {
            return json!(label);
        }
        // A socket connected without clientId gets uuid4().hex from the server.
        if raw.len() == 32
            && raw
                .chars()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
        {
            json!(SERVER_MADE_ID)
        } else {
            json!(format!(
                "<server-made id not shaped like uuid4().hex: {raw}>"
            ))
        }
    }

    pub(super) fn file(&self, raw: &str) -> Value {
        let mut files = self.files.borrow_mut();
        let n = files.len() + 1;
        let label = files
            .entry(raw.to_string())
            .or_insert_with(|| file_label(raw, n));
        json!(label)
    }

    /// A queue number, relative to the scenario's first one. `front: true` numbers are
    /// negative (`-counter`), so they stay negative: -(|n| - base).
    pub(super) fn number(&self, n: &Value, raw_id: Option<&str>) -> Value {
        let Some(n) = n.as_i64() else {
            return json!(format!("<queue number that is not an integer: {n}>"));
        };
        if raw_id.is_some_and(|id| self.earlier.contains(id)) {
            self.used(Rule::EarlierPromptNumber);
            let below_base = self.number_base.is_none_or(|base| n < base);
            return if n >= 0 && below_base {
                json!(EARLIER_NUMBER)
            } else {
                json!(format!("<number {n} for an earlier prompt>"))
            };
        }
        match self.number_base {
            None => json!(n),
            Some(base) if n >= 0 => json!(n - base),
            Some(base) => json!(-(-n - base)),
        }
    }
}

/// `gantry_normal_00019_.png` -> `gantry_normal_<F3>_.png`; PreviewImage's
/// `ComfyUI_temp_abcde_00001_.png` -> `ComfyUI_temp_<rand>_<F4>_.png`.
pub(super) fn file_label(raw: &str, n: usize) -> String {
    let parsed = raw.rsplit_once('.').and_then(|(stem, ext)| {
        let (prefix, counter) = stem.strip_suffix('_')?.rsplit_once('_')?;
        if counter.is_empty() || !counter.chars().all(|c| c.is_ascii_digit()) {
            return None;
        }
        let prefix = match prefix.rsplit_once('_') {
            Some((head, rand))
                if head.ends_with("_temp")
                    && rand.len() == 5
                    && rand.chars().all(|c| c.is_ascii_lowercase()) =>
            {
                format!("{head}_<rand>")
            }
            _ => prefix.to_string(),
        };
        Some(format!("{prefix}_<F{n}>_.{ext}"))
    });
    parsed.unwrap_or_else(|| format!("<F{n}: not named like ComfyUI's files: {raw}>"))
}

/// Normalizes a frame or body: prompt, client and file ids become labels, timestamps a
/// placeholder; numbers keep their JSON type (1.0 and 1 stay different).
pub(super) fn norm(l: &Labels, v: &Value) -> Value {
    norm_at(l, None, v)
}

pub(super) fn norm_at(l: &Labels, key: Option<&str>, v: &Value) -> Value {
    match (key, v) {
        (Some("prompt_id"), Value::String(s)) => l.prompt(s),
        (Some("sid" | "client_id"), Value::String(s)) => l.client(s),
        (Some("filename"), Value::String(s)) => l.file(s),
        (Some("timestamp"), v) if v.is_u64() || v.is_i64() => json!(TIMESTAMP),
        (Some("timestamp"), v) => json!(format!("<timestamp that is not an integer: {v}>")),
        (Some("traceback"), Value::Array(a)) if a.iter().all(Value::is_string) => {
            l.used(Rule::TracebackText);
            json!(STRING_LIST)
        }
        (Some("current_inputs"), Value::Object(m)) => {
            l.used(Rule::TracebackText);
            let reprs = m.iter().map(|(k, x)| {
                let x = if x.is_array() {
                    json!(REPR_LIST)
                } else {
                    x.clone()
                };
                (k.clone(), x)
            });
            Value::Object(reprs.collect())
        }
        (Some("current_outputs" | "executed"), Value::Array(a)) => sorted(l, a),
        (_, Value::String(s)) if l.prompts.contains_key(s) => l.prompt(s),
        (_, Value::String(s)) if l.clients.contains_key(s) => l.client(s),
        (_, Value::Object(m)) => Value::Object(
            m.iter()
                .map(|(k, x)| (k.clone(), norm_at(l, Some(k), x)))
                .collect(),
        ),
        (_, Value::Array(a)) => Value::Array(a.iter().map(|x| norm(l, x)).collect()),
        (_, other) => other.clone(),
    }
}

/// Rule::PythonSetOrder.
pub(super) fn sorted(l: &Labels, a: &[Value]) -> Value {
    l.used(Rule::PythonSetOrder);
    let mut items: Vec<Value> = a.iter().map(|x| norm(l, x)).collect();
    items.sort_by_key(|x| x.to_string());
    Value::Array(items)
}

/// A queue item `[number, prompt_id, graph, extra_data, outputs_to_execute]` (or the first
/// elements of one). The graph is compared as submitted.
pub(super) fn norm_queue_item(l: &Labels, item: &Value) -> Value {
    let Some(a) = item.as_array() else {
        return norm(l, item);
    };
    let raw_id = a.get(1).and_then(Value::as_str);
    let out = a.iter().enumerate().map(|(i, x)| match (i, x) {
        (0, n) => l.number(n, raw_id),
        (1, Value::String(id)) => l.prompt(id),
        (2, graph) => graph.clone(),
        (4, Value::Array(outputs)) => sorted(l, outputs),
        (_, x) => norm(l, x),
    });
    Value::Array(out.collect())
}

pub(super) fn norm_history_entry(l: &Labels, entry: &Value) -> Value {
    let Some(m) = entry.as_object() else {
        return norm(l, entry);
    };
    let out = m.iter().map(|(k, x)| {
        let x = if k == "prompt" {
            norm_queue_item(l, x)
        } else {
            norm(l, x)
        };
        (k.clone(), x)
    });
    Value::Object(out.collect())
}

/// A WebSocket frame in comparable form.
pub(super) enum RawFrame {
    Text(Value),
    BadText(String),
    Binary {
        event_type: Option<u32>,
        metadata: Option<Value>,
    },
}

impl RawFrame {
    pub(super) fn of_capture(ev: &Event) -> RawFrame {
        if ev.kind == "ws_binary" {
            RawFrame::Binary {
                event_type: ev.body["event_type"].as_u64().map(|t| t as u32),
                metadata: ev.body.get("metadata").cloned(),
            }
        } else {
            RawFrame::Text(ev.body.clone())
        }
    }

    /// Binary frames: a big-endian u32 event type; type 4 continues with a u32 length and
    /// that much metadata JSON. The image bytes are not compared.
    pub(super) fn of_sim(body: &FrameBody) -> RawFrame {
        match body {
            FrameBody::Text(v) => RawFrame::Text(v.clone()),
            FrameBody::BadText(t) => RawFrame::BadText(t.clone()),
            FrameBody::Binary(bytes) => {
                let u32_at = |i: usize| {
                    bytes
                        .get(i..i + 4)
                        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
                };
                let event_type = u32_at(0);
                let metadata = (event_type == Some(4))
                    .then(|| {
                        let len = u32_at(4)? as usize;
                        let raw = bytes.get(8..8 + len)?;
                        Some(
                            serde_json::from_slice(raw)
                                .unwrap_or_else(|_| json!("<metadata that is not JSON>")),
                        )
                    })
                    .flatten();
                RawFrame::Binary {
                    event_type,
                    metadata,
                }
            }
        }
    }

    pub(super) fn normalized(&self, l: &Labels) -> Value {
        match self {
            RawFrame::Text(v) => norm(l, v),
            RawFrame::BadText(t) => json!({ "text frame that is not JSON": t }),
            RawFrame::Binary {
                event_type,
                metadata,
            } => {
                let mut v = json!({ "binary": event_type });
                if let Some(m) = metadata {
                    v["metadata"] = norm(l, m);
                }
                v
            }
        }
    }
}

/// A normalized frame and the prompt it belongs to.
#[derive(Clone)]
pub(super) struct NFrame {
    pub(super) v: Value,
    pub(super) prompt: Option<String>,
}

pub(super) fn frame_type(v: &Value) -> &str {
    match v.get("type").and_then(Value::as_str) {
        Some(t) => t,
        None if v.get("binary").is_some() => "<binary>",
        None => "<?>",
    }
}

/// A frame belongs to the prompt named by its `prompt_id` (or its type-4 metadata's).
/// Binary previews without metadata and the late-join `executing` without prompt_id belong
/// to the last prompt seen on the socket, or, before any, to the next one.
pub(super) fn attribute(frames: Vec<Value>) -> Vec<NFrame> {
    let named = |v: &Value| {
        v["data"]["prompt_id"]
            .as_str()
            .or_else(|| v["metadata"]["prompt_id"].as_str())
            .map(str::to_string)
    };
    let mut out: Vec<NFrame> = frames
        .into_iter()
        .map(|v| NFrame {
            prompt: named(&v),
            v,
        })
        .collect();
    let follows_prompt =
        |f: &NFrame| f.prompt.is_none() && matches!(frame_type(&f.v), "<binary>" | "executing");
    let mut last: Option<String> = None;
    for i in 0..out.len() {
        if out[i].prompt.is_some() {
            last = out[i].prompt.clone();
        } else if follows_prompt(&out[i]) {
            let next = || out[i..].iter().find_map(|f| f.prompt.clone());
            out[i].prompt = last.clone().or_else(next);
        }
    }
    out
}
