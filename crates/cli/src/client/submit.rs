//! `gantry submit`: a workflow file (or stdin) edited by `--set` and `--attach`, sent as
//! a job; with `--wait`, `--watch` or `--out`, followed to its end.

use super::opts::ServerOpts;
use super::watch::follow;
use super::{fail, USAGE};
use gantry_client::{Error, SubmitRequest};
use serde_json::{json, Map, Value};
use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(clap::Args, Debug)]
pub struct SubmitArgs {
    /// An API-format workflow (ComfyUI: Workflow > Export (API)), or - for stdin.
    workflow: String,
    #[command(flatten)]
    opts: ServerOpts,
    /// Higher runs first.
    #[arg(long, default_value_t = 0, allow_hyphen_values = true)]
    priority: i32,
    /// A tag the backend must have; repeatable.
    #[arg(long = "tag", value_name = "TAG")]
    tags: Vec<String>,
    /// The job's own limit for a phase (submit, start, first_progress, node_stall,
    /// deadline, queue), e.g. node_stall=2m; 0 disables it. Repeatable.
    #[arg(long = "timeout", value_name = "PHASE=DURATION")]
    timeouts: Vec<String>,
    /// Change an input before submitting, e.g. 3.seed=42 or 6.text="a red fox"; the
    /// value is JSON, or a string when it is not JSON. Repeatable.
    #[arg(long = "set", value_name = "NODE.INPUT=VALUE")]
    sets: Vec<String>,
    /// Attach an input file to the job and name it in a node's input, e.g.
    /// 1.image=face.png for a LoadImage: gantry uploads it to whichever backend runs the
    /// job. Repeatable.
    #[arg(long = "attach", value_name = "NODE.INPUT=PATH")]
    attach: Vec<String>,
    /// How many attempts the job may take.
    #[arg(long)]
    max_attempts: Option<u32>,
    /// Wait for the job to end, quietly.
    #[arg(long, conflicts_with = "watch")]
    wait: bool,
    /// Follow the job with live progress until it ends.
    #[arg(long)]
    watch: bool,
    /// On success, download the outputs into this folder (implies --wait).
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// On Ctrl+C, stop watching and leave the job running instead of cancelling it.
    #[arg(long)]
    detach: bool,
}

pub async fn run(a: SubmitArgs) -> Result<ExitCode, Error> {
    let mut body = match request_body(&a) {
        Ok(body) => body,
        Err(message) => return Ok(fail(USAGE, message)),
    };
    let files = match attachments(&a.attach, &mut body) {
        Ok(files) => files,
        Err(message) => return Ok(fail(USAGE, message)),
    };
    let client = a.opts.client()?;
    for (name, path, bytes) in files {
        let stored = match client.upload_file(bytes).await {
            Ok(stored) => stored,
            Err(Error::Api(r)) if r.status == 400 || r.status == 413 => {
                return Ok(fail(
                    USAGE,
                    format!("the server refused {}: {}", path.display(), r.message),
                ))
            }
            Err(e) => return Err(e),
        };
        body.attachments
            .push(gantry_client::wire::AttachmentRequest {
                name,
                sha256: Some(stored.sha256),
                data: None,
            });
    }
    let accepted = match client.submit(&body).await {
        Ok(accepted) => accepted,
        Err(Error::Api(r)) if r.status == 400 || r.status == 413 => {
            return Ok(fail(
                USAGE,
                format!("the server refused the job: {}", r.message),
            ))
        }
        Err(e) => return Err(e),
    };
    if a.opts.json() {
        println!("{}", json!(accepted));
    } else {
        println!("{}", accepted.id);
    }
    if !(a.wait || a.watch || a.out.is_some()) {
        return Ok(ExitCode::SUCCESS);
    }
    let nodes = body.workflow.len();
    Ok(follow(
        &client,
        &accepted.id,
        &a.opts,
        a.watch,
        nodes,
        a.out.as_deref(),
        a.detach,
        false,
    )
    .await)
}

/// The body of `POST /v1/jobs` from the arguments, or what is wrong with them.
fn request_body(a: &SubmitArgs) -> Result<SubmitRequest, String> {
    let (what, text) = if a.workflow == "-" {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .map_err(|e| format!("cannot read the workflow from stdin: {e}"))?;
        ("stdin".to_owned(), text)
    } else {
        let text = std::fs::read_to_string(&a.workflow)
            .map_err(|e| format!("cannot read {}: {e}", a.workflow))?;
        (a.workflow.clone(), text)
    };
    let mut workflow: Value =
        serde_json::from_str(&text).map_err(|e| format!("{what} is not JSON: {e}"))?;
    if workflow.get("nodes").is_some_and(Value::is_array) && workflow.get("links").is_some() {
        return Err(format!(
            "{what} is in ComfyUI's UI save format, not the API format gantry runs: \
             in ComfyUI, use Workflow > Export (API) (enable the dev mode options in the \
             settings if it is not shown) and submit that file"
        ));
    }
    let Some(graph) = workflow.as_object_mut() else {
        return Err(format!("{what}: a workflow is a JSON object of nodes"));
    };
    for set in &a.sets {
        apply_set(graph, set)?;
    }
    let workflow = std::mem::take(graph);
    let mut timeouts = Map::new();
    for t in &a.timeouts {
        let (phase, duration) = t
            .split_once('=')
            .ok_or_else(|| format!("--timeout {t}: write PHASE=DURATION, e.g. node_stall=2m"))?;
        const PHASES: [&str; 6] = [
            "submit",
            "start",
            "first_progress",
            "node_stall",
            "deadline",
            "queue",
        ];
        if !PHASES.contains(&phase) {
            return Err(format!(
                "--timeout {t}: no phase {phase:?} (phases: {})",
                PHASES.join(", ")
            ));
        }
        let ms = if duration.trim() == "0" {
            0
        } else {
            humantime::parse_duration(duration)
                .map_err(|e| format!("--timeout {t}: {e} (write durations like 30s, 5m)"))?
                .as_millis() as u64
        };
        timeouts.insert(format!("{phase}_ms"), json!(ms));
    }
    let timeouts = if timeouts.is_empty() {
        None
    } else {
        Some(
            serde_json::from_value(Value::Object(timeouts))
                .map_err(|e| format!("--timeout: {e}"))?,
        )
    };
    Ok(SubmitRequest {
        workflow,
        priority: Some(a.priority),
        max_attempts: a.max_attempts,
        tags: a.tags.clone(),
        timeouts,
        ..SubmitRequest::default()
    })
}

/// `--attach NODE.INPUT=PATH`: reads each file, names it in the workflow's input by its
/// file name (made unique), and answers (name, path, bytes) to upload.
fn attachments(
    specs: &[String],
    body: &mut SubmitRequest,
) -> Result<Vec<(String, PathBuf, Vec<u8>)>, String> {
    let mut out: Vec<(String, PathBuf, Vec<u8>)> = Vec::new();
    for spec in specs {
        let usage = || format!("--attach {spec}: write NODE.INPUT=PATH, e.g. 1.image=face.png");
        let (target, path) = spec.split_once('=').ok_or_else(usage)?;
        if !target.contains('.') || path.is_empty() {
            return Err(usage());
        }
        let path = PathBuf::from(path);
        let bytes = std::fs::read(&path)
            .map_err(|e| format!("--attach {spec}: cannot read {}: {e}", path.display()))?;
        let base = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "file".into());
        let mut name = base.clone();
        let mut n = 1;
        while out.iter().any(|(other, _, _)| *other == name) {
            n += 1;
            name = format!("{n}-{base}");
        }
        let value = serde_json::to_string(&name).map_err(|e| e.to_string())?;
        apply_set(&mut body.workflow, &format!("{target}={value}"))
            .map_err(|e| e.replacen("--set", "--attach", 1))?;
        out.push((name, path, bytes));
    }
    Ok(out)
}

/// `NODE.INPUT=VALUE` on the graph: the value is JSON, or a string when it is not.
fn apply_set(graph: &mut Map<String, Value>, set: &str) -> Result<(), String> {
    let (target, raw) = set
        .split_once('=')
        .ok_or_else(|| format!("--set {set}: write NODE.INPUT=VALUE, e.g. 3.seed=42"))?;
    let (node, input) = target
        .split_once('.')
        .ok_or_else(|| format!("--set {set}: write NODE.INPUT=VALUE, e.g. 3.seed=42"))?;
    if input.is_empty() {
        return Err(format!(
            "--set {set}: no input name after {node}. (write NODE.INPUT=VALUE, e.g. 3.seed=42)"
        ));
    }
    let value = serde_json::from_str(raw).unwrap_or_else(|_| Value::String(raw.to_owned()));
    let Some(entry) = graph.get_mut(node) else {
        let mut ids: Vec<&String> = graph.keys().collect();
        ids.sort();
        return Err(format!(
            "--set {set}: the workflow has no node {node} (its nodes: {})",
            ids.iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    };
    let Some(inputs) = entry.get_mut("inputs").and_then(Value::as_object_mut) else {
        return Err(format!("--set {set}: node {node} has no inputs object"));
    };
    inputs.insert(input.to_owned(), value);
    Ok(())
}

/// Property tests of `--set`: whatever the expression, it edits exactly the input it
/// names, or changes nothing and says what is wrong. `PROPTEST_CASES` asks for more.
#[cfg(test)]
mod fuzz {
    use super::*;
    use proptest::prelude::*;

    fn config(cases: u32) -> ProptestConfig {
        ProptestConfig {
            cases,
            rng_seed: proptest::test_runner::RngSeed::Fixed(24),
            failure_persistence: None,
            ..ProptestConfig::default()
        }
    }

    /// A real prompt, plus a node whose `inputs` is not an object.
    fn graph() -> Map<String, Value> {
        let text = include_str!("../../../../fixtures/comfyui/workflows/a_normal.json");
        let mut graph: Map<String, Value> = serde_json::from_str(text).unwrap_or_default();
        graph.insert("9".into(), json!({"class_type": "X", "inputs": [1]}));
        graph
    }

    /// Expressions near the right shape: ids that exist or not, inputs that exist,
    /// are new or empty, values that are JSON or not, and the separators in odd places.
    fn expression() -> impl Strategy<Value = String> {
        let node = prop_oneof![
            prop::sample::select(vec!["1", "2", "4", "9", "", "7", "2.1"]).prop_map(str::to_owned),
            "\\PC{0,4}",
        ];
        let input = prop_oneof![
            prop::sample::select(vec!["seed", "width", "", "new", "a.b", "a=b"])
                .prop_map(str::to_owned),
            "\\PC{0,6}",
        ];
        let value = prop_oneof![
            prop::sample::select(vec![
                "42",
                "-1",
                "1e400",
                "18446744073709551616",
                "\"text\"",
                "[\"1\", 0]",
                "{\"a\": 1}",
                "null",
                "",
                "=",
                "not json",
                "\"unterminated",
            ])
            .prop_map(str::to_owned),
            "\\PC{0,8}",
        ];
        prop_oneof![
            3 => (node, input, value).prop_map(|(n, i, v)| format!("{n}.{i}={v}")),
            1 => "\\PC{0,16}",
        ]
    }

    proptest! {
        #![proptest_config(config(512))]

        #[test]
        fn a_set_edits_the_input_it_names_or_nothing(set in expression()) {
            let before = graph();
            let mut after = before.clone();
            match apply_set(&mut after, &set) {
                Err(e) => {
                    prop_assert!(e.starts_with(&format!("--set {set}: ")), "{e}");
                    prop_assert_eq!(&after, &before, "a refused --set changed the graph");
                }
                Ok(()) => {
                    let (target, raw) = set.split_once('=').unwrap_or_default();
                    let (node, input) = target.split_once('.').unwrap_or_default();
                    prop_assert!(!input.is_empty());
                    let expect = serde_json::from_str(raw)
                        .unwrap_or_else(|_| Value::String(raw.to_owned()));
                    prop_assert_eq!(&after[node]["inputs"][input], &expect);
                    // Nothing else moved.
                    after[node]["inputs"]
                        .as_object_mut()
                        .map(|inputs| match before[node]["inputs"].get(input) {
                            Some(old) => inputs.insert(input.to_owned(), old.clone()),
                            None => inputs.remove(input),
                        });
                    prop_assert_eq!(&after, &before);
                }
            }
        }
    }

    /// Found by the property above: `3.=5` set an input named "" that no node has.
    #[test]
    fn an_empty_input_name_is_refused() {
        let mut g = graph();
        let e = apply_set(&mut g, "2.=5").unwrap_err();
        assert_eq!(
            e,
            "--set 2.=5: no input name after 2. (write NODE.INPUT=VALUE, e.g. 3.seed=42)"
        );
        assert_eq!(g, graph());
    }
}
