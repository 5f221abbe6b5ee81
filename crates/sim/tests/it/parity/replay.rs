//! Replaying a capture against a simulator: re-creating the state it started from (earlier
//! scenarios' prompts, a warm cache), then performing the client's actions on the capture's
//! own schedule, catching up with the frames the captured client had seen before each one,
//! and recording every frame and answer (`Replayed`).

use super::script::{is_post_prompt, route, scaled, Script};
use super::{CATCH_UP_DEADLINE, SETUP_DEADLINE};
use crate::support::{
    http_client, send, wait_settled, Event, FrameBody, HttpOutcome, HttpReply, Socket, SocketLog,
};
use gantry_sim::SimHandle;
use serde_json::{json, Map, Value};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;
use tokio::time::Instant;

/// What a replay recorded.
pub(super) struct Replayed {
    pub(super) logs: BTreeMap<String, SocketLog>,
    /// When each socket the replay closed had finished its closing handshake.
    pub(super) closed_at: BTreeMap<String, Instant>,
    /// (request event index, what the simulator answered).
    pub(super) exchanges: Vec<(usize, HttpOutcome)>,
    /// Captured prompt id -> the simulator's, in the order they became known.
    pub(super) prompt_map: Vec<(String, String)>,
    /// Captured output file name -> the simulator's.
    pub(super) file_map: HashMap<String, String>,
    /// Captured ids of earlier scenarios' prompts, re-created before the replay.
    pub(super) earlier: Vec<String>,
    /// The simulator's ids of the prompts the scenario itself submitted, in order.
    pub(super) scenario_prompts: Vec<String>,
    /// Things that went wrong while replaying (reported as mismatches).
    pub(super) problems: Vec<String>,
    /// Hints for reading a failure (catch-up timeouts...).
    pub(super) diagnostics: Vec<String>,
}

/// One step of the client's script.
pub(super) enum Action {
    Connect {
        ws: String,
        url: String,
    },
    SendText {
        ws: String,
        body: Value,
    },
    Close {
        ws: String,
        code: u16,
    },
    Http,
    /// "running: comfy_ctl.sh stop ...": the server is killed.
    Stop,
    /// "starting ComfyUI again".
    Start,
}

pub(super) fn action_of(ev: &Event) -> Option<Action> {
    let ws = || ev.ws.clone().unwrap_or_default();
    match (ev.direction.as_str(), ev.kind.as_str()) {
        ("out", "ws_connect") => Some(Action::Connect {
            ws: ws(),
            url: ev.body["url"].as_str().unwrap_or_default().to_string(),
        }),
        ("out", "ws_text") => Some(Action::SendText {
            ws: ws(),
            body: ev.body.clone(),
        }),
        ("out", "ws_close_sent") => Some(Action::Close {
            ws: ws(),
            code: ev.body["code"].as_u64().unwrap_or(1000) as u16,
        }),
        ("out", "http_request") => Some(Action::Http),
        ("local", "note") => {
            let text = ev.body.as_str().unwrap_or_default();
            if text.starts_with("running: comfy_ctl.sh stop") || ev.body.get("ctl_stop").is_some() {
                Some(Action::Stop)
            } else if text == "starting ComfyUI again" || ev.body.get("ctl_start").is_some() {
                Some(Action::Start)
            } else {
                None
            }
        }
        _ => None,
    }
}

pub(super) struct Live {
    pub(super) socket: Socket,
    pub(super) closed_at: Option<Instant>,
    /// A catch-up on this socket timed out: later steps do not wait for it again, so a
    /// simulator that lost a frame fails in seconds, not after a deadline per step.
    pub(super) behind: bool,
}

pub(super) struct Replayer<'s> {
    pub(super) script: &'s Script,
    pub(super) sim: SimHandle,
    pub(super) http: reqwest::Client,
    pub(super) sockets: BTreeMap<String, Live>,
    pub(super) exchanges: Vec<(usize, HttpOutcome)>,
    pub(super) prompt_map: Vec<(String, String)>,
    pub(super) file_map: HashMap<String, String>,
    pub(super) earlier: Vec<String>,
    pub(super) scenario_prompts: Vec<String>,
    pub(super) problems: Vec<String>,
    pub(super) diagnostics: Vec<String>,
    pub(super) server_up: bool,
}

impl<'s> Replayer<'s> {
    pub(super) fn new(script: &'s Script, sim: SimHandle) -> Self {
        Replayer {
            script,
            sim,
            http: http_client(),
            sockets: BTreeMap::new(),
            exchanges: Vec::new(),
            prompt_map: Vec::new(),
            file_map: HashMap::new(),
            earlier: Vec::new(),
            scenario_prompts: Vec::new(),
            problems: Vec::new(),
            diagnostics: Vec::new(),
            server_up: true,
        }
    }

    pub(super) fn setup_failed(&self, what: &str) -> ! {
        panic!(
            "{}: setup before the replay failed: {what}",
            self.script.name()
        )
    }

    /// POST a JSON body during setup; the answer if it was 200.
    pub(super) async fn post(&self, path: &str, body: &Value) -> Option<HttpReply> {
        let request = self
            .http
            .post(format!("{}{path}", self.sim.url()))
            .json(body);
        let reply = send(request).await.result.ok()?;
        (reply.status == 200).then_some(reply)
    }

    /// Some captures ask for prompts of earlier scenarios (g reads the history of a, c and
    /// an older run of d, and views a's image). A fresh simulator has never seen them, so
    /// they are re-created first from the history entries the capture holds: same graph,
    /// same client_id, driven to the same outcome (an interrupted one is interrupted once
    /// its stalling node runs). Their captured ids then map to the re-created ones.
    pub(super) async fn seed_earlier_prompts(&mut self) {
        let accepted: HashSet<String> = self
            .script
            .accepted_prompts()
            .into_iter()
            .map(|(_, id)| id)
            .collect();
        let mut seeds: Vec<(i64, String, Value)> = Vec::new();
        for &(request, response) in &self.script.exchanges {
            let req = &self.script.cap.events[request].body;
            let (method, path) = route(req);
            let Some(id) = path.strip_prefix("/history/") else {
                continue;
            };
            if method != "GET" || accepted.contains(id) || seeds.iter().any(|s| s.1 == id) {
                continue;
            }
            let Some(response) = response else { continue };
            let entry = &self.script.cap.events[response].body["json"][id];
            if entry["prompt"]
                .as_array()
                .is_some_and(|item| item.len() == 5)
            {
                let number = entry["prompt"][0].as_i64().unwrap_or(0);
                seeds.push((number, id.to_string(), entry.clone()));
            }
        }
        seeds.sort_by_key(|s| s.0);
        for (_, id, entry) in seeds {
            self.seed_one(&id, &entry).await;
        }
    }

    pub(super) async fn seed_one(&mut self, captured_id: &str, entry: &Value) {
        let graph = entry["prompt"][2].clone();
        let client_id = entry["prompt"][3]["client_id"].as_str().map(str::to_string);
        let interrupted_node = entry["status"]["messages"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|m| m[0] == "execution_interrupted")
            .and_then(|m| m[1]["node_id"].as_str())
            .map(str::to_string);
        let mut watcher = None;
        if interrupted_node.is_some() {
            let Some(client) = &client_id else {
                self.setup_failed(&format!(
                    "interrupted prompt {captured_id} has no client_id to watch it"
                ))
            };
            let url = format!("ws://{}/ws?clientId={client}", self.sim.addr);
            match Socket::connect(&url).await {
                Ok(s) => watcher = Some(s),
                Err(e) => self.setup_failed(&e),
            }
        }
        let mut body = json!({ "prompt": graph });
        if let Some(client) = &client_id {
            body["client_id"] = json!(client);
        }
        let Some(reply) = self.post("/prompt", &body).await.and_then(|r| r.json()) else {
            self.setup_failed(&format!(
                "re-creating earlier prompt {captured_id} was not accepted"
            ))
        };
        let sim_id = reply["prompt_id"].as_str().unwrap_or_default().to_string();
        if let (Some(node), Some(socket)) = (&interrupted_node, &watcher) {
            let running = socket
                .wait_until(SETUP_DEADLINE, |log| {
                    log.frames.iter().any(|f| match &f.body {
                        FrameBody::Text(v) => {
                            v["type"] == "executing"
                                && v["data"]["node"] == **node
                                && v["data"]["prompt_id"] == *sim_id
                        }
                        _ => false,
                    })
                })
                .await;
            if !running {
                self.setup_failed(&format!(
                    "node {node} of re-created prompt {sim_id} never ran"
                ));
            }
            let target = json!({ "prompt_id": sim_id });
            if self.post("/interrupt", &target).await.is_none() {
                self.setup_failed("POST /interrupt failed");
            }
        }
        if wait_settled(&self.http, &self.sim.url(), &sim_id, SETUP_DEADLINE)
            .await
            .is_none()
        {
            self.setup_failed(&format!(
                "re-created prompt {sim_id} never reached the history"
            ));
        }
        if let Some(mut socket) = watcher {
            let _ = socket.send_close(1000).await;
            socket
                .wait_until(SETUP_DEADLINE, |log| log.end.is_some())
                .await;
        }
        self.prompt_map.push((captured_id.to_string(), sim_id));
        self.earlier.push(captured_id.to_string());
    }

    /// The captures were taken one after another on one server, so a scenario's first
    /// prompt may find part of its graph cached (its first `execution_cached` is not
    /// empty: b, b2, d2, d3, l, m). ComfyUI's classic cache keeps only what the previous
    /// prompt used, keyed by node signature, so running exactly those nodes (same ids, same
    /// inputs) right before the replay re-creates that state. The cached nodes include the
    /// output node in b, whose cached UI output (the old file name) the rerun reports, so
    /// copying the nodes as they are matters. A PreviewImage fed by one of them makes the
    /// priming prompt valid when no output node is among them.
    ///
    /// The other trace of the server's earlier life in a first prompt, c's
    /// `current_outputs`, is the node-id set of the prompt's own graph
    /// (`caches.outputs.all_node_ids()` after `set_prompt`), so it needs no priming.
    pub(super) async fn prime_cache(&mut self) {
        let Some((request, first_id)) = self.script.accepted_prompts().into_iter().next() else {
            return;
        };
        let cached = self.script.cached_nodes_of(&first_id).unwrap_or_default();
        if cached.is_empty() {
            return;
        }
        let graph = &self.script.cap.events[request].body["json"]["prompt"];
        let mut prime = Map::new();
        for id in &cached {
            let node = graph[id.as_str()].clone();
            for input in node["inputs"]
                .as_object()
                .into_iter()
                .flatten()
                .map(|(_, v)| v)
            {
                if let Some(upstream) = input
                    .as_array()
                    .and_then(|l| l.first())
                    .and_then(Value::as_str)
                {
                    if !cached.iter().any(|c| c == upstream) {
                        self.setup_failed(&format!(
                            "cached node {id} reads uncached node {upstream}"
                        ));
                    }
                }
            }
            prime.insert(id.clone(), node);
        }
        let Some(feeder) = cached.iter().find(|id| {
            IMAGE_OUTPUT_CLASSES.contains(&graph[id.as_str()]["class_type"].as_str().unwrap_or(""))
        }) else {
            self.setup_failed(&format!("no cached node outputs an IMAGE: {cached:?}"))
        };
        prime.insert(
            "prime".into(),
            json!({ "class_type": "PreviewImage", "inputs": { "images": [feeder, 0] } }),
        );
        let prime = json!({ "prompt": prime });
        let Some(reply) = self.post("/prompt", &prime).await.and_then(|r| r.json()) else {
            self.setup_failed("the priming prompt was not accepted")
        };
        let id = reply["prompt_id"].as_str().unwrap_or_default().to_string();
        if wait_settled(&self.http, &self.sim.url(), &id, SETUP_DEADLINE)
            .await
            .is_none()
        {
            self.setup_failed("the priming prompt never reached the history");
        }
    }

    /// Performs the script. An action at capture time `t_ms` happens at `t_ms / SPEED`
    /// after the start: sleeping until then replays the client's own schedule (the one
    /// place where this suite sleeps on the clock). Before each action, every open socket
    /// must first have received as many frames as the capture's had at that point (an
    /// event-driven wait with a deadline): the captured client acted on what it had seen
    /// (the end marker before GET /history, the next POST in m, the server stop after the
    /// last progress frame in i), and the replay must not act on less. Time spent waiting
    /// there shifts the rest of the schedule, so gaps between actions are kept.
    pub(super) async fn run(&mut self) {
        let script = self.script;
        let start = Instant::now();
        let mut shift = Duration::ZERO;
        for (index, ev) in script.cap.events.iter().enumerate() {
            let Some(action) = action_of(ev) else {
                continue;
            };
            let due = start + shift + scaled(ev.t_ms);
            tokio::time::sleep_until(due).await;
            shift += self.catch_up(index).await;
            self.perform(index, action).await;
        }
        self.catch_up(script.cap.events.len()).await;
    }

    /// Waits until each open socket has the frames the capture's had before event `index`;
    /// returns how long that took.
    pub(super) async fn catch_up(&mut self, index: usize) -> Duration {
        let began = Instant::now();
        for (name, live) in &mut self.sockets {
            if live.closed_at.is_some() || live.behind || live.socket.has_ended() {
                continue;
            }
            // Rule::LateJoinStepRace: the late socket may legitimately see one
            // progress_state/progress pair less.
            let slack = if self.script.joins_late(name) { 2 } else { 0 };
            let want = self.script.frames_before(name, index).saturating_sub(slack);
            let arrived = live
                .socket
                .wait_until(CATCH_UP_DEADLINE, |log| {
                    log.frames.len() >= want || log.end.is_some()
                })
                .await;
            if !arrived {
                live.behind = true;
                self.diagnostics.push(format!(
                    "before event #{index}, socket {name} had {} of the {want} frames the capture had \
                     received by then (waited {CATCH_UP_DEADLINE:?}; later steps did not wait for it)",
                    live.socket.frame_count()
                ));
            }
        }
        began.elapsed()
    }

    pub(super) async fn perform(&mut self, index: usize, action: Action) {
        match action {
            Action::Connect { ws, url } => {
                let url = self.sim_ws_url(&url);
                let connected = tokio::time::timeout(SETUP_DEADLINE, Socket::connect(&url))
                    .await
                    .unwrap_or_else(|_| Err(format!("no handshake within {SETUP_DEADLINE:?}")));
                match connected {
                    Ok(socket) => {
                        self.sockets.insert(
                            ws,
                            Live {
                                socket,
                                closed_at: None,
                                behind: false,
                            },
                        );
                    }
                    Err(e) => self.problems.push(format!(
                        "socket {ws}: the connect failed, the capture's got 101: {e}"
                    )),
                }
            }
            Action::SendText { ws, body } => {
                let Some(live) = self.sockets.get_mut(&ws) else {
                    return;
                };
                if let Err(e) = live.socket.send_text(body.to_string()).await {
                    self.problems
                        .push(format!("socket {ws}: sending {body} failed: {e}"));
                }
            }
            Action::Close { ws, code } => {
                let Some(live) = self.sockets.get_mut(&ws) else {
                    return;
                };
                if live.socket.has_ended() {
                    return;
                }
                if let Err(e) = live.socket.send_close(code).await {
                    self.problems
                        .push(format!("socket {ws}: sending the close frame failed: {e}"));
                }
                // The captured client waited for the closing handshake before going on.
                live.socket
                    .wait_until(SETUP_DEADLINE, |log| log.end.is_some())
                    .await;
                live.closed_at = Some(Instant::now());
            }
            Action::Http => self.http_exchange(index).await,
            Action::Stop => {
                if self.server_up {
                    self.sim.crash().await;
                    self.server_up = false;
                }
            }
            Action::Start => {
                if !self.server_up {
                    if let Err(e) = self.sim.restart().await {
                        self.problems
                            .push(format!("the simulator did not restart: {e}"));
                    }
                    self.server_up = true;
                }
            }
        }
    }

    /// The capture's `ws://127.0.0.1:8188/ws?clientId=X` on the simulator's address.
    pub(super) fn sim_ws_url(&self, url: &str) -> String {
        let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
        let path = rest.find('/').map_or("/", |i| &rest[i..]);
        format!("ws://{}{}", self.sim.addr, self.map_path(path))
    }

    /// A captured prompt id or file name, as the simulator knows it.
    pub(super) fn map_token(&self, token: &str) -> String {
        if let Some((_, sim)) = self.prompt_map.iter().find(|(cap, _)| cap == token) {
            return sim.clone();
        }
        self.file_map
            .get(token)
            .cloned()
            .unwrap_or_else(|| token.to_string())
    }

    /// Maps path segments and query values exactly (never substrings).
    pub(super) fn map_path(&self, path: &str) -> String {
        let (path, query) = path
            .split_once('?')
            .map_or((path, None), |(p, q)| (p, Some(q)));
        let path: Vec<String> = path.split('/').map(|s| self.map_token(s)).collect();
        let mut out = path.join("/");
        if let Some(query) = query {
            let pairs: Vec<String> = query
                .split('&')
                .map(|pair| match pair.split_once('=') {
                    Some((k, v)) => format!("{k}={}", self.map_token(v)),
                    None => pair.to_string(),
                })
                .collect();
            out = format!("{out}?{}", pairs.join("&"));
        }
        out
    }

    /// Prompt ids in a request body (client-chosen ids, `delete` lists, interrupt targets).
    pub(super) fn map_json(&self, v: &Value) -> Value {
        match v {
            Value::String(s) => json!(self.map_token(s)),
            Value::Array(a) => Value::Array(a.iter().map(|x| self.map_json(x)).collect()),
            Value::Object(m) => Value::Object(
                m.iter()
                    .map(|(k, x)| (k.clone(), self.map_json(x)))
                    .collect(),
            ),
            other => other.clone(),
        }
    }

    pub(super) async fn http_exchange(&mut self, index: usize) {
        let req = &self.script.cap.events[index].body;
        let method = req["method"].as_str().unwrap_or("GET");
        let method = reqwest::Method::from_bytes(method.as_bytes()).expect("an HTTP method");
        let path = self.map_path(req["path"].as_str().unwrap_or("/"));
        let mut request = self
            .http
            .request(method, format!("{}{path}", self.sim.url()));
        let captured_authority = self
            .script
            .cap
            .server
            .split("://")
            .nth(1)
            .unwrap_or_default();
        for (name, value) in req["headers"].as_object().into_iter().flatten() {
            // An Origin naming the captured server names the simulator now, or the
            // same-origin request of g would turn into a cross-origin one.
            let value = value
                .as_str()
                .unwrap_or_default()
                .replace(captured_authority, &self.sim.addr.to_string());
            request = request.header(name.as_str(), value);
        }
        if let Some(body) = req.get("json") {
            request = request
                .header("content-type", "application/json")
                .body(self.map_json(body).to_string());
        } else if let Some(raw) = req["raw_body"].as_str() {
            request = request
                .header("content-type", "text/plain; charset=utf-8")
                .body(raw.to_string());
        }
        let outcome = send(request).await;
        self.learn_ids(index, &outcome);
        self.exchanges.push((index, outcome));
    }

    /// Learns which simulator ids stand for the captured ones: prompt ids from POST /prompt
    /// answers, output file names from any answer that names files where the capture's did.
    pub(super) fn learn_ids(&mut self, index: usize, outcome: &HttpOutcome) {
        let Some(response) = self.script.response_to(index) else {
            return;
        };
        let captured = &response.body["json"];
        let Some(answer) = outcome.result.as_ref().ok().and_then(HttpReply::json) else {
            return;
        };
        if is_post_prompt(&self.script.cap.events[index].body) {
            if let (Some(cap), Some(sim)) =
                (captured["prompt_id"].as_str(), answer["prompt_id"].as_str())
            {
                self.prompt_map.push((cap.to_string(), sim.to_string()));
                self.scenario_prompts.push(sim.to_string());
            }
        }
        self.learn_files(captured, &answer);
    }

    pub(super) fn learn_files(&mut self, captured: &Value, sim: &Value) {
        match (captured, sim) {
            (Value::Object(c), Value::Object(s)) => {
                for (key, cv) in c {
                    let sim_key = self.map_token(key);
                    let Some(sv) = s.get(&sim_key) else { continue };
                    match (key.as_str(), cv, sv) {
                        ("filename", Value::String(cf), Value::String(sf)) => {
                            self.file_map.insert(cf.clone(), sf.clone());
                        }
                        _ => self.learn_files(cv, sv),
                    }
                }
            }
            (Value::Array(c), Value::Array(s)) => {
                for (cv, sv) in c.iter().zip(s) {
                    self.learn_files(cv, sv);
                }
            }
            _ => {}
        }
    }

    /// Closes what is still open, stops the simulator and hands over the recording.
    pub(super) async fn finish(mut self) -> Replayed {
        for (name, live) in &mut self.sockets {
            if live.closed_at.is_none() && !live.socket.has_ended() {
                let _ = live.socket.send_close(1000).await;
                if !live
                    .socket
                    .wait_until(SETUP_DEADLINE, |log| log.end.is_some())
                    .await
                {
                    self.diagnostics
                        .push(format!("socket {name}: no answer to the final close frame"));
                }
            }
        }
        if tokio::time::timeout(SETUP_DEADLINE, self.sim.shutdown())
            .await
            .is_err()
        {
            self.problems.push(format!(
                "the simulator did not shut down within {SETUP_DEADLINE:?}"
            ));
        }
        Replayed {
            logs: self
                .sockets
                .iter()
                .map(|(name, live)| (name.clone(), live.socket.snapshot()))
                .collect(),
            closed_at: self
                .sockets
                .iter()
                .filter_map(|(name, live)| Some((name.clone(), live.closed_at?)))
                .collect(),
            exchanges: self.exchanges,
            prompt_map: self.prompt_map,
            file_map: self.file_map,
            earlier: self.earlier,
            scenario_prompts: self.scenario_prompts,
            problems: self.problems,
            diagnostics: self.diagnostics,
        }
    }
}

/// Node classes whose first output is an IMAGE (a PreviewImage can read it).
pub(super) const IMAGE_OUTPUT_CLASSES: &[&str] = &[
    "EmptyImage",
    "GantrySleep",
    "GantryStall",
    "GantryFail",
    "ImageInvert",
    "ImageBlur",
    "LoadImage",
];
