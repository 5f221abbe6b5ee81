//! Exit codes and messages: bad input and an unreachable server (2), a failed job (1),
//! cancel, retry and a drain waited out; completion scripts.

use super::{farm, run, sleep_graph, stderr, write};
use serde_json::{json, Value};
use std::process::{Command, Stdio};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_and_an_unreachable_server_exit_2_with_a_clear_message() {
    let farm = farm(&[]).await;
    let dir = tempfile::tempdir().unwrap();
    let ui_format = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../fixtures/workflows/ui-format-example.json"
    ))
    .unwrap();
    let ui = dir.path().join("ui.json");
    std::fs::write(&ui, ui_format).unwrap();
    let not_json = dir.path().join("bad.json");
    std::fs::write(&not_json, "{ nope").unwrap();
    let good = write(dir.path(), "w.json", &sleep_graph(1.0, 1));
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec!["submit".into(), ui.display().to_string()],
            "Export (API)",
        ),
        (
            vec!["submit".into(), not_json.display().to_string()],
            "is not JSON",
        ),
        (
            vec!["submit".into(), "/nonexistent/w.json".into()],
            "cannot read /nonexistent/w.json",
        ),
        (
            vec![
                "submit".into(),
                good.clone(),
                "--set".into(),
                "9.seed=1".into(),
            ],
            "no node 9 (its nodes: 1, 2, 3)",
        ),
        (
            vec![
                "submit".into(),
                good.clone(),
                "--timeout".into(),
                "warmup=5s".into(),
            ],
            "no phase \"warmup\"",
        ),
        (
            vec![
                "submit".into(),
                good.clone(),
                "--timeout".into(),
                "start=soon".into(),
            ],
            "--timeout start=soon",
        ),
        (
            vec![
                "submit".into(),
                good.clone(),
                "--priority".into(),
                "x".into(),
            ],
            "--priority",
        ),
    ];
    for (args, needle) in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let o = run(farm.gantry(&args)).await;
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
        assert!(stderr(&o).contains(needle), "{args:?}: {}", stderr(&o));
    }
    // Nothing was submitted by any of them.
    let o = run(farm.gantry(&["jobs", "--json"])).await;
    assert_eq!(
        serde_json::from_slice::<Value>(&o.stdout).unwrap(),
        json!([])
    );
    // A workflow from stdin, refused by the server for a class no backend has.
    let mut c = farm.gantry(&["submit", "-"]);
    c.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c.spawn().unwrap();
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        stdin
            .write_all(br#"{"1": {"class_type": "NoSuchNode", "inputs": {}}}"#)
            .unwrap();
    }
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("NoSuchNode"), "{}", stderr(&o));

    let mut c = farm.gantry(&["jobs"]);
    c.env("GANTRY_SERVER", "http://127.0.0.1:1");
    let o = run(c).await;
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("cannot reach gantry at http://127.0.0.1:1"),
        "{}",
        stderr(&o)
    );
    farm.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_job_exits_1_and_queued_jobs_cancel_retry_and_wait_out_a_drain() {
    let farm = farm(&["error:class=GantrySleep"]).await;
    let dir = tempfile::tempdir().unwrap();
    let file = write(dir.path(), "w.json", &sleep_graph(1.0, 1));
    let o = run(farm.gantry(&["submit", &file, "--wait", "--max-attempts", "1"])).await;
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("failed"), "{}", stderr(&o));
    // With the backend hung on a first job, a second waits in gantry's queue; a
    // cancel ends it at once.
    farm.sim.set_faults(&["hang-before-start"]).unwrap();
    let o = run(farm.gantry(&["submit", &file])).await;
    let first = String::from_utf8_lossy(&o.stdout).trim().to_owned();
    farm.wait_job(&first, "pending on the hung backend", |j| {
        j["phase"] == "pending"
    })
    .await;
    let o = run(farm.gantry(&["submit", &file])).await;
    let id = String::from_utf8_lossy(&o.stdout).trim().to_owned();
    assert_eq!(farm.job(&id).await["state"], "queued");
    let o = run(farm.gantry(&["cancel", &id])).await;
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        format!("{id}: cancelled")
    );
    assert_eq!(farm.job(&id).await["state"], "cancelled");
    let o = run(farm.gantry(&["watch", &id])).await;
    assert_eq!(o.status.code(), Some(130));
    // The backends table names the hung backend busy with the first job.
    let o = run(farm.gantry(&["backends"])).await;
    let table = String::from_utf8_lossy(&o.stdout).into_owned();
    let row = table
        .lines()
        .find(|l| l.starts_with("a "))
        .unwrap_or_default();
    assert!(row.contains("busy") && row.contains(&first), "{table}");
    let o = run(farm.gantry(&["backends", "--json"])).await;
    let list: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(list["backends"][0]["name"], "a");
    // Mended, the backend runs the first job; then drained, it takes nothing new: the
    // retried job below waits until it is resumed. Unknown backends are refused.
    farm.sim.set_faults(&[]).unwrap();
    farm.wait_job(&first, "the first job ends", |j| j["state"] == "succeeded")
        .await;
    let o = run(farm.gantry(&["backends", "drain", "a"])).await;
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "a: drained");
    let o = run(farm.gantry(&["backends", "drain", "zz"])).await;
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("no backend zz"), "{}", stderr(&o));
    // Retry makes a new job of the cancelled one's request.
    let o = run(farm.gantry(&["retry", &id, "--json"])).await;
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let retried: Value = serde_json::from_slice(&o.stdout).unwrap();
    let new_id = retried["id"].as_str().unwrap();
    assert_ne!(new_id, id);
    assert_eq!(retried["retry_of"], json!(id));
    let again = farm.job(new_id).await;
    let before = farm.job(&id).await;
    assert_eq!(again["workflow_hash"], before["workflow_hash"]);
    assert_eq!(again["max_attempts"], before["max_attempts"]);
    let o = run(farm.gantry(&["backends", "--json"])).await;
    let list: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(list["backends"][0]["status"], "drained", "{list:#}");
    assert_eq!(farm.job(new_id).await["state"], "queued");
    let o = run(farm.gantry(&["backends", "resume", "a"])).await;
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let o = run(farm.gantry(&["watch", new_id])).await;
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(
        farm.job(new_id).await["attempts"].as_array().unwrap().len(),
        1
    );
    farm.shutdown().await;
}

#[test]
fn completions_are_printed_for_each_shell() {
    for shell in ["bash", "zsh", "fish"] {
        let o = Command::new(env!("CARGO_BIN_EXE_gantry"))
            .args(["completions", shell])
            .output()
            .unwrap();
        assert!(o.status.success(), "{shell}");
        let script = String::from_utf8_lossy(&o.stdout);
        assert!(
            script.contains("submit") && script.contains("watch-timeout"),
            "{shell}"
        );
    }
    let o = Command::new(env!("CARGO_BIN_EXE_gantry"))
        .args(["completions", "tcsh"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
}
