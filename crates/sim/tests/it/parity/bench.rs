//! What the rule tests stand on: `Bench`, a simulator with typed helpers and labels, and
//! `Expect`, which builds the frames PROTOCOL.md section 5 predicts for prompts on one
//! socket; plus the small graphs the rule tests submit.

use super::compare::{compare_socket, Report};
use super::normalize::{attribute, Labels, NFrame, RawFrame};
use super::{SETUP_DEADLINE, SPEED, TIMESTAMP};
use crate::support::{get_json, http_client, send, FrameBody, HttpReply, Socket};
use gantry_sim::{spawn, SimConfig, SimHandle};
use serde_json::{json, Map, Value};
use std::time::Duration;

/// How long a rule test waits for a frame.
pub(super) const FRAME_DEADLINE: Duration = Duration::from_secs(10);

/// A simulator plus what a rule test needs to talk to it and to normalize what it sees.
pub(super) struct Bench {
    pub(super) sim: SimHandle,
    pub(super) http: reqwest::Client,
    /// Prompt ids in submission order: they become P1, P2...
    pub(super) prompts: Vec<String>,
    pub(super) clients: Vec<String>,
    pub(super) first_number: Option<i64>,
}

impl Bench {
    pub(super) async fn start() -> Bench {
        let config = SimConfig {
            speed: SPEED,
            ..Default::default()
        };
        let sim = spawn(config).await.expect("the simulator starts");
        Bench {
            sim,
            http: http_client(),
            prompts: Vec::new(),
            clients: Vec::new(),
            first_number: None,
        }
    }

    /// A socket with a fresh clientId (labelled C1, C2...), or without one.
    pub(super) async fn connect(&mut self, with_client_id: bool) -> (Socket, Option<String>) {
        let client = with_client_id.then(|| uuid::Uuid::new_v4().to_string());
        let url = match &client {
            Some(id) => {
                self.clients.push(id.clone());
                format!("ws://{}/ws?clientId={id}", self.sim.addr)
            }
            None => format!("ws://{}/ws", self.sim.addr),
        };
        let socket = Socket::connect(&url).await.expect("the socket connects");
        // Every socket's first frame is its status: wait for it, so the order of later
        // frames does not depend on the connect racing the first POST.
        assert!(
            socket
                .wait_until(FRAME_DEADLINE, |log| !log.frames.is_empty())
                .await,
            "no status frame after connecting"
        );
        (socket, client)
    }

    pub(super) async fn request(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
    ) -> HttpReply {
        let mut request = self
            .http
            .request(method, format!("{}{path}", self.sim.url()));
        if let Some(body) = body {
            request = request.json(body);
        }
        send(request)
            .await
            .result
            .unwrap_or_else(|e| panic!("{path}: request failed: {e}"))
    }

    /// POST /prompt, expecting 200; remembers the id.
    pub(super) async fn submit(&mut self, body: Value) -> Value {
        let reply = self
            .request(reqwest::Method::POST, "/prompt", Some(&body))
            .await;
        let json = reply.json().unwrap_or_default();
        assert_eq!(reply.status, 200, "POST /prompt: {json}");
        let id = json["prompt_id"].as_str().expect("a prompt_id").to_string();
        self.prompts.push(id);
        if self.first_number.is_none() {
            self.first_number = json["number"].as_i64();
        }
        json
    }

    pub(super) async fn get(&self, path: &str) -> Value {
        get_json(&self.http, &self.sim.url(), path)
            .await
            .unwrap_or_else(|| panic!("GET {path} answers JSON"))
    }

    pub(super) fn labels(&self) -> Labels {
        let mut l = Labels {
            number_base: self.first_number,
            ..Default::default()
        };
        for (i, id) in self.prompts.iter().enumerate() {
            l.prompts.insert(id.clone(), format!("P{}", i + 1));
        }
        for (i, id) in self.clients.iter().enumerate() {
            l.clients.insert(id.clone(), format!("C{}", i + 1));
        }
        l
    }

    /// The socket's frames, normalized, with file names numbered in order of appearance.
    pub(super) fn frames(&self, socket: &Socket) -> Vec<NFrame> {
        let log = socket.snapshot();
        let l = self.labels();
        attribute(
            log.frames
                .iter()
                .map(|f| RawFrame::of_sim(&f.body).normalized(&l))
                .collect(),
        )
    }

    /// Waits for a text frame matching `pred` (raw, not normalized).
    pub(super) async fn until(&self, socket: &Socket, what: &str, pred: impl Fn(&Value) -> bool) {
        let seen = socket
            .wait_until(FRAME_DEADLINE, |log| {
                log.frames
                    .iter()
                    .any(|f| matches!(&f.body, FrameBody::Text(v) if pred(v)))
            })
            .await;
        assert!(
            seen,
            "no {what} within {FRAME_DEADLINE:?}: {:#?}",
            socket.snapshot().frames
        );
    }

    /// Waits for the end marker `executing {node: null}` of the n-th submitted prompt.
    pub(super) async fn until_end(&self, socket: &Socket, n: usize) {
        let id = self.prompts[n].clone();
        self.until(socket, "end marker", |v| {
            v["type"] == "executing" && v["data"]["node"].is_null() && v["data"]["prompt_id"] == *id
        })
        .await;
    }

    pub(super) async fn stop(self) {
        tokio::time::timeout(SETUP_DEADLINE, self.sim.shutdown())
            .await
            .expect("the simulator shuts down");
    }
}

/// Compares a socket's frames with the expected ones the way captures are compared.
pub(super) fn expect_frames(what: &str, expected: &[NFrame], actual: &[NFrame]) {
    let mut report = Report::new(what);
    compare_socket(&mut report, "X", expected, actual, false);
    report.finish();
}

/// Builds the frames PROTOCOL.md section 5 predicts for prompts on one socket.
pub(super) struct Expect {
    pub(super) frames: Vec<Value>,
    pub(super) prompt: String,
    /// Whether the socket is the prompt's client: only then lifecycle frames come.
    pub(super) lifecycle: bool,
    /// The cumulative progress_state node map of the current prompt.
    pub(super) nodes: Map<String, Value>,
}

impl Expect {
    pub(super) fn new() -> Expect {
        Expect {
            frames: Vec::new(),
            prompt: String::new(),
            lifecycle: true,
            nodes: Map::new(),
        }
    }

    pub(super) fn connected(&mut self, sid: &str) -> &mut Self {
        self.frames.push(json!({
            "type": "status",
            "data": { "status": { "exec_info": { "queue_remaining": 0 } }, "sid": sid }
        }));
        self
    }

    pub(super) fn status(&mut self, remaining: u64) -> &mut Self {
        self.frames.push(json!({
            "type": "status",
            "data": { "status": { "exec_info": { "queue_remaining": remaining } } }
        }));
        self
    }

    /// The worker takes the prompt: execution_start and execution_cached (client only).
    pub(super) fn begin(&mut self, prompt: &str, lifecycle: bool, cached: &[&str]) -> &mut Self {
        self.prompt = prompt.to_string();
        self.lifecycle = lifecycle;
        self.nodes = Map::new();
        if lifecycle {
            self.frames.push(json!({
                "type": "execution_start",
                "data": { "prompt_id": prompt, "timestamp": TIMESTAMP }
            }));
            self.frames.push(json!({
                "type": "execution_cached",
                "data": { "nodes": cached, "prompt_id": prompt, "timestamp": TIMESTAMP }
            }));
        }
        self
    }

    pub(super) fn progress_state(&mut self) {
        self.frames.push(json!({
            "type": "progress_state",
            "data": { "prompt_id": self.prompt, "nodes": self.nodes.clone() }
        }));
    }

    /// A node starts: its progress_state entry is 0.0/1.0 (floats) and running.
    pub(super) fn start_node(&mut self, id: &str) -> &mut Self {
        let entry = json!({
            "value": 0.0, "max": 1.0, "state": "running", "node_id": id, "prompt_id": self.prompt,
            "display_node_id": id, "parent_node_id": null, "real_node_id": id
        });
        self.nodes.insert(id.to_string(), entry);
        self.progress_state();
        if self.lifecycle {
            self.frames.push(json!({
                "type": "executing",
                "data": { "node": id, "display_node": id, "prompt_id": self.prompt }
            }));
        }
        self
    }

    /// A ProgressBar step: ints in progress_state and progress; a preview follows
    /// `progress` as a type-1 binary frame (no feature flags).
    pub(super) fn step(&mut self, id: &str, value: u64, max: u64, preview: bool) -> &mut Self {
        self.nodes[id]["value"] = json!(value);
        self.nodes[id]["max"] = json!(max);
        self.progress_state();
        self.frames.push(json!({
            "type": "progress",
            "data": { "value": value, "max": max, "prompt_id": self.prompt, "node": id }
        }));
        if preview {
            self.frames.push(json!({ "binary": 1 }));
        }
        self
    }

    /// A node finishes: value = max (keeping max's JSON type), state finished.
    pub(super) fn finish_node(&mut self, id: &str) -> &mut Self {
        let max = self.nodes[id]["max"].clone();
        self.nodes[id]["value"] = max;
        self.nodes[id]["state"] = json!("finished");
        self.progress_state();
        self
    }

    /// A node without progress (EmptyImage, ImageInvert).
    pub(super) fn plain(&mut self, id: &str) -> &mut Self {
        self.start_node(id).finish_node(id)
    }

    /// GantrySleep with `steps` steps.
    pub(super) fn sleep(&mut self, id: &str, steps: u64, preview: bool) -> &mut Self {
        self.start_node(id);
        for k in 1..=steps {
            self.step(id, k, steps, preview);
        }
        self.finish_node(id)
    }

    /// An output node: `executed` with its UI output (client only) between start and finish.
    pub(super) fn output(&mut self, id: &str, output: Value) -> &mut Self {
        self.start_node(id);
        if self.lifecycle {
            self.frames.push(json!({
                "type": "executed",
                "data": { "node": id, "display_node": id, "output": output, "prompt_id": self.prompt }
            }));
        }
        self.finish_node(id)
    }

    /// execution_success, the status of the queue after the prompt, the end marker. A
    /// prompt without client_id leaves only the status.
    pub(super) fn success(&mut self, remaining: u64) -> &mut Self {
        if self.lifecycle {
            self.frames.push(json!({
                "type": "execution_success",
                "data": { "prompt_id": self.prompt, "timestamp": TIMESTAMP }
            }));
        }
        self.status(remaining);
        if self.lifecycle {
            self.frames.push(json!({
                "type": "executing",
                "data": { "node": null, "prompt_id": self.prompt }
            }));
        }
        self
    }

    pub(super) fn build(&self) -> Vec<NFrame> {
        attribute(self.frames.clone())
    }
}

pub(super) fn saved(file: &str) -> Value {
    json!({ "images": [{ "filename": file, "subfolder": "", "type": "output" }] })
}

pub(super) fn previewed(file: &str) -> Value {
    json!({ "images": [{ "filename": file, "subfolder": "", "type": "temp" }] })
}

pub(super) fn empty_image(color: u64) -> Value {
    json!({ "class_type": "EmptyImage", "inputs": { "width": 64, "height": 64, "batch_size": 1, "color": color } })
}

pub(super) fn sleep_node(from: &str, seconds: f64, steps: u64, seed: u64) -> Value {
    json!({ "class_type": "GantrySleep", "inputs": { "image": [from, 0], "seconds": seconds, "steps": steps, "seed": seed } })
}

pub(super) fn invert(from: &str) -> Value {
    json!({ "class_type": "ImageInvert", "inputs": { "image": [from, 0] } })
}

pub(super) fn save(from: &str) -> Value {
    json!({ "class_type": "SaveImage", "inputs": { "images": [from, 0], "filename_prefix": "gantry_rules" } })
}

pub(super) fn preview(from: &str) -> Value {
    json!({ "class_type": "PreviewImage", "inputs": { "images": [from, 0] } })
}
