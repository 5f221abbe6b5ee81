//! Backends added at run time (`POST /v1/backends`): they take work at once, bad ones
//! are refused naming what is wrong and change nothing, and they are kept across a
//! restart (and, in a farm, seen by every coordinator: see postgres.rs).

use crate::support::{assert_error, poll_until, sim_config, tiny_workflow, TestApp};
use gantry_server::{BackendConfig, Config, Server};
use serde_json::{json, Value};
use std::time::Duration;

async fn post(app: &TestApp, path: &str, body: Value) -> (u16, Value) {
    let r = app
        .http
        .post(format!("{}{path}", app.url))
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// Waits until backend `name` is idle; answers it.
pub async fn wait_idle(app: &TestApp, name: &str) -> Value {
    poll_until(
        "the backend is idle",
        Duration::from_secs(10),
        Duration::from_millis(20),
        || async {
            let list = app.get_json("/v1/backends").await;
            let b = list["backends"]
                .as_array()
                .and_then(|l| l.iter().find(|b| b["name"] == name).cloned());
            match b {
                Some(b) if b["status"] == "idle" => Ok(b),
                _ => Err(list),
            }
        },
    )
    .await
}

#[tokio::test]
async fn a_backend_added_at_run_time_takes_work_and_is_kept_across_a_restart() {
    let first = gantry_sim::spawn(sim_config()).await.unwrap();
    let late = gantry_sim::spawn(sim_config()).await.unwrap();
    let data = tempfile::tempdir().unwrap();
    let config = || {
        let mut c = Config::new("127.0.0.1:0".parse().unwrap(), data.path().join("d"));
        c.backends = vec![BackendConfig::parse(&format!("a={}", first.url())).unwrap()];
        c
    };
    let app = TestApp::attach(Server::start(config()).await.unwrap());
    wait_idle(&app, "a").await;

    let (status, added) = post(
        &app,
        "/v1/backends",
        json!({"url": late.url(), "name": "late", "tags": ["big"], "priority": 2}),
    )
    .await;
    assert_eq!(status, 201, "{added:#}");
    assert_eq!(
        (&added["name"], &added["tags"], &added["priority"]),
        (&json!("late"), &json!(["big"]), &json!(2))
    );
    wait_idle(&app, "late").await;
    // Only it has the tag: the job runs there.
    let id = app
        .submit_ok(&json!({"workflow": tiny_workflow("late"), "tags": ["big"]}))
        .await;
    let job = app.wait_terminal(&id).await;
    assert_eq!(job["state"], "succeeded", "{job:#}");
    assert_eq!(job["attempts"][0]["backend"], "late");

    // Refusals name what is wrong and add nothing.
    let again = post(
        &app,
        "/v1/backends",
        json!({"url": late.url(), "name": "late"}),
    )
    .await;
    assert_error(&again, 409, "backend_exists", &["name", "late"]);
    let same_url = post(
        &app,
        "/v1/backends",
        json!({"url": late.url(), "name": "other"}),
    )
    .await;
    assert_error(&same_url, 409, "backend_exists", &["URL", "late"]);
    let config_name = post(
        &app,
        "/v1/backends",
        json!({"url": "http://127.0.0.1:9", "name": "a"}),
    )
    .await;
    assert_error(&config_name, 409, "backend_exists", &["name", "a"]);
    let ftp = post(&app, "/v1/backends", json!({"url": "ftp://10.0.0.1/"})).await;
    assert_error(&ftp, 400, "invalid_backend", &["http:// or https://"]);
    let typo = post(
        &app,
        "/v1/backends",
        json!({"url": "http://10.0.0.1:8188", "tag": ["x"]}),
    )
    .await;
    assert_error(&typo, 400, "invalid_request", &["unknown field `tag`"]);
    let empty_tag = post(
        &app,
        "/v1/backends",
        json!({"url": "http://10.0.0.1:8188", "tags": [""]}),
    )
    .await;
    assert_error(&empty_tag, 400, "invalid_field", &["tags"]);
    let names: Vec<String> = app.get_json("/v1/backends").await["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(names, ["a", "late"]);
    let TestApp { server, .. } = app;
    server.shutdown().await;

    // After a restart with the same configuration, it is still there and still works.
    let app = TestApp::attach(Server::start(config()).await.unwrap());
    let b = wait_idle(&app, "late").await;
    assert_eq!(b["tags"], json!(["big"]));
    let id = app
        .submit_ok(&json!({"workflow": tiny_workflow("late2"), "tags": ["big"]}))
        .await;
    assert_eq!(
        app.wait_terminal(&id).await["attempts"][0]["backend"],
        "late"
    );
    app.shutdown().await;
    first.shutdown().await;
    late.shutdown().await;
}
