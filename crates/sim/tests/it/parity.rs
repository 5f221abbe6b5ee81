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
//! This file holds the named exceptions, one test per capture and the comparator's own
//! test. The steps live in `script` (the capture, digested), `replay` (1 to 3),
//! `normalize` and `compare` (4, sockets), `answers` (4, HTTP). `rules` holds rule tests:
//! graphs that no capture contains, checked against the ordering and scoping rules of
//! PROTOCOL.md sections 4-6 directly, on the helpers of `bench`.

mod answers;
mod bench;
mod compare;
mod normalize;
mod replay;
mod rules;
mod script;

use crate::support::{
    capture_names, load_capture, Frame, FrameBody, HttpFailure, HttpOutcome, HttpReply, SocketEnd,
    SocketLog,
};
use answers::compare_exchange;
use compare::{compare, compare_sockets, labels, Report};
use gantry_sim::{spawn, SimConfig};
use replay::{Replayed, Replayer};
use script::{route, Script};
use std::collections::{BTreeMap, HashMap};
use std::time::Duration;
use tokio::time::Instant;

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
