//! End-to-end runs through gantry's own protocol client: a workflow executes, its
//! messages arrive in the real order, history and /view agree.

use gantry_comfy::rest::{Outcome, PromptRequest};
use gantry_comfy::ws::ServerMessage;
use gantry_comfy::{Client, Session, SessionEvent};
use gantry_sim::{spawn, SimConfig};
use serde_json::{Map, Value};
use std::time::Duration;

pub fn workflow(name: &str) -> Map<String, Value> {
    let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures");
    let path = if name.contains('/') {
        dir.join(name)
    } else {
        dir.join("comfyui/workflows").join(name)
    };
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

/// Collects a session's messages until the end marker of `prompt_id`, with a deadline.
pub async fn until_end(session: &mut Session, prompt_id: &str) -> Vec<ServerMessage> {
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let ev = tokio::time::timeout_at(deadline, session.next())
            .await
            .expect("end marker before the deadline")
            .expect("socket open");
        match ev {
            SessionEvent::Message(m) => {
                let end = m.is_end_marker() && m.prompt_id() == Some(prompt_id);
                out.push(m);
                if end {
                    return out;
                }
            }
            SessionEvent::Closed { .. } => panic!("socket closed early: {out:?}"),
            _ => {}
        }
    }
}

pub fn kinds(ms: &[ServerMessage]) -> Vec<&str> {
    ms.iter().map(ServerMessage::kind).collect()
}

#[tokio::test]
async fn txt2img_runs_and_writes_a_real_png() {
    let sim = spawn(SimConfig {
        speed: 20.0,
        ..Default::default()
    })
    .await
    .unwrap();
    let client = Client::new(&sim.url()).unwrap();
    let mut session = client.connect(false).await.unwrap();
    let req = PromptRequest {
        prompt: workflow("workflows/txt2img.json"),
        client_id: Some(session.client_id().to_string()),
        ..Default::default()
    };
    let accepted = match client.submit(&req).await.unwrap() {
        gantry_comfy::client::Submitted::Accepted(a) => a,
        other => panic!("rejected: {other:?}"),
    };
    assert!(accepted.node_errors.is_empty());
    let ms = until_end(&mut session, &accepted.prompt_id).await;
    let k = kinds(&ms);
    assert_eq!(k[0], "status");
    assert!(
        k.contains(&"execution_start") && k.contains(&"execution_success"),
        "{k:?}"
    );
    let n_progress = k.iter().filter(|t| **t == "progress").count();
    assert_eq!(n_progress, 20, "one progress per KSampler step");
    assert_eq!(
        &k[k.len() - 3..],
        ["execution_success", "status", "executing"]
    );

    let entry = client
        .history_of(&accepted.prompt_id)
        .await
        .unwrap()
        .expect("history entry");
    assert_eq!(entry.outcome(), Outcome::Success);
    let files = entry.files();
    assert_eq!(files.len(), 1);
    let png = client.view(&files[0]).await.unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    sim.shutdown().await;
}

#[tokio::test]
async fn a_backend_without_the_model_rejects_with_value_not_in_list() {
    let sim = spawn(SimConfig {
        speed: 20.0,
        models: vec!["other.safetensors".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    let client = Client::new(&sim.url()).unwrap();
    let info = client.object_info().await.unwrap();
    assert_eq!(
        info["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0],
        serde_json::json!(["other.safetensors"])
    );
    let req = PromptRequest {
        prompt: workflow("workflows/txt2img.json"),
        ..Default::default()
    };
    let rejected = match client.submit(&req).await.unwrap() {
        gantry_comfy::client::Submitted::Rejected(r) => r,
        other => panic!("accepted a workflow whose model is missing: {other:?}"),
    };
    assert_eq!(rejected.error.kind, "prompt_outputs_failed_validation");
    let node = &rejected.node_errors["4"];
    assert_eq!(node.class_type, "CheckpointLoaderSimple");
    assert_eq!(node.dependent_outputs, ["9"]);
    let e = &node.errors[0];
    assert_eq!(e.kind, "value_not_in_list");
    assert_eq!(e.extra_info["input_name"], "ckpt_name");
    assert_eq!(
        e.extra_info["received_value"],
        "v1-5-pruned-emaonly.safetensors"
    );
    assert_eq!(
        e.details,
        "ckpt_name: 'v1-5-pruned-emaonly.safetensors' not in ['other.safetensors']"
    );
    assert!(
        client.queue().await.unwrap().queue_pending.is_empty(),
        "nothing queued"
    );
    sim.shutdown().await;
}

/// Run time of a finished prompt, from its history timestamps.
pub async fn run_ms(client: &Client, id: &str) -> i64 {
    let entry = client.history_of(id).await.unwrap().expect("history entry");
    let ts = |name: &str| {
        entry
            .status
            .messages
            .iter()
            .find(|(m, _)| m == name)
            .and_then(|(_, d)| d["timestamp"].as_i64())
            .expect("timestamp")
    };
    ts("execution_success") - ts("execution_start")
}

#[tokio::test]
async fn a_checkpoint_is_warm_only_after_a_prompt_that_loaded_it() {
    // At speed 4 a cold checkpoint load takes 500 ms; everything else in txt2img ~0.3 s.
    let sim = spawn(SimConfig {
        speed: 4.0,
        ..Default::default()
    })
    .await
    .unwrap();
    let client = Client::new(&sim.url()).unwrap();
    let mut session = client.connect(false).await.unwrap();
    let run = |ckpt: &str, seed: u64| {
        let mut g = workflow("workflows/txt2img.json");
        g["4"]["inputs"]["ckpt_name"] = serde_json::json!(ckpt);
        g["3"]["inputs"]["seed"] = serde_json::json!(seed);
        g["3"]["inputs"]["steps"] = serde_json::json!(1);
        PromptRequest {
            prompt: g,
            client_id: Some(session.client_id().to_string()),
            ..Default::default()
        }
    };
    let mut ids = Vec::new();
    let reqs = [
        run("v1-5-pruned-emaonly.safetensors", 1),
        run("v1-5-pruned-emaonly.safetensors", 2),
        run("sd_xl_base_1.0.safetensors", 3),
        run("v1-5-pruned-emaonly.safetensors", 4),
    ];
    let mut cached = Vec::new();
    for req in &reqs {
        let gantry_comfy::client::Submitted::Accepted(a) = client.submit(req).await.unwrap() else {
            panic!("rejected")
        };
        let ms = until_end(&mut session, &a.prompt_id).await;
        let nodes = ms
            .iter()
            .find_map(|m| match m {
                ServerMessage::ExecutionCached(c) => Some(c.nodes.clone()),
                _ => None,
            })
            .unwrap();
        cached.push(nodes.contains(&"4".to_string()));
        ids.push(a.prompt_id);
    }
    // The same file as the previous prompt: the loader is not run again.
    assert_eq!(cached, [false, true, false, false]);
    // A file the previous prompt did not load is loaded cold, each time.
    for i in [0, 2, 3] {
        let ms = run_ms(&client, &ids[i]).await;
        assert!(
            ms >= 500,
            "run {i} took {ms} ms; a cold load alone takes 500 ms"
        );
    }
    sim.shutdown().await;
}
