//! `gantry bench profile`: what the always-on per-node profile costs a job. The
//! WebSocket messages of a typical txt2img run (the standard 7-node graph, a sampler of
//! `--steps` steps, previews off) go through the driver's own profile code, the profile
//! is finished and serialised as the store and the terminal event keep it; measured
//! against parsing those same messages, which the driver does for every job anyway.

use crate::report::Results;
use crate::stats::Stats;
use anyhow::Context;
use gantry_comfy::ws::ServerMessage;
use gantry_core::profile::ProfileBuilder;
use gantry_core::{Attempt, AttemptStatus, Workflow};
use serde_json::json;
use std::time::Instant;

/// What `gantry bench profile` runs (the command's flags, parsed by the cli).
pub struct Options {
    /// Jobs to profile.
    pub jobs: usize,
    /// Sampler steps per job (progress messages).
    pub steps: u32,
}

fn txt2img() -> anyhow::Result<Workflow> {
    let graph = json!({
        "3": {"class_type": "KSampler", "inputs": {"seed": 1, "steps": 30, "cfg": 7, "sampler_name": "euler", "scheduler": "normal", "denoise": 1, "model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0]}, "_meta": {"title": "KSampler"}},
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "v1-5-pruned-emaonly.safetensors"}, "_meta": {"title": "Load Checkpoint"}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 512, "height": 512, "batch_size": 1}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a fox", "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["4", 1]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "ComfyUI", "images": ["8", 0]}}
    });
    Workflow::parse(&graph).context("the txt2img graph")
}

/// The text frames of one run, as ComfyUI sends them.
fn frames(pid: &str, steps: u32) -> Vec<String> {
    let mut out = vec![
        json!({"type": "execution_start", "data": {"prompt_id": pid, "timestamp": 1}}),
        json!({"type": "execution_cached", "data": {"nodes": [], "prompt_id": pid, "timestamp": 1}}),
    ];
    for node in ["4", "5", "6", "7", "3"] {
        out.push(json!({"type": "executing", "data": {"node": node, "display_node": node, "prompt_id": pid}}));
    }
    for i in 1..=steps {
        out.push(json!({"type": "progress", "data": {"value": i, "max": steps, "prompt_id": pid, "node": "3"}}));
    }
    for node in ["8", "9"] {
        out.push(json!({"type": "executing", "data": {"node": node, "display_node": node, "prompt_id": pid}}));
    }
    out.push(json!({"type": "executed", "data": {"node": "9", "display_node": "9", "output": {"images": [{"filename": "ComfyUI_00001_.png", "subfolder": "", "type": "output"}]}, "prompt_id": pid}}));
    out.push(json!({"type": "execution_success", "data": {"prompt_id": pid, "timestamp": 2}}));
    out.push(json!({"type": "executing", "data": {"node": null, "prompt_id": pid}}));
    out.into_iter().map(|v| v.to_string()).collect()
}

pub async fn run(a: Options) -> anyhow::Result<Results> {
    let workflow = txt2img()?;
    let pid = "6b3a2f7b-f106-45bf-9e98-c2b7efb2e409";
    let frames = frames(pid, a.steps);
    let attempt = Attempt {
        number: 1,
        backend: "a".into(),
        prompt_id: pid.into(),
        status: AttemptStatus::Succeeded,
        created_at: 0,
        submitted_at: Some(1),
        started_at: Some(2),
        finished_at: Some(10_000),
        error: None,
        counted: true,
        profile: None,
    };
    let (mut parse_us, mut profile_us) = (Vec::new(), Vec::new());
    let mut bytes = 0;
    for job in 0..a.jobs.max(1) {
        // What the driver does for every job anyway: parse each frame.
        let t = Instant::now();
        let messages: Vec<ServerMessage> = frames
            .iter()
            .map(|f| ServerMessage::parse(f))
            .collect::<Result<_, _>>()
            .context("a frame")?;
        parse_us.push(t.elapsed().as_secs_f64() * 1e6);
        // What the profile adds: observe each, finish, serialise it for the store.
        let t = Instant::now();
        let mut b = ProfileBuilder::default();
        for (i, m) in messages.iter().enumerate() {
            gantry_server::backend::comfy::profiling::observe(&mut b, 10 + i as i64 * 7, m);
        }
        let profile = b.finish(&workflow, &attempt);
        let text = serde_json::to_string(&profile)?;
        profile_us.push(t.elapsed().as_secs_f64() * 1e6);
        if job == 0 {
            bytes = text.len();
        }
    }
    let (parse, profile) = (Stats::of(&parse_us), Stats::of(&profile_us));
    let ratio = profile.p50 / parse.p50;
    Ok(Results {
        table: vec![
            format!(
                "{} jobs, {} frames each ({} progress)",
                a.jobs,
                frames.len(),
                a.steps
            ),
            format!("parse frames (done anyway) per job: {}", parse.line("us")),
            format!(
                "profile per job (observe + finish + JSON): {}",
                profile.line("us")
            ),
            format!("profile / parse p50: x{ratio:.2}; profile size {bytes} bytes"),
        ],
        json: json!({
            "jobs": a.jobs,
            "frames": frames.len(),
            "parse_us": parse,
            "profile_us": profile,
            "profile_over_parse_p50": ratio,
            "profile_bytes": bytes,
        }),
    })
}
