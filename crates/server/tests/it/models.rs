//! A model no backend has is refused at submit (issue 24): when every backend's
//! `/object_info` is known and none offers the file a loader names, the submit is a 400
//! that names the node, the input, the value and the backends checked, and nothing is
//! stored. The lists are read again before refusing, so a file just installed counts; a
//! backend not read yet may have it, so the job is accepted and fails clearly later.

use crate::support::{assert_error, fixture, spawn_app, TestApp};
use gantry_server::{BackendConfig, Config, Server};
use serde_json::{json, Value};

fn txt2img(ckpt: &str) -> Value {
    let mut w = fixture("workflows/txt2img.json");
    w["4"]["inputs"]["ckpt_name"] = json!(ckpt);
    w
}

#[tokio::test]
async fn a_checkpoint_no_backend_offers_is_refused_at_submit_and_nothing_is_stored() {
    let app = spawn_app(2, |c| c.backends[1].tags = vec!["sdxl".into()]).await;
    app.wait_backends_idle().await;
    let answer = app
        .submit(&json!({"workflow": txt2img("nope.safetensors")}))
        .await;
    let error = assert_error(
        &answer,
        400,
        "missing_model",
        &[
            "node 4 (CheckpointLoaderSimple)",
            "input ckpt_name",
            "\"nope.safetensors\"",
            "a: does not offer",
            "b: does not offer",
        ],
    );
    assert_eq!(error["details"]["node"], "4");
    assert_eq!(error["details"]["input"], "ckpt_name");
    assert_eq!(error["details"]["value"], "nope.safetensors");
    assert_eq!(
        error["details"]["backends"]["a"],
        "does not offer \"nope.safetensors\" for node 4 input ckpt_name"
    );
    // Where a backend could not run the job anyway, its own reason is given.
    let answer = app
        .submit(&json!({"workflow": txt2img("nope.safetensors"), "tags": ["sdxl"]}))
        .await;
    let error = assert_error(&answer, 400, "missing_model", &["a: lacks tag sdxl"]);
    assert_eq!(error["details"]["backends"]["a"], "lacks tag sdxl");
    assert!(app.all_jobs().await.is_empty(), "nothing stored");

    // A model every backend has is accepted and runs.
    let id = app
        .submit_ok(&json!({"workflow": txt2img("v1-5-pruned-emaonly.safetensors")}))
        .await;
    assert_eq!(app.wait_terminal(&id).await["state"], "succeeded");
    app.shutdown().await;
}

/// The coordinator read `/object_info` at connect; the file was installed since. The
/// refusal is checked against a fresh read, so the job is accepted and runs there.
#[tokio::test]
async fn a_model_installed_since_the_backends_were_read_is_accepted() {
    let app = spawn_app(2, |_| {}).await;
    app.wait_backends_idle().await;
    app.sims[1].install_model("fresh.safetensors");
    let id = app
        .submit_ok(&json!({"workflow": txt2img("fresh.safetensors")}))
        .await;
    let job = app.wait_terminal(&id).await;
    assert_eq!(job["state"], "succeeded", "{job:#}");
    let backends: Vec<&str> = job["attempts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["backend"].as_str().unwrap())
        .collect();
    // a may have been tried first: it lacks the file (an exclusion, not a failure of
    // the job), and b runs it.
    assert_eq!(backends.last(), Some(&"b"), "{job:#}");
    app.shutdown().await;
}

/// No backend read yet: it may have the model, so the job is accepted. Once the backend
/// is read and refuses it, the job fails at once, naming what is missing where, and no
/// event ever announced a retry.
#[tokio::test]
async fn a_model_unknown_at_submit_fails_clearly_once_the_backend_is_read() {
    let sim = gantry_sim::spawn(crate::support::sim_config())
        .await
        .unwrap();
    sim.crash().await;
    let data = tempfile::tempdir().unwrap();
    let mut config = Config::new("127.0.0.1:0".parse().unwrap(), data.path().join("data"));
    config.backends = vec![BackendConfig::parse(&format!("a={}", sim.url())).unwrap()];
    let mut app = TestApp::attach(Server::start(config).await.unwrap());
    app.sims.push(sim);
    let id = app
        .submit_ok(&json!({"workflow": txt2img("nope.safetensors")}))
        .await;
    let job = app.get_job(&id).await;
    assert_eq!(job["state"], "queued", "{job:#}");
    app.sims[0].restart().await.unwrap();

    let job = app.wait_terminal(&id).await;
    assert_eq!(job["state"], "failed", "{job:#}");
    let error = &job["error"];
    assert_eq!(error["code"], "unroutable", "{job:#}");
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .contains("model \"nope.safetensors\" (node 4 input ckpt_name) not installed"),
        "{error:#}"
    );
    let events = app.read_sse(&id).await;
    let story: Vec<&str> = events.iter().map(|e| e.event.as_str()).collect();
    assert!(!story.contains(&"job_retrying"), "{story:?}");
    for e in events.iter().filter(|e| e.event == "attempt_failed") {
        assert_eq!(e.data["will_retry"], false, "{:?}", e.data);
    }
    assert_eq!(story.last(), Some(&"failed"), "{story:?}");
    app.shutdown().await;
}
