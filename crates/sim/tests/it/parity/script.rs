//! The capture, digested for replaying: its HTTP exchanges paired up, the prompts it got
//! accepted, its sockets, and what each socket had received at any point of the script.

use super::SPEED;
use crate::support::{Capture, Event};
use serde_json::Value;
use std::time::Duration;

pub(super) struct Script {
    pub(super) cap: Capture,
    /// Each HTTP request's event index with its response's. Every capture's client waits
    /// for an answer before doing anything else, so they pair up in order.
    pub(super) exchanges: Vec<(usize, Option<usize>)>,
}

impl Script {
    pub(super) fn new(cap: Capture) -> Script {
        let mut exchanges = Vec::new();
        for (i, ev) in cap.events.iter().enumerate() {
            if ev.is("out", "http_request") {
                let response = cap.events[i + 1..]
                    .iter()
                    .position(|e| e.is("in", "http_response"))
                    .map(|p| i + 1 + p);
                exchanges.push((i, response));
            }
        }
        Script { cap, exchanges }
    }

    pub(super) fn name(&self) -> &str {
        &self.cap.scenario
    }

    pub(super) fn response_to(&self, request: usize) -> Option<&Event> {
        let (_, response) = self.exchanges.iter().find(|(r, _)| *r == request)?;
        response.map(|i| &self.cap.events[i])
    }

    /// Prompts the captured server accepted, in order: (request event index, prompt id).
    pub(super) fn accepted_prompts(&self) -> Vec<(usize, String)> {
        let mut out = Vec::new();
        for &(request, _) in &self.exchanges {
            let req = &self.cap.events[request].body;
            if !is_post_prompt(req) {
                continue;
            }
            let Some(resp) = self.response_to(request) else {
                continue;
            };
            if let Some(id) = resp.body["json"]["prompt_id"].as_str() {
                out.push((request, id.to_string()));
            }
        }
        out
    }

    /// Sockets in the order the capture opened them.
    pub(super) fn socket_names(&self) -> Vec<String> {
        let mut names: Vec<String> = Vec::new();
        for ev in &self.cap.events {
            if let Some(ws) = &ev.ws {
                if !names.contains(ws) {
                    names.push(ws.clone());
                }
            }
        }
        names
    }

    /// Frames socket `ws` had received before event `index`.
    pub(super) fn frames_before(&self, ws: &str, index: usize) -> usize {
        self.cap.events[..index.min(self.cap.events.len())]
            .iter()
            .filter(|e| e.is_received_frame() && e.ws.as_deref() == Some(ws))
            .count()
    }

    /// The socket was opened while a prompt of its client was running: its first frame
    /// after the connect `status` is the late-join `executing` without prompt_id (j).
    pub(super) fn joins_late(&self, ws: &str) -> bool {
        self.cap
            .events
            .iter()
            .filter(|e| e.is_received_frame() && e.ws.as_deref() == Some(ws))
            .find(|e| e.body["type"] != "status")
            .is_some_and(|e| {
                e.body["type"] == "executing" && e.body["data"].get("prompt_id").is_none()
            })
    }

    /// `execution_cached.nodes` of a prompt, from its frames or else its history entry.
    pub(super) fn cached_nodes_of(&self, prompt_id: &str) -> Option<Vec<String>> {
        let from_frames = self.cap.events.iter().find(|e| {
            e.is("in", "ws_text")
                && e.body["type"] == "execution_cached"
                && e.body["data"]["prompt_id"] == prompt_id
        });
        let nodes = match from_frames {
            Some(e) => e.body["data"]["nodes"].clone(),
            None => self
                .cap
                .events
                .iter()
                .filter(|e| e.is("in", "http_response"))
                .filter_map(|e| e.body["json"].get(prompt_id))
                .filter_map(|entry| entry["status"]["messages"].as_array())
                .flatten()
                .find(|m| m[0] == "execution_cached")
                .map(|m| m[1]["nodes"].clone())?,
        };
        Some(strings(&nodes))
    }

    /// Every client id the capture's client chose (in socket URLs, in bodies, and in the
    /// history entries of earlier prompts), in order of appearance.
    pub(super) fn client_ids(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        let mut add = |id: &str| {
            if !out.iter().any(|o| o == id) {
                out.push(id.to_string());
            }
        };
        for ev in &self.cap.events {
            if ev.is("out", "ws_connect") {
                let url = ev.body["url"].as_str().unwrap_or_default();
                if let Some(id) = url.split("clientId=").nth(1) {
                    add(id.split('&').next().unwrap_or(id));
                }
            }
            let mut found = Vec::new();
            collect_key(&ev.body, "client_id", &mut found);
            for id in found {
                add(&id);
            }
        }
        out
    }
}

/// A captured `POST /prompt` (or `/api/prompt`) request.
pub(super) fn is_post_prompt(request: &Value) -> bool {
    let (method, path) = route(request);
    method == "POST" && path == "/prompt"
}

/// Method and path of a captured request, without the query and the `/api` prefix.
pub(super) fn route(request: &Value) -> (String, String) {
    let method = request["method"].as_str().unwrap_or("GET").to_string();
    let path = request["path"].as_str().unwrap_or("/");
    let path = path.split('?').next().unwrap_or(path);
    let path = path
        .strip_prefix("/api")
        .filter(|p| p.starts_with('/'))
        .unwrap_or(path);
    (method, path.to_string())
}

pub(super) fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

/// Every string value under key `key`, anywhere in `v`.
pub(super) fn collect_key(v: &Value, key: &str, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                match x {
                    Value::String(s) if k == key => out.push(s.clone()),
                    _ => collect_key(x, key, out),
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|x| collect_key(x, key, out)),
        _ => {}
    }
}

pub(super) fn scaled(t_ms: f64) -> Duration {
    Duration::from_secs_f64(t_ms.max(0.0) / 1000.0 / SPEED)
}
