//! ComfyUI's classic output cache: the signature that says two nodes compute the same
//! thing, and the order a prompt runs in, which skips what the cache already holds.

use crate::image::Picture;
use serde_json::{Map, Value};
use std::collections::{HashMap, HashSet};

/// A value flowing along a link.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Data {
    Image(Picture),
    /// LoadAudio's file, passed on as bytes (the simulator does not decode audio).
    Audio(std::sync::Arc<Vec<u8>>),
    Latent {
        width: u32,
        height: u32,
        seed: u64,
    },
    Opaque(&'static str),
}

/// What the output cache keeps for one node signature.
#[derive(Debug, Clone)]
pub(super) struct Cached {
    pub(super) outputs: Vec<Data>,
    /// UI output and meta, for nodes that have them.
    pub(super) ui: Option<(Value, Value)>,
}

pub(super) fn is_always_run(node: &Value) -> bool {
    node.pointer("/inputs/always_run")
        .and_then(Value::as_bool)
        .unwrap_or(false)
}

/// A node's cache signature: class, constant inputs and upstream signatures; a node
/// with `always_run` (IS_CHANGED = NaN) never matches, and neither does anything below it.
pub(super) fn signature(
    prompt: &Map<String, Value>,
    id: &str,
    memo: &mut HashMap<String, String>,
    visiting: &mut HashSet<String>,
) -> String {
    if let Some(s) = memo.get(id) {
        return s.clone();
    }
    if !visiting.insert(id.to_string()) {
        return format!("cycle:{id}");
    }
    let node = &prompt[id];
    let mut parts = vec![node["class_type"].to_string()];
    let mut keys: Vec<(&String, &Value)> = node["inputs"]
        .as_object()
        .map(|m| m.iter().collect())
        .unwrap_or_default();
    keys.sort_by(|a, b| a.0.cmp(b.0));
    for (k, v) in keys {
        let part = match v.as_array() {
            Some(link)
                if link.len() == 2 && link[0].as_str().is_some_and(|f| prompt.contains_key(f)) =>
            {
                let from = link[0].as_str().unwrap_or_default();
                format!(
                    "{k}=<{}>[{}]",
                    signature(prompt, from, memo, visiting),
                    link[1]
                )
            }
            _ => format!("{k}={v}"),
        };
        parts.push(part);
    }
    if is_always_run(node) {
        parts.push(format!("nan:{}", uuid::Uuid::new_v4()));
    }
    let s = parts.join(";");
    visiting.remove(id);
    memo.insert(id.to_string(), s.clone());
    s
}

/// The order nodes execute in: depth first from each output, dependencies first, skipping
/// cached nodes' upstream (a cached node needs nothing below it).
pub(super) fn execution_order(
    prompt: &Map<String, Value>,
    outputs: &[String],
    sigs: &HashMap<String, String>,
    cache: &HashMap<String, Cached>,
) -> Vec<String> {
    fn visit(
        prompt: &Map<String, Value>,
        outputs: &[String],
        id: &str,
        sigs: &HashMap<String, String>,
        cache: &HashMap<String, Cached>,
        seen: &mut HashSet<String>,
        order: &mut Vec<String>,
    ) {
        if !seen.insert(id.to_string()) {
            return;
        }
        let is_cached = sigs.get(id).is_some_and(|s| cache.contains_key(s));
        // ExecutionList never stages a cached dependency; only outputs are always staged
        // (a cached output still sends `executed` with its cached UI output).
        if is_cached && !outputs.contains(&id.to_string()) {
            return;
        }
        if !is_cached {
            if let Some(inputs) = prompt[id]["inputs"].as_object() {
                for v in inputs.values() {
                    if let Some(from) = v.as_array().and_then(|l| l.first()).and_then(Value::as_str)
                    {
                        if prompt.contains_key(from) {
                            visit(prompt, outputs, from, sigs, cache, seen, order);
                        }
                    }
                }
            }
        }
        order.push(id.to_string());
    }
    let mut seen = HashSet::new();
    let mut order = Vec::new();
    let mut outs: Vec<&String> = outputs.iter().collect();
    // ComfyUI stages outputs from a set; take them in prompt order for a stable run.
    outs.sort_by_key(|o| prompt.keys().position(|k| k == *o));
    for o in outs {
        visit(prompt, outputs, o, sigs, cache, &mut seen, &mut order);
    }
    order
}
