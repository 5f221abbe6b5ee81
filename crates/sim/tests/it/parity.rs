//! The parity suite: every scenario captured from a real ComfyUI (0.3.64, see
//! `shared/comfyui-protocol/PROTOCOL.md`) is replayed against a fresh simulator, and what
//! the client sees must match the capture field by field once ids, timestamps, file names
//! and queue numbers are normalized away.
//!
//! One replay:
//! 1. start a simulator at [`SPEED`];
//! 2. re-create the server state the capture started from: prompts of earlier scenarios
//!    that it asks about ([`Replayer::seed_earlier_prompts`]) and the cache its first prompt
//!    found warm ([`Replayer::prime_cache`]);
//! 3. perform the capture's client actions (`out` events, and the server stop/start notes)
//!    on the capture's own schedule divided by [`SPEED`], recording every frame and answer;
//! 4. compare: per socket, each prompt's frames, the `status` frames, the frames at prompt
//!    boundaries and how the socket ended; per HTTP request, status, headers and body.
//!
//! Everywhere the comparison is not plain equality of normalized JSON, a [`Rule`] says why.
//! A failure lists every mismatch with a diff of the normalized sequences, and the rules the
//! scenario needed.
//!
//! The second half holds rule tests: graphs that no capture contains, checked against the
//! ordering and scoping rules of PROTOCOL.md sections 4-6 directly.

use crate::support::{
    capture_names, get_json, http_client, load_capture, send, wait_settled, Capture, Event, Frame,
    FrameBody, HttpFailure, HttpOutcome, HttpReply, Socket, SocketEnd, SocketLog,
};
use gantry_sim::{spawn, SimConfig, SimHandle};
use serde_json::{json, Map, Value};
use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt::Write as _;
use std::time::{Duration, Instant};

/// Simulator speed. The simulator divides every timed phase by it, and the replay divides
/// the capture's client schedule by it too, so both stay in step.
const SPEED: f64 = 4.0;

/// How long a replay step waits for the simulator to deliver the frames the capture had
/// already received at that point of the script.
const CATCH_UP_DEADLINE: Duration = Duration::from_secs(10);

/// Deadline of setup steps (priming, seeding), closing handshakes and shutdown.
const SETUP_DEADLINE: Duration = Duration::from_secs(10);

/// Normalized stand-ins.
const TIMESTAMP: &str = "<timestamp>";
const STRING_LIST: &str = "<list of strings>";
const REPR_LIST: &str = "<list of reprs>";
const EARLIER_NUMBER: &str = "<number of an earlier prompt>";
const SERVER_MADE_ID: &str = "<server-made id: 32 hex digits>";

/// The named exceptions to "normalized capture == normalized simulator". Each one is a place
/// where the two legitimately differ, or where the capture stored less than the full answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Rule {
    /// `executed` (in execution_error / execution_interrupted), `current_outputs` and a queue
    /// item's outputs-to-execute are Python sets turned into lists: their order depends on
    /// the server process's string-hash seed, so they are compared sorted.
    PythonSetOrder,
    /// `traceback` lists and `current_inputs` reprs quote the server's source files and
    /// tensors: compared as "a list of strings" and "the same input names, each a list".
    TracebackText,
    /// The capture kept only some keys of a history entry (`status`, `outputs`, or the
    /// slices `prompt[0]` / `prompt[0:2]`) to save space. The simulator's entry must still
    /// have exactly `prompt`, `outputs`, `status` and `meta`, and the kept parts must match.
    AbbreviatedHistoryEntry,
    /// The capture kept only the first elements of GET /queue items; the simulator's items
    /// must have all 5, and the kept ones must match.
    AbbreviatedQueueItem,
    /// GET /object_info (509 KB) is stored as `{node_count, present}`: the answer must have
    /// that many classes, and the listed classes present or absent as stated.
    ObjectInfoSummary,
    /// GET /history is stored as `{entries: N}`: the answer must have N entries.
    HistoryCountSummary,
    /// GET /system_stats describes the machine: same keys at every level and the same number
    /// of devices. The capture's server ran with `--cpu`; the simulator stands in for a GPU
    /// backend, so each device must be `cuda` where the capture says `cpu`.
    SystemStatsShape,
    /// The capture did not store a JSON body, only its size. It is compared with the body
    /// stored for an earlier identical request of the same size in the same capture.
    UnstoredJsonBody,
    /// GET /view: the bytes are the simulator's own image. Compared: status, Content-Type,
    /// Content-Disposition (with the file name mapped), Etag and Last-Modified present, a
    /// non-empty body.
    ViewFile,
    /// Prompts of earlier scenarios are re-created before the replay, so their queue numbers
    /// depend on how many prompts ran before: only "0 <= number < the scenario's first
    /// number" is compared.
    EarlierPromptNumber,
    /// A socket opened in the middle of a run (j) races the node's next progress step: in
    /// the capture the connect landed 2 ms before step 3 of 6. The late socket may see the
    /// run from one step earlier or later; the late-join `executing` frame and everything
    /// else must match. The replay's catch-up waits allow the same two frames of slack.
    LateJoinStepRace,
}

// ---------------------------------------------------------------------------------------
// One test per capture.
// ---------------------------------------------------------------------------------------

/// Every capture with a parity test below.
const SCENARIOS: &[&str] = &[
    "a_normal_run",
    "b2_partial_cache",
    "b_cached_rerun",
    "c_execution_error",
    "d2_interrupt_global",
    "d3_interrupt_unresponsive",
    "d_interrupt_targeted",
    "e_queue_delete",
    "f_invalid_workflows",
    "g_http_routes",
    "h3_same_client_id_reconnect",
    "h_two_clients",
    "i2_restart_sigkill",
    "i_restart_sigterm",
    "j_late_subscribe",
    "k_client_prompt_id",
    "l_previews_feature_flags",
    "m_post_ws_race",
];

#[test]
fn every_capture_has_a_parity_test() {
    let names = capture_names();
    let missing: Vec<&String> = names
        .iter()
        .filter(|n| !SCENARIOS.contains(&n.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "captures without a parity test: {missing:?}"
    );
    let stale: Vec<&&str> = SCENARIOS
        .iter()
        .filter(|s| !names.iter().any(|n| n == *s))
        .collect();
    assert!(
        stale.is_empty(),
        "parity tests without a capture: {stale:?}"
    );
}

/// The comparator itself: each capture, played back as if a simulator had sent exactly what
/// the captured server sent, must show no difference. So a parity failure is about the
/// simulator, not about normalization or the rules. Answers the capture stored only in part
/// (the summaries and abbreviations of the rules) cannot be played back and are left out.
#[test]
fn comparator_finds_no_difference_between_a_capture_and_itself() {
    let partial = [
        Rule::AbbreviatedHistoryEntry,
        Rule::AbbreviatedQueueItem,
        Rule::ObjectInfoSummary,
        Rule::HistoryCountSummary,
        Rule::UnstoredJsonBody,
    ];
    let mut failures = Vec::new();
    for name in capture_names() {
        let script = Script::new(load_capture(&name));
        let run = playback(&script);
        let (cap, sim) = labels(&script, &run);
        let mut report = Report::new(&name);
        compare_sockets(&mut report, &script, &run, &cap, &sim);
        for (index, outcome) in &run.exchanges {
            let mut one = Report::new(&name);
            compare_exchange(&mut one, &script, &run, *index, outcome, &cap, &sim);
            let stored_in_part = one
                .rules
                .iter()
                .any(|r| partial.iter().any(|p| r.starts_with(&format!("{p:?}:"))));
            if !stored_in_part {
                report.mismatches.extend(one.mismatches);
            }
        }
        if !report.mismatches.is_empty() {
            failures.push(format!("{name}:\n{}", report.mismatches.join("\n")));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

/// A recording made of the capture's own frames and answers, with identity id maps.
fn playback(script: &Script) -> Replayed {
    let t0 = Instant::now();
    let at = |t_ms: f64| t0 + Duration::from_secs_f64(t_ms / 1000.0);
    let mut logs: BTreeMap<String, SocketLog> = BTreeMap::new();
    for ev in &script.cap.events {
        let Some(ws) = &ev.ws else { continue };
        let log = logs.entry(ws.clone()).or_default();
        if ev.is("in", "ws_text") {
            log.frames.push(Frame {
                at: at(ev.t_ms),
                body: FrameBody::Text(ev.body.clone()),
            });
        } else if ev.is("in", "ws_binary") {
            let event_type = ev.body["event_type"].as_u64().unwrap_or(0) as u32;
            let mut bytes = event_type.to_be_bytes().to_vec();
            match ev.body.get("metadata") {
                Some(meta) => {
                    let meta = meta.to_string().into_bytes();
                    bytes.extend((meta.len() as u32).to_be_bytes());
                    bytes.extend(meta);
                }
                None => bytes.extend(1u32.to_be_bytes()),
            }
            bytes.extend(b"image");
            log.frames.push(Frame {
                at: at(ev.t_ms),
                body: FrameBody::Binary(bytes),
            });
        } else if ev.is("in", "ws_closed") && ev.body["close_code"] == 1006 {
            log.end = Some(SocketEnd::Abnormal("dropped".into()));
        } else if ev.kind == "ws_close_done" {
            let code = ev.body["close_code"].as_u64().map(|c| c as u16);
            log.end = Some(SocketEnd::CloseFrame(code));
        }
    }
    let mut exchanges = Vec::new();
    for &(request, response) in &script.exchanges {
        let Some(response) = response.map(|i| &script.cap.events[i]) else {
            continue;
        };
        let b = &response.body;
        let result = if b.get("error").is_some() {
            Err(HttpFailure::Connect("refused".into()))
        } else {
            let mut headers = reqwest::header::HeaderMap::new();
            for (k, v) in b["headers"].as_object().into_iter().flatten() {
                let name =
                    reqwest::header::HeaderName::from_bytes(k.as_bytes()).expect("header name");
                let value = reqwest::header::HeaderValue::from_str(v.as_str().unwrap_or(""))
                    .expect("header value");
                headers.insert(name, value);
            }
            let body = match (b.get("json").filter(|j| !j.is_null()), b["text"].as_str()) {
                (Some(json), _) => json.to_string().into_bytes(),
                (None, Some(text)) => text.as_bytes().to_vec(),
                (None, None) => vec![b'x'; b["body_bytes"].as_u64().unwrap_or(0) as usize],
            };
            Ok(HttpReply {
                status: b["status"].as_u64().unwrap_or(0) as u16,
                headers,
                body,
            })
        };
        exchanges.push((request, HttpOutcome { result }));
    }
    let accepted: Vec<String> = script
        .accepted_prompts()
        .into_iter()
        .map(|(_, id)| id)
        .collect();
    let mut earlier = Vec::new();
    for &(request, response) in &script.exchanges {
        let (method, path) = route(&script.cap.events[request].body);
        let Some(id) = path.strip_prefix("/history/") else {
            continue;
        };
        let has_entry =
            response.is_some_and(|r| script.cap.events[r].body["json"][id]["prompt"].is_array());
        if method == "GET"
            && has_entry
            && !accepted.iter().any(|a| a == id)
            && !earlier.iter().any(|e| e == id)
        {
            earlier.push(id.to_string());
        }
    }
    let prompt_map = earlier
        .iter()
        .chain(&accepted)
        .map(|id| (id.clone(), id.clone()))
        .collect();
    Replayed {
        logs,
        closed_at: BTreeMap::new(),
        exchanges,
        prompt_map,
        file_map: HashMap::new(),
        earlier,
        scenario_prompts: accepted,
        problems: Vec::new(),
        diagnostics: Vec::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parity_a_normal_run() {
    replay_and_compare("a_normal_run").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parity_b_cached_rerun() {
    replay_and_compare("b_cached_rerun").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parity_b2_partial_cache() {
    replay_and_compare("b2_partial_cache").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parity_c_execution_error() {
    replay_and_compare("c_execution_error").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parity_d_interrupt_targeted() {
    replay_and_compare("d_interrupt_targeted").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parity_d2_interrupt_global() {
    replay_and_compare("d2_interrupt_global").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parity_d3_interrupt_unresponsive() {
    replay_and_compare("d3_interrupt_unresponsive").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parity_e_queue_delete() {
    replay_and_compare("e_queue_delete").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parity_f_invalid_workflows() {
    replay_and_compare("f_invalid_workflows").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parity_g_http_routes() {
    replay_and_compare("g_http_routes").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parity_h_two_clients() {
    replay_and_compare("h_two_clients").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parity_h3_same_client_id_reconnect() {
    let run = replay_and_compare("h3_same_client_id_reconnect").await;
    // Beyond the frame-by-frame comparison, the two facts this scenario is about.
    let a1_closed = run.closed_at["A1"];
    let deaf: Vec<String> = run.logs["A2"]
        .frames
        .iter()
        .filter(|f| f.at > a1_closed)
        .map(|f| format!("{:?}", f.body))
        .collect();
    assert!(
        deaf.is_empty(),
        "h3: once A1 (the older socket with the same clientId) is closed, the server's cleanup \
         deafens A2: it must receive nothing for prompt 2, not even status. Got {deaf:#?}"
    );
    let prompt3 = &run.scenario_prompts[2];
    let a3_done = run.logs["A3"].frames.iter().any(|f| match &f.body {
        FrameBody::Text(v) => {
            v["type"] == "executing"
                && v["data"]["node"].is_null()
                && v["data"]["prompt_id"] == *prompt3
        }
        _ => false,
    });
    assert!(
        a3_done,
        "h3: a third socket with the same clientId must work again (end marker of prompt 3)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parity_i_restart_sigterm() {
    replay_and_compare("i_restart_sigterm").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parity_i2_restart_sigkill() {
    replay_and_compare("i2_restart_sigkill").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parity_j_late_subscribe() {
    replay_and_compare("j_late_subscribe").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parity_k_client_prompt_id() {
    replay_and_compare("k_client_prompt_id").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parity_l_previews_feature_flags() {
    replay_and_compare("l_previews_feature_flags").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parity_m_post_ws_race() {
    // The capture holds a warm-up prompt and 20 repetitions of a fully cached one; all are
    // replayed.
    replay_and_compare("m_post_ws_race").await;
}

/// Replays capture `name` against a fresh simulator and panics with a report if anything
/// differs. Returns the recording for scenario-specific checks.
async fn replay_and_compare(name: &str) -> Replayed {
    let script = Script::new(load_capture(name));
    let config = SimConfig {
        speed: SPEED,
        ..Default::default()
    };
    let sim = spawn(config)
        .await
        .unwrap_or_else(|e| panic!("{name}: the simulator does not start: {e}"));
    let mut replayer = Replayer::new(&script, sim);
    replayer.seed_earlier_prompts().await;
    replayer.prime_cache().await;
    replayer.run().await;
    let replayed = replayer.finish().await;
    compare(&script, &replayed).finish();
    replayed
}

// ---------------------------------------------------------------------------------------
// The capture, digested for replaying.
// ---------------------------------------------------------------------------------------

struct Script {
    cap: Capture,
    /// Each HTTP request's event index with its response's. Every capture's client waits
    /// for an answer before doing anything else, so they pair up in order.
    exchanges: Vec<(usize, Option<usize>)>,
}

impl Script {
    fn new(cap: Capture) -> Script {
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

    fn name(&self) -> &str {
        &self.cap.scenario
    }

    fn response_to(&self, request: usize) -> Option<&Event> {
        let (_, response) = self.exchanges.iter().find(|(r, _)| *r == request)?;
        response.map(|i| &self.cap.events[i])
    }

    /// Prompts the captured server accepted, in order: (request event index, prompt id).
    fn accepted_prompts(&self) -> Vec<(usize, String)> {
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
    fn socket_names(&self) -> Vec<String> {
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
    fn frames_before(&self, ws: &str, index: usize) -> usize {
        self.cap.events[..index.min(self.cap.events.len())]
            .iter()
            .filter(|e| e.is_received_frame() && e.ws.as_deref() == Some(ws))
            .count()
    }

    /// The socket was opened while a prompt of its client was running: its first frame
    /// after the connect `status` is the late-join `executing` without prompt_id (j).
    fn joins_late(&self, ws: &str) -> bool {
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
    fn cached_nodes_of(&self, prompt_id: &str) -> Option<Vec<String>> {
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
    fn client_ids(&self) -> Vec<String> {
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
fn is_post_prompt(request: &Value) -> bool {
    let (method, path) = route(request);
    method == "POST" && path == "/prompt"
}

/// Method and path of a captured request, without the query and the `/api` prefix.
fn route(request: &Value) -> (String, String) {
    let method = request["method"].as_str().unwrap_or("GET").to_string();
    let path = request["path"].as_str().unwrap_or("/");
    let path = path.split('?').next().unwrap_or(path);
    let path = path
        .strip_prefix("/api")
        .filter(|p| p.starts_with('/'))
        .unwrap_or(path);
    (method, path.to_string())
}

fn strings(v: &Value) -> Vec<String> {
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
fn collect_key(v: &Value, key: &str, out: &mut Vec<String>) {
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

fn scaled(t_ms: f64) -> Duration {
    Duration::from_secs_f64(t_ms.max(0.0) / 1000.0 / SPEED)
}

// ---------------------------------------------------------------------------------------
// Replaying.
// ---------------------------------------------------------------------------------------

/// What a replay recorded.
struct Replayed {
    logs: BTreeMap<String, SocketLog>,
    /// When each socket the replay closed had finished its closing handshake.
    closed_at: BTreeMap<String, Instant>,
    /// (request event index, what the simulator answered).
    exchanges: Vec<(usize, HttpOutcome)>,
    /// Captured prompt id -> the simulator's, in the order they became known.
    prompt_map: Vec<(String, String)>,
    /// Captured output file name -> the simulator's.
    file_map: HashMap<String, String>,
    /// Captured ids of earlier scenarios' prompts, re-created before the replay.
    earlier: Vec<String>,
    /// The simulator's ids of the prompts the scenario itself submitted, in order.
    scenario_prompts: Vec<String>,
    /// Things that went wrong while replaying (reported as mismatches).
    problems: Vec<String>,
    /// Hints for reading a failure (catch-up timeouts...).
    diagnostics: Vec<String>,
}

/// One step of the client's script.
enum Action {
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

fn action_of(ev: &Event) -> Option<Action> {
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

struct Live {
    socket: Socket,
    closed_at: Option<Instant>,
    /// A catch-up on this socket timed out: later steps do not wait for it again, so a
    /// simulator that lost a frame fails in seconds, not after a deadline per step.
    behind: bool,
}

struct Replayer<'s> {
    script: &'s Script,
    sim: SimHandle,
    http: reqwest::Client,
    sockets: BTreeMap<String, Live>,
    exchanges: Vec<(usize, HttpOutcome)>,
    prompt_map: Vec<(String, String)>,
    file_map: HashMap<String, String>,
    earlier: Vec<String>,
    scenario_prompts: Vec<String>,
    problems: Vec<String>,
    diagnostics: Vec<String>,
    server_up: bool,
}

impl<'s> Replayer<'s> {
    fn new(script: &'s Script, sim: SimHandle) -> Self {
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

    fn setup_failed(&self, what: &str) -> ! {
        panic!(
            "{}: setup before the replay failed: {what}",
            self.script.name()
        )
    }

    /// POST a JSON body during setup; the answer if it was 200.
    async fn post(&self, path: &str, body: &Value) -> Option<HttpReply> {
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
    async fn seed_earlier_prompts(&mut self) {
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

    async fn seed_one(&mut self, captured_id: &str, entry: &Value) {
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
    async fn prime_cache(&mut self) {
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
    async fn run(&mut self) {
        let script = self.script;
        let start = Instant::now();
        let mut shift = Duration::ZERO;
        for (index, ev) in script.cap.events.iter().enumerate() {
            let Some(action) = action_of(ev) else {
                continue;
            };
            let due = start + shift + scaled(ev.t_ms);
            tokio::time::sleep_until(tokio::time::Instant::from_std(due)).await;
            shift += self.catch_up(index).await;
            self.perform(index, action).await;
        }
        self.catch_up(script.cap.events.len()).await;
    }

    /// Waits until each open socket has the frames the capture's had before event `index`;
    /// returns how long that took.
    async fn catch_up(&mut self, index: usize) -> Duration {
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

    async fn perform(&mut self, index: usize, action: Action) {
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
    fn sim_ws_url(&self, url: &str) -> String {
        let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
        let path = rest.find('/').map_or("/", |i| &rest[i..]);
        format!("ws://{}{}", self.sim.addr, self.map_path(path))
    }

    /// A captured prompt id or file name, as the simulator knows it.
    fn map_token(&self, token: &str) -> String {
        if let Some((_, sim)) = self.prompt_map.iter().find(|(cap, _)| cap == token) {
            return sim.clone();
        }
        self.file_map
            .get(token)
            .cloned()
            .unwrap_or_else(|| token.to_string())
    }

    /// Maps path segments and query values exactly (never substrings).
    fn map_path(&self, path: &str) -> String {
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
    fn map_json(&self, v: &Value) -> Value {
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

    async fn http_exchange(&mut self, index: usize) {
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
    fn learn_ids(&mut self, index: usize, outcome: &HttpOutcome) {
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

    fn learn_files(&mut self, captured: &Value, sim: &Value) {
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
    async fn finish(mut self) -> Replayed {
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
const IMAGE_OUTPUT_CLASSES: &[&str] = &[
    "EmptyImage",
    "GantrySleep",
    "GantryStall",
    "GantryFail",
    "ImageInvert",
    "ImageBlur",
    "LoadImage",
];

// ---------------------------------------------------------------------------------------
// Normalization.
// ---------------------------------------------------------------------------------------

/// What replaces run-specific values on one side (capture or simulator).
#[derive(Default)]
struct Labels {
    /// Raw prompt id -> `P1`, `P2`... (the same label on both sides for mapped ids).
    prompts: HashMap<String, String>,
    /// Raw ids of prompts re-created before the replay.
    earlier: HashSet<String>,
    /// The first queue number the scenario's own prompts got.
    number_base: Option<i64>,
    /// Client ids the client chose -> `C1`, `C2`... (identical strings on both sides).
    clients: HashMap<String, String>,
    /// Raw output file name -> `prefix_<Fn>_.png`, numbered in the order normalization
    /// meets them. Both sides are normalized in the same order (sockets, then answers), and
    /// only the parts that are compared get normalized, so a file the capture abbreviated
    /// away (h3's history) does not shift the numbers.
    files: RefCell<HashMap<String, String>>,
    /// The rules normalization needed, for the report.
    used: RefCell<BTreeSet<Rule>>,
}

impl Labels {
    fn used(&self, rule: Rule) {
        self.used.borrow_mut().insert(rule);
    }

    fn prompt(&self, raw: &str) -> Value {
        match self.prompts.get(raw) {
            Some(label) => json!(label),
            None => json!(format!("<unknown prompt id {raw}>")),
        }
    }

    fn client(&self, raw: &str) -> Value {
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

    fn file(&self, raw: &str) -> Value {
        let mut files = self.files.borrow_mut();
        let n = files.len() + 1;
        let label = files
            .entry(raw.to_string())
            .or_insert_with(|| file_label(raw, n));
        json!(label)
    }

    /// A queue number, relative to the scenario's first one. `front: true` numbers are
    /// negative (`-counter`), so they stay negative: -(|n| - base).
    fn number(&self, n: &Value, raw_id: Option<&str>) -> Value {
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
fn file_label(raw: &str, n: usize) -> String {
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
fn norm(l: &Labels, v: &Value) -> Value {
    norm_at(l, None, v)
}

fn norm_at(l: &Labels, key: Option<&str>, v: &Value) -> Value {
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
fn sorted(l: &Labels, a: &[Value]) -> Value {
    l.used(Rule::PythonSetOrder);
    let mut items: Vec<Value> = a.iter().map(|x| norm(l, x)).collect();
    items.sort_by_key(|x| x.to_string());
    Value::Array(items)
}

/// A queue item `[number, prompt_id, graph, extra_data, outputs_to_execute]` (or the first
/// elements of one). The graph is compared as submitted.
fn norm_queue_item(l: &Labels, item: &Value) -> Value {
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

fn norm_history_entry(l: &Labels, entry: &Value) -> Value {
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
enum RawFrame {
    Text(Value),
    BadText(String),
    Binary {
        event_type: Option<u32>,
        metadata: Option<Value>,
    },
}

impl RawFrame {
    fn of_capture(ev: &Event) -> RawFrame {
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
    fn of_sim(body: &FrameBody) -> RawFrame {
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

    fn normalized(&self, l: &Labels) -> Value {
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
struct NFrame {
    v: Value,
    prompt: Option<String>,
}

fn frame_type(v: &Value) -> &str {
    match v.get("type").and_then(Value::as_str) {
        Some(t) => t,
        None if v.get("binary").is_some() => "<binary>",
        None => "<?>",
    }
}

/// A frame belongs to the prompt named by its `prompt_id` (or its type-4 metadata's).
/// Binary previews without metadata and the late-join `executing` without prompt_id belong
/// to the last prompt seen on the socket, or, before any, to the next one.
fn attribute(frames: Vec<Value>) -> Vec<NFrame> {
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

// ---------------------------------------------------------------------------------------
// Comparing.
// ---------------------------------------------------------------------------------------

/// Collected mismatches of one scenario.
struct Report {
    scenario: String,
    mismatches: Vec<String>,
    rules: BTreeSet<String>,
    diagnostics: Vec<String>,
}

impl Report {
    fn new(scenario: &str) -> Report {
        Report {
            scenario: scenario.to_string(),
            mismatches: Vec::new(),
            rules: BTreeSet::new(),
            diagnostics: Vec::new(),
        }
    }

    fn mismatch(&mut self, what: String) {
        self.mismatches.push(what);
    }

    fn rule(&mut self, rule: Rule, context: &str) {
        self.rules.insert(format!("{rule:?}: {context}"));
    }

    fn check_eq(&mut self, what: &str, captured: &Value, sim: &Value) {
        if captured != sim {
            self.mismatch(format!(
                "{what}\n    capture:   {}\n    simulator: {}\n{}",
                compact(captured),
                compact(sim),
                differences(captured, sim)
            ));
        }
    }

    fn check_seq(&mut self, what: &str, captured: &[Value], sim: &[Value]) {
        if captured != sim {
            self.mismatch(format!("{what}\n{}", diff(captured, sim)));
        }
    }

    fn finish(self) {
        let mut text = String::new();
        if !self.rules.is_empty() {
            let _ = writeln!(text, "named exceptions used:");
            for r in &self.rules {
                let _ = writeln!(text, "  - {r}");
            }
        }
        if !self.diagnostics.is_empty() {
            let _ = writeln!(text, "diagnostics:");
            for d in &self.diagnostics {
                let _ = writeln!(text, "  - {d}");
            }
        }
        if self.mismatches.is_empty() {
            println!(
                "{}: the simulator matches the capture\n{text}",
                self.scenario
            );
            return;
        }
        let mut head = format!(
            "{}: the simulator differs from the capture in {} place(s) (values normalized: \
             P<n> prompt ids, C<n> client ids, <F<n>> file names, queue numbers relative to the \
             scenario's first)\n",
            self.scenario,
            self.mismatches.len()
        );
        for (i, m) in self.mismatches.iter().enumerate() {
            let _ = writeln!(head, "\n{}) {m}", i + 1);
        }
        panic!("{head}\n{text}");
    }
}

fn compact(v: &Value) -> String {
    serde_json::to_string(v).unwrap_or_default()
}

/// A line diff of two normalized sequences (longest common subsequence), with runs of
/// more than `2 * DIFF_CONTEXT` equal frames collapsed.
fn diff(captured: &[Value], sim: &[Value]) -> String {
    const DIFF_CONTEXT: usize = 3;
    let a: Vec<String> = captured.iter().map(compact).collect();
    let b: Vec<String> = sim.iter().map(compact).collect();
    let mut lcs = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for i in (0..a.len()).rev() {
        for j in (0..b.len()).rev() {
            lcs[i][j] = if a[i] == b[j] {
                lcs[i + 1][j + 1] + 1
            } else {
                lcs[i + 1][j].max(lcs[i][j + 1])
            };
        }
    }
    // (marker, line): ' ' both, '-' capture only, '+' simulator only.
    let mut lines: Vec<(char, &str)> = Vec::new();
    let (mut i, mut j) = (0, 0);
    while i < a.len() || j < b.len() {
        if i < a.len() && j < b.len() && a[i] == b[j] {
            lines.push((' ', &a[i]));
            i += 1;
            j += 1;
        } else if j >= b.len() || (i < a.len() && lcs[i + 1][j] >= lcs[i][j + 1]) {
            lines.push(('-', &a[i]));
            i += 1;
        } else {
            lines.push(('+', &b[j]));
            j += 1;
        }
    }
    let changed: Vec<usize> = (0..lines.len()).filter(|&k| lines[k].0 != ' ').collect();
    let near_change = |k: usize| changed.iter().any(|&c| c.abs_diff(k) <= DIFF_CONTEXT);
    let mut out = format!(
        "    (- only in the capture, + only in the simulator; {} frames vs {})\n",
        a.len(),
        b.len()
    );
    let mut skipped = 0;
    for (k, (marker, line)) in lines.iter().enumerate() {
        if *marker == ' ' && !near_change(k) {
            skipped += 1;
            continue;
        }
        if skipped > 0 {
            let _ = writeln!(out, "      ... {skipped} equal frame(s)");
            skipped = 0;
        }
        let _ = writeln!(out, "    {marker} {line}");
    }
    if skipped > 0 {
        let _ = writeln!(out, "      ... {skipped} equal frame(s)");
    }
    out
}

/// Where two JSON values differ, as `/path: capture vs simulator` lines (at most 12).
fn differences(captured: &Value, sim: &Value) -> String {
    fn walk(path: String, a: &Value, b: &Value, out: &mut Vec<String>) {
        match (a, b) {
            (Value::Object(x), Value::Object(y)) => {
                let keys: BTreeSet<&String> = x.keys().chain(y.keys()).collect();
                for k in keys {
                    match (x.get(k), y.get(k)) {
                        (Some(p), Some(q)) => walk(format!("{path}/{k}"), p, q, out),
                        (p, q) => out.push(format!("{path}/{k}: {p:?} vs {q:?}")),
                    }
                }
            }
            (Value::Array(x), Value::Array(y)) if x.len() == y.len() => {
                for (n, (p, q)) in x.iter().zip(y).enumerate() {
                    walk(format!("{path}/{n}"), p, q, out);
                }
            }
            _ if a != b => out.push(format!(
                "{}: {} vs {}",
                if path.is_empty() { "/" } else { &path },
                compact(a),
                compact(b)
            )),
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(String::new(), captured, sim, &mut out);
    let more = out.len().saturating_sub(12);
    out.truncate(12);
    let mut text: String = out.iter().map(|l| format!("    at {l}\n")).collect();
    if more > 0 {
        let _ = writeln!(text, "    ... and {more} more");
    }
    text
}

/// Builds both sides' labels and compares everything a replay recorded.
fn compare(script: &Script, run: &Replayed) -> Report {
    let title = script
        .cap
        .meta
        .get("title")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let mut report = Report::new(&format!("{} ({title})", script.name()));
    report.mismatches.extend(run.problems.iter().cloned());
    report.diagnostics.extend(run.diagnostics.iter().cloned());
    let (cap, sim) = labels(script, run);
    if !run.earlier.is_empty() {
        let labels: Vec<Value> = run.earlier.iter().map(|id| cap.prompt(id)).collect();
        report.diagnostics.push(format!(
            "prompts {} of earlier scenarios were re-created before the replay",
            compact(&json!(labels))
        ));
    }
    compare_sockets(&mut report, script, run, &cap, &sim);
    for (index, outcome) in &run.exchanges {
        compare_exchange(&mut report, script, run, *index, outcome, &cap, &sim);
    }
    let used = cap
        .used
        .borrow()
        .union(&sim.used.borrow())
        .copied()
        .collect::<Vec<_>>();
    for rule in used {
        report.rule(rule, "in normalization");
    }
    report
}

/// Every socket of the capture against the simulator's socket of the same name.
fn compare_sockets(
    report: &mut Report,
    script: &Script,
    run: &Replayed,
    cap: &Labels,
    sim: &Labels,
) {
    for ws in script.socket_names() {
        let captured: Vec<Value> = script
            .cap
            .events
            .iter()
            .filter(|e| e.is_received_frame() && e.ws.as_deref() == Some(ws.as_str()))
            .map(|e| RawFrame::of_capture(e).normalized(cap))
            .collect();
        let log = run.logs.get(&ws).cloned().unwrap_or_default();
        let simulated: Vec<Value> = log
            .frames
            .iter()
            .map(|f| RawFrame::of_sim(&f.body).normalized(sim))
            .collect();
        let late = script.joins_late(&ws);
        compare_socket(
            report,
            &ws,
            &attribute(captured),
            &attribute(simulated),
            late,
        );
        compare_socket_end(report, script, &ws, &log);
    }
}

/// Labels for the capture's side and the simulator's.
fn labels(script: &Script, run: &Replayed) -> (Labels, Labels) {
    let mut cap = Labels::default();
    let mut sim = Labels::default();
    for (i, id) in script.client_ids().into_iter().enumerate() {
        let label = format!("C{}", i + 1);
        cap.clients.insert(id.clone(), label.clone());
        sim.clients.insert(id, label);
    }
    // Prompts: the re-created earlier ones first, then the scenario's in submission order.
    let captured_ids = run
        .earlier
        .iter()
        .cloned()
        .chain(script.accepted_prompts().into_iter().map(|(_, id)| id));
    for id in captured_ids {
        let n = cap.prompts.len() + 1;
        cap.prompts.entry(id).or_insert_with(|| format!("P{n}"));
    }
    for (captured, simulated) in &run.prompt_map {
        if let Some(label) = cap.prompts.get(captured) {
            sim.prompts
                .entry(simulated.clone())
                .or_insert_with(|| label.clone());
        }
    }
    cap.earlier = run.earlier.iter().cloned().collect();
    sim.earlier = run
        .prompt_map
        .iter()
        .filter(|(c, _)| cap.earlier.contains(c))
        .map(|(_, s)| s.clone())
        .collect();
    cap.number_base = script
        .accepted_prompts()
        .first()
        .and_then(|(request, _)| script.response_to(*request))
        .and_then(|resp| resp.body["json"]["number"].as_i64());
    sim.number_base = run
        .exchanges
        .iter()
        .filter(|(i, _)| is_post_prompt(&script.cap.events[*i].body))
        .filter_map(|(_, o)| o.result.as_ref().ok()?.json()?["number"].as_i64())
        .next();
    (cap, sim)
}

/// Compares one socket's frames: (a) each prompt's frames, exactly and in order; (b) the
/// `status` frames (queue_remaining, and sid on the first); (c) other frames that belong
/// to no prompt (feature_flags); (d) the frames at prompt boundaries, which fix where
/// `status` goes: the frame before each `execution_start`, and the frames from each
/// terminal `execution_*` through the prompt's next frame (its end marker), or the single
/// next frame when the prompt has no more.
fn compare_socket(
    report: &mut Report,
    ws: &str,
    captured: &[NFrame],
    sim: &[NFrame],
    joins_late: bool,
) {
    let late_prompt = joins_late
        .then(|| {
            captured
                .iter()
                .find(|f| f.v["type"] == "executing" && f.v["data"].get("prompt_id").is_none())
        })
        .flatten()
        .and_then(|f| f.prompt.clone());
    let mut prompts: Vec<String> = Vec::new();
    for f in captured.iter().chain(sim) {
        if let Some(p) = &f.prompt {
            if !prompts.contains(p) {
                prompts.push(p.clone());
            }
        }
    }
    let of = |frames: &[NFrame], p: &str| -> Vec<Value> {
        frames
            .iter()
            .filter(|f| f.prompt.as_deref() == Some(p))
            .map(|f| f.v.clone())
            .collect()
    };
    for p in &prompts {
        let (c, s) = (of(captured, p), of(sim, p));
        if c == s {
            continue;
        }
        if late_prompt.as_deref() == Some(p.as_str()) && late_join_step_race(&c, &s) {
            report.rule(
                Rule::LateJoinStepRace,
                &format!(
                    "socket {ws}, prompt {p}: {} frames in the capture, {} here",
                    c.len(),
                    s.len()
                ),
            );
            continue;
        }
        report.check_seq(
            &format!("socket {ws}: the frames of prompt {p} differ"),
            &c,
            &s,
        );
    }
    let unattributed = |frames: &[NFrame], status: bool| -> Vec<Value> {
        frames
            .iter()
            .filter(|f| f.prompt.is_none() && (frame_type(&f.v) == "status") == status)
            .map(|f| f.v.clone())
            .collect()
    };
    report.check_seq(
        &format!("socket {ws}: the status frames differ"),
        &unattributed(captured, true),
        &unattributed(sim, true),
    );
    report.check_seq(
        &format!("socket {ws}: frames outside any prompt differ"),
        &unattributed(captured, false),
        &unattributed(sim, false),
    );
    // The n-th boundary of a kind against the simulator's n-th of the same kind (a prompt
    // id can run twice: k). A boundary the simulator lacks altogether shows up in (a).
    let (cw, sw) = (boundaries(captured), boundaries(sim));
    for (i, (what, c)) in cw.iter().enumerate() {
        let nth = cw[..i].iter().filter(|(w, _)| w == what).count();
        if let Some((_, s)) = sw.iter().filter(|(w, _)| w == what).nth(nth) {
            report.check_seq(&format!("socket {ws}: {what} differ"), c, s);
        }
    }
}

/// The frames around prompt boundaries (see [`compare_socket`]), labelled.
fn boundaries(frames: &[NFrame]) -> Vec<(String, Vec<Value>)> {
    let mut out = Vec::new();
    for (i, f) in frames.iter().enumerate() {
        let p = f.prompt.clone().unwrap_or_default();
        match frame_type(&f.v) {
            "execution_start" => {
                let before = i.checked_sub(1).map(|j| frames[j].v.clone());
                out.push((
                    format!("the frame before execution_start of {p}"),
                    before.into_iter().collect(),
                ));
            }
            t @ ("execution_success" | "execution_error" | "execution_interrupted") => {
                let rest = &frames[i + 1..];
                let end = rest
                    .iter()
                    .position(|g| g.prompt.as_deref() == Some(p.as_str()))
                    .unwrap_or(0);
                let window = rest.iter().take(end + 1).map(|g| g.v.clone()).collect();
                out.push((format!("the frames after {t} of {p}"), window));
            }
            _ => {}
        }
    }
    out
}

/// Rule::LateJoinStepRace: equal except that the simulator's late socket saw one
/// progress_state/progress pair more (the step before the capture's first) or one less.
fn late_join_step_race(captured: &[Value], sim: &[Value]) -> bool {
    let pair_at = |s: &[Value], i: usize| {
        s.get(i).is_some_and(|v| frame_type(v) == "progress_state")
            && s.get(i + 1).is_some_and(|v| frame_type(v) == "progress")
    };
    let value = |v: &Value| v["data"]["value"].as_i64();
    if captured.first() != sim.first() || captured.is_empty() {
        return false;
    }
    let one_more = pair_at(sim, 1)
        && sim.len() >= 3
        && sim[3..] == captured[1..]
        && pair_at(captured, 1)
        && value(&sim[2])
            .zip(value(&captured[2]))
            .is_some_and(|(s, c)| s + 1 == c);
    let one_less = pair_at(captured, 1) && captured.len() >= 3 && captured[3..] == sim[1..];
    one_more || one_less
}

/// How the capture's socket ended: 1006 without a close frame when the server died, or
/// the server's answer to the client's close frame.
fn compare_socket_end(report: &mut Report, script: &Script, ws: &str, log: &SocketLog) {
    let on_ws = |e: &&Event| e.ws.as_deref() == Some(ws);
    let died = script
        .cap
        .events
        .iter()
        .filter(on_ws)
        .any(|e| e.is("in", "ws_closed") && e.body["close_code"] == 1006);
    let answered = script
        .cap
        .events
        .iter()
        .filter(on_ws)
        .find(|e| e.kind == "ws_close_done")
        .and_then(|e| e.body["close_code"].as_u64());
    let ok = match (&log.end, died, answered) {
        (Some(SocketEnd::Abnormal(_)), true, _) => true,
        (Some(SocketEnd::CloseFrame(code)), false, Some(want)) => code.map(u64::from) == Some(want),
        (_, false, None) => true, // the capture did not record an end
        _ => false,
    };
    if !ok {
        let want = if died {
            "a drop without a close frame (1006)".to_string()
        } else {
            format!("a close frame with code {answered:?} answering the client's")
        };
        report.mismatch(format!(
            "socket {ws}: the connection ended with {:?}; the capture's ended with {want}",
            log.end
        ));
    }
}

/// Compares one HTTP answer with the captured one.
fn compare_exchange(
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
fn compare_json_body(
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
fn shape(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(m.iter().map(|(k, x)| (k.clone(), shape(x))).collect()),
        Value::Array(a) if a.iter().any(|x| x.is_object() || x.is_array()) => {
            Value::Array(a.iter().map(shape).collect())
        }
        Value::Array(_) => json!("<list of scalars>"),
        _ => json!("<scalar>"),
    }
}

const HISTORY_ENTRY_KEYS: [&str; 4] = ["meta", "outputs", "prompt", "status"];

/// History answers: `{prompt_id: entry}` in insertion order. Entries the capture stored
/// whole are compared whole; abbreviated ones under Rule::AbbreviatedHistoryEntry.
fn compare_history(
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
fn compare_queue(
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

// ---------------------------------------------------------------------------------------
// Rule tests: graphs no capture contains, against PROTOCOL.md sections 4-6.
// ---------------------------------------------------------------------------------------

/// How long a rule test waits for a frame.
const FRAME_DEADLINE: Duration = Duration::from_secs(10);

/// A simulator plus what a rule test needs to talk to it and to normalize what it sees.
struct Bench {
    sim: SimHandle,
    http: reqwest::Client,
    /// Prompt ids in submission order: they become P1, P2...
    prompts: Vec<String>,
    clients: Vec<String>,
    first_number: Option<i64>,
}

impl Bench {
    async fn start() -> Bench {
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
    async fn connect(&mut self, with_client_id: bool) -> (Socket, Option<String>) {
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

    async fn request(
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
    async fn submit(&mut self, body: Value) -> Value {
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

    async fn get(&self, path: &str) -> Value {
        get_json(&self.http, &self.sim.url(), path)
            .await
            .unwrap_or_else(|| panic!("GET {path} answers JSON"))
    }

    fn labels(&self) -> Labels {
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
    fn frames(&self, socket: &Socket) -> Vec<NFrame> {
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
    async fn until(&self, socket: &Socket, what: &str, pred: impl Fn(&Value) -> bool) {
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
    async fn until_end(&self, socket: &Socket, n: usize) {
        let id = self.prompts[n].clone();
        self.until(socket, "end marker", |v| {
            v["type"] == "executing" && v["data"]["node"].is_null() && v["data"]["prompt_id"] == *id
        })
        .await;
    }

    async fn stop(self) {
        tokio::time::timeout(SETUP_DEADLINE, self.sim.shutdown())
            .await
            .expect("the simulator shuts down");
    }
}

/// Compares a socket's frames with the expected ones the way captures are compared.
fn expect_frames(what: &str, expected: &[NFrame], actual: &[NFrame]) {
    let mut report = Report::new(what);
    compare_socket(&mut report, "X", expected, actual, false);
    report.finish();
}

/// Builds the frames PROTOCOL.md section 5 predicts for prompts on one socket.
struct Expect {
    frames: Vec<Value>,
    prompt: String,
    /// Whether the socket is the prompt's client: only then lifecycle frames come.
    lifecycle: bool,
    /// The cumulative progress_state node map of the current prompt.
    nodes: Map<String, Value>,
}

impl Expect {
    fn new() -> Expect {
        Expect {
            frames: Vec::new(),
            prompt: String::new(),
            lifecycle: true,
            nodes: Map::new(),
        }
    }

    fn connected(&mut self, sid: &str) -> &mut Self {
        self.frames.push(json!({
            "type": "status",
            "data": { "status": { "exec_info": { "queue_remaining": 0 } }, "sid": sid }
        }));
        self
    }

    fn status(&mut self, remaining: u64) -> &mut Self {
        self.frames.push(json!({
            "type": "status",
            "data": { "status": { "exec_info": { "queue_remaining": remaining } } }
        }));
        self
    }

    /// The worker takes the prompt: execution_start and execution_cached (client only).
    fn begin(&mut self, prompt: &str, lifecycle: bool, cached: &[&str]) -> &mut Self {
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

    fn progress_state(&mut self) {
        self.frames.push(json!({
            "type": "progress_state",
            "data": { "prompt_id": self.prompt, "nodes": self.nodes.clone() }
        }));
    }

    /// A node starts: its progress_state entry is 0.0/1.0 (floats) and running.
    fn start_node(&mut self, id: &str) -> &mut Self {
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
    fn step(&mut self, id: &str, value: u64, max: u64, preview: bool) -> &mut Self {
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
    fn finish_node(&mut self, id: &str) -> &mut Self {
        let max = self.nodes[id]["max"].clone();
        self.nodes[id]["value"] = max;
        self.nodes[id]["state"] = json!("finished");
        self.progress_state();
        self
    }

    /// A node without progress (EmptyImage, ImageInvert).
    fn plain(&mut self, id: &str) -> &mut Self {
        self.start_node(id).finish_node(id)
    }

    /// GantrySleep with `steps` steps.
    fn sleep(&mut self, id: &str, steps: u64, preview: bool) -> &mut Self {
        self.start_node(id);
        for k in 1..=steps {
            self.step(id, k, steps, preview);
        }
        self.finish_node(id)
    }

    /// An output node: `executed` with its UI output (client only) between start and finish.
    fn output(&mut self, id: &str, output: Value) -> &mut Self {
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
    fn success(&mut self, remaining: u64) -> &mut Self {
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

    fn build(&self) -> Vec<NFrame> {
        attribute(self.frames.clone())
    }
}

fn saved(file: &str) -> Value {
    json!({ "images": [{ "filename": file, "subfolder": "", "type": "output" }] })
}

fn previewed(file: &str) -> Value {
    json!({ "images": [{ "filename": file, "subfolder": "", "type": "temp" }] })
}

fn empty_image(color: u64) -> Value {
    json!({ "class_type": "EmptyImage", "inputs": { "width": 64, "height": 64, "batch_size": 1, "color": color } })
}

fn sleep_node(from: &str, seconds: f64, steps: u64, seed: u64) -> Value {
    json!({ "class_type": "GantrySleep", "inputs": { "image": [from, 0], "seconds": seconds, "steps": steps, "seed": seed } })
}

fn invert(from: &str) -> Value {
    json!({ "class_type": "ImageInvert", "inputs": { "image": [from, 0] } })
}

fn save(from: &str) -> Value {
    json!({ "class_type": "SaveImage", "inputs": { "images": [from, 0], "filename_prefix": "gantry_rules" } })
}

fn preview(from: &str) -> Value {
    json!({ "class_type": "PreviewImage", "inputs": { "images": [from, 0] } })
}

/// Node ids other than 1..4, an extra node, and a graph listed out of execution order:
/// the run follows the links, and every frame is shaped as in section 5.a.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_other_node_ids_and_an_extra_node() {
    let mut bench = Bench::start().await;
    let (x, _) = bench.connect(true).await;
    let client = bench.clients[0].clone();
    let graph = json!({
        "40": save("35"),
        "30": invert("20"),
        "10": empty_image(1234),
        "35": invert("30"),
        "20": sleep_node("10", 0.4, 2, 7),
    });
    bench
        .submit(json!({ "prompt": graph, "client_id": client }))
        .await;
    bench.until_end(&x, 0).await;

    let mut expect = Expect::new();
    expect.connected("C1").status(1).status(1);
    expect
        .begin("P1", true, &[])
        .plain("10")
        .sleep("20", 2, false)
        .plain("30")
        .plain("35");
    expect
        .output("40", saved("gantry_rules_<F1>_.png"))
        .success(0);
    expect_frames("other node ids", &expect.build(), &bench.frames(&x));

    let id = bench.prompts[0].clone();
    let entry = &bench.get(&format!("/history/{id}")).await[&id];
    assert_eq!(entry["prompt"][4], json!(["40"]), "outputs to execute");
    assert_eq!(
        entry["outputs"]
            .as_object()
            .map(|o| o.keys().cloned().collect::<Vec<_>>()),
        Some(vec!["40".to_string()])
    );
    assert_eq!(
        entry["meta"],
        json!({ "40": { "node_id": "40", "display_node": "40", "parent_node": null, "real_node_id": "40" } })
    );
    let kinds: Vec<&Value> = entry["status"]["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| &m[0])
        .collect();
    assert_eq!(
        kinds,
        ["execution_start", "execution_cached", "execution_success"]
    );
    assert_eq!(entry["status"]["status_str"], "success");
    assert_eq!(entry["status"]["completed"], true);
    bench.stop().await;
}

/// Two output nodes, SaveImage and PreviewImage, on one upstream node. Which output runs
/// first is the order of a Python set in ComfyUI (Rule::PythonSetOrder), so both orders are
/// accepted; everything else is exact. PreviewImage reports a temp file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_two_output_nodes() {
    let mut bench = Bench::start().await;
    let (x, _) = bench.connect(true).await;
    let client = bench.clients[0].clone();
    let graph = json!({
        "10": empty_image(4321),
        "20": sleep_node("10", 0.2, 1, 11),
        "30": save("20"),
        "40": preview("20"),
    });
    bench
        .submit(json!({ "prompt": graph, "client_id": client }))
        .await;
    bench.until_end(&x, 0).await;

    let order = |first: &str| {
        let mut expect = Expect::new();
        expect.connected("C1").status(1).status(1);
        expect
            .begin("P1", true, &[])
            .plain("10")
            .sleep("20", 1, false);
        let (save_file, preview_file) = if first == "30" {
            ("gantry_rules_<F1>_.png", "ComfyUI_temp_<rand>_<F2>_.png")
        } else {
            ("gantry_rules_<F2>_.png", "ComfyUI_temp_<rand>_<F1>_.png")
        };
        if first == "30" {
            expect
                .output("30", saved(save_file))
                .output("40", previewed(preview_file));
        } else {
            expect
                .output("40", previewed(preview_file))
                .output("30", saved(save_file));
        }
        expect.success(0);
        expect.build()
    };
    let actual = bench.frames(&x);
    let executed_first = actual
        .iter()
        .find(|f| f.v["type"] == "executed")
        .map(|f| f.v["data"]["node"].as_str().unwrap_or_default().to_string())
        .unwrap_or_default();
    let first = if executed_first == "40" { "40" } else { "30" };
    expect_frames("two output nodes", &order(first), &actual);

    let id = bench.prompts[0].clone();
    let entry = &bench.get(&format!("/history/{id}")).await[&id];
    let mut outputs = entry["prompt"][4].as_array().cloned().unwrap_or_default();
    outputs.sort_by_key(|v| v.to_string());
    assert_eq!(
        outputs,
        [json!("30"), json!("40")],
        "outputs to execute (a set)"
    );
    assert_eq!(entry["outputs"]["30"]["images"][0]["type"], "output");
    assert_eq!(entry["outputs"]["40"]["images"][0]["type"], "temp");
    let meta: BTreeSet<&String> = entry["meta"]
        .as_object()
        .map(|m| m.keys().collect())
        .unwrap_or_default();
    assert_eq!(meta.into_iter().collect::<Vec<_>>(), ["30", "40"]);
    bench.stop().await;
}

/// One valid and one invalid output (section 3): 200 with node_errors for the invalid
/// one, and only the valid output's branch runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_partly_invalid_graph_runs_only_the_valid_output() {
    let mut bench = Bench::start().await;
    let (x, _) = bench.connect(true).await;
    let client = bench.clients[0].clone();
    let graph = json!({
        "10": empty_image(99),
        "20": sleep_node("10", 0.2, 1, 12),
        "40": save("20"),
        "50": save("99"),
    });
    let reply = bench
        .submit(json!({ "prompt": graph, "client_id": client }))
        .await;
    let l = bench.labels();
    let mut normalized = norm(&l, &reply);
    normalized["number"] = l.number(&reply["number"], reply["prompt_id"].as_str());
    let expected = json!({
        "prompt_id": "P1",
        "number": 0,
        "node_errors": { "50": {
            "errors": [{
                "type": "exception_during_validation",
                "message": "Exception when validating node",
                "details": "'99'",
                "extra_info": { "exception_type": "KeyError", "traceback": STRING_LIST }
            }],
            "dependent_outputs": ["50"],
            "class_type": "SaveImage"
        }}
    });
    assert_eq!(normalized, expected, "POST /prompt answer");
    bench.until_end(&x, 0).await;

    let mut expect = Expect::new();
    expect.connected("C1").status(1).status(1);
    expect
        .begin("P1", true, &[])
        .plain("10")
        .sleep("20", 1, false);
    expect
        .output("40", saved("gantry_rules_<F1>_.png"))
        .success(0);
    expect_frames("partly invalid graph", &expect.build(), &bench.frames(&x));

    let id = bench.prompts[0].clone();
    let entry = &bench.get(&format!("/history/{id}")).await[&id];
    assert_eq!(
        entry["prompt"][4],
        json!(["40"]),
        "only the valid output is executed"
    );
    assert!(entry["outputs"].get("50").is_none());
    bench.stop().await;
}

/// A prompt without client_id (section 4 scope, 5.h): every socket, whatever its clientId,
/// gets status, progress_state, progress and the previews, and no lifecycle frame at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_prompt_without_client_id_broadcasts_progress_only() {
    let mut bench = Bench::start().await;
    let (x, _) = bench.connect(true).await;
    let (y, _) = bench.connect(false).await;
    let mut graph = json!({
        "10": empty_image(555),
        "20": sleep_node("10", 0.4, 2, 13),
        "40": save("20"),
    });
    graph["20"]["inputs"]["preview"] = json!(true);
    bench.submit(json!({ "prompt": graph })).await;
    let id = bench.prompts[0].clone();
    // No end marker comes: the end is the history entry plus the status(0) on each socket.
    wait_settled(&bench.http, &bench.sim.url(), &id, FRAME_DEADLINE)
        .await
        .expect("the prompt finishes");
    for socket in [&x, &y] {
        let idle = |log: &SocketLog| {
            log.frames.iter().rev().find_map(|f| match &f.body {
                FrameBody::Text(v) if v["type"] == "status" => {
                    Some(v["data"]["status"]["exec_info"]["queue_remaining"] == 0)
                }
                _ => None,
            }) == Some(true)
                && log.frames.len() > 3
        };
        assert!(
            socket.wait_until(FRAME_DEADLINE, idle).await,
            "no final status(0)"
        );
    }

    for (name, socket, sid) in [
        ("with clientId", &x, "C1"),
        ("without clientId", &y, SERVER_MADE_ID),
    ] {
        let mut expect = Expect::new();
        expect.connected(sid).status(1).status(1);
        expect
            .begin("P1", false, &[])
            .plain("10")
            .sleep("20", 2, true);
        expect.output("40", Value::Null).success(0);
        expect_frames(
            &format!("prompt without client_id, socket {name}"),
            &expect.build(),
            &bench.frames(socket),
        );
    }
    let entry = &bench.get(&format!("/history/{id}")).await[&id];
    assert_eq!(
        entry["prompt"][3],
        json!({}),
        "extra_data without client_id"
    );
    assert!(entry["outputs"].get("40").is_some());
    bench.stop().await;
}

/// `front: true` (section 2): the prompt gets -counter and runs before an earlier-submitted
/// pending one; GET /queue lists pending prompts in run order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_front_true_jumps_the_queue() {
    let mut bench = Bench::start().await;
    let (x, _) = bench.connect(true).await;
    let client = bench.clients[0].clone();
    let graph = |seconds: f64, steps: u64, seed: u64| json!({ "10": empty_image(777), "20": sleep_node("10", seconds, steps, seed), "40": save("20") });
    bench
        .submit(json!({ "prompt": graph(2.0, 2, 1), "client_id": client }))
        .await;
    let long = bench.prompts[0].clone();
    bench
        .until(&x, "executing 20 of the long prompt", |v| {
            v["type"] == "executing" && v["data"]["node"] == "20" && v["data"]["prompt_id"] == *long
        })
        .await;
    let normal = bench
        .submit(json!({ "prompt": graph(0.2, 1, 2), "client_id": client }))
        .await;
    let front = bench
        .submit(json!({ "prompt": graph(0.2, 1, 3), "client_id": client, "front": true }))
        .await;
    let l = bench.labels();
    assert_eq!(l.number(&normal["number"], None), json!(1));
    assert_eq!(
        l.number(&front["number"], None),
        json!(-2),
        "front:true gives -counter"
    );

    let queue = bench.get("/queue").await;
    let heads = |key: &str| -> Vec<Value> {
        queue[key]
            .as_array()
            .unwrap()
            .iter()
            .map(|item| {
                json!([
                    l.number(&item[0], None),
                    l.prompt(item[1].as_str().unwrap())
                ])
            })
            .collect()
    };
    assert_eq!(heads("queue_running"), [json!([0, "P1"])]);
    assert_eq!(
        heads("queue_pending"),
        [json!([-2, "P3"]), json!([1, "P2"])]
    );
    bench.until_end(&x, 1).await;

    // P1 runs, then P3 (front), then P2; P2 and P3 find EmptyImage 10 cached.
    let mut expect = Expect::new();
    expect.connected("C1").status(1).status(1);
    expect.begin("P1", true, &[]).plain("10").start_node("20");
    // The two POSTs during P1 (where they land among P1's frames is timing; only the
    // sequence of status values and the prompt boundaries are compared).
    expect.status(2).status(3);
    expect
        .step("20", 1, 2, false)
        .step("20", 2, 2, false)
        .finish_node("20");
    expect
        .output("40", saved("gantry_rules_<F1>_.png"))
        .success(2);
    expect
        .status(2)
        .begin("P3", true, &["10"])
        .sleep("20", 1, false);
    expect
        .output("40", saved("gantry_rules_<F2>_.png"))
        .success(1);
    expect
        .status(1)
        .begin("P2", true, &["10"])
        .sleep("20", 1, false);
    expect
        .output("40", saved("gantry_rules_<F3>_.png"))
        .success(0);
    expect_frames("front:true", &expect.build(), &bench.frames(&x));
    bench.stop().await;
}

/// POST /queue {delete: [pending id]} (section 5.e): 200 with an empty body, then status
/// twice, and nothing else ever mentions the deleted prompt, not even the history.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_deleting_a_pending_prompt_is_silent() {
    let mut bench = Bench::start().await;
    let (x, _) = bench.connect(true).await;
    let client = bench.clients[0].clone();
    let graph = |seed: u64| json!({ "10": empty_image(888), "20": sleep_node("10", 2.0, 2, seed), "40": save("20") });
    bench
        .submit(json!({ "prompt": graph(1), "client_id": client }))
        .await;
    let long = bench.prompts[0].clone();
    bench
        .until(&x, "executing 20 of the long prompt", |v| {
            v["type"] == "executing" && v["data"]["node"] == "20" && v["data"]["prompt_id"] == *long
        })
        .await;
    bench
        .submit(json!({ "prompt": graph(2), "client_id": client }))
        .await;
    let doomed = bench.prompts[1].clone();
    let reply = bench
        .request(
            reqwest::Method::POST,
            "/queue",
            Some(&json!({ "delete": [doomed] })),
        )
        .await;
    assert_eq!(reply.status, 200);
    assert!(reply.body.is_empty(), "POST /queue answers an empty body");
    let queue = bench.get("/queue").await;
    assert_eq!(
        queue["queue_pending"],
        json!([]),
        "the deleted prompt left the queue"
    );
    bench.until_end(&x, 0).await;

    let mut expect = Expect::new();
    expect.connected("C1").status(1).status(1);
    expect.begin("P1", true, &[]).plain("10").start_node("20");
    // Enqueue of P2, then the delete's two status frames.
    expect.status(2).status(1).status(1);
    expect
        .step("20", 1, 2, false)
        .step("20", 2, 2, false)
        .finish_node("20");
    expect
        .output("40", saved("gantry_rules_<F1>_.png"))
        .success(0);
    expect_frames("queue delete", &expect.build(), &bench.frames(&x));

    assert_eq!(bench.get(&format!("/history/{doomed}")).await, json!({}));
    let history = bench.get("/history").await;
    let ids: Vec<&String> = history.as_object().unwrap().keys().collect();
    assert_eq!(ids, [&long], "only the run prompt is in the history");
    bench.stop().await;
}
