//! `gantry submit` and `gantry watch`: attachments, edits, outputs on disk, Ctrl+C
//! cancelling on the server, and detaching.

use super::{farm, run, sleep_graph, stderr, write};
use serde_json::{json, Value};
use std::process::Command;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_attach_uploads_the_file_and_names_it_in_the_input() {
    let farm = farm(&[]).await;
    let dir = tempfile::tempdir().unwrap();
    let graph = json!({
        "1": {"class_type": "LoadImage", "inputs": {"image": "placeholder.png"}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "att"}}
    });
    let file = write(dir.path(), "w.json", &graph);
    let png = gantry_sim::image::Picture::from_color(12, 10, 0x204060)
        .png()
        .unwrap();
    let face = dir.path().join("face.png");
    std::fs::write(&face, &png).unwrap();
    let out = dir.path().join("out");
    let o = run(farm.gantry(&[
        "submit",
        &file,
        "--attach",
        &format!("1.image={}", face.display()),
        "--out",
        out.to_str().unwrap(),
    ]))
    .await;
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let files: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    // The backend loaded the attached picture, not a placeholder.
    let got = gantry_sim::image::Picture::from_png(&std::fs::read(&files[0]).unwrap()).unwrap();
    assert_eq!(
        (got.width, got.height, got.rgb),
        (12, 10, [0x20, 0x40, 0x60])
    );

    let missing = dir.path().join("nope.png");
    let o = run(farm.gantry(&[
        "submit",
        &file,
        "--attach",
        &format!("9.image={}", face.display()),
    ]))
    .await;
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("--attach 9.image="), "{}", stderr(&o));
    assert!(stderr(&o).contains("has no node 9"), "{}", stderr(&o));
    let o = run(farm.gantry(&[
        "submit",
        &file,
        "--attach",
        &format!("1.image={}", missing.display()),
    ]))
    .await;
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("cannot read"), "{}", stderr(&o));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_watch_runs_to_success_with_edits_and_outputs_on_disk() {
    let farm = farm(&[]).await;
    let dir = tempfile::tempdir().unwrap();
    let file = write(dir.path(), "w.json", &sleep_graph(2.0, 4));
    let out = dir.path().join("out");
    let o = run(farm.gantry(&[
        "submit",
        &file,
        "--watch",
        "--out",
        out.to_str().unwrap(),
        "--set",
        "2.seed=77",
        "--set",
        "3.filename_prefix=edited",
        "--priority",
        "-2",
        "--timeout",
        "node_stall=1m",
    ]))
    .await;
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let id = String::from_utf8_lossy(&o.stdout).trim().to_owned();
    let err = stderr(&o);
    assert!(err.contains("dispatched to a"), "{err}");
    assert!(err.contains("step 4"), "progress is shown: {err}");
    assert!(err.contains(&format!("job {id} succeeded")), "{err}");
    let files: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    let png = std::fs::read(&files[0]).unwrap();
    assert!(png.starts_with(b"\x89PNG"));
    assert!(files[0]
        .file_name()
        .unwrap()
        .to_str()
        .unwrap()
        .starts_with("edited"));

    let job = farm.job(&id).await;
    assert_eq!(job["priority"], -2);
    assert_eq!(job["timeouts"]["node_stall_ms"], 60_000);
    // The backend ran the edited graph: a number stayed a number, a string a string.
    let prompt_id = job["attempts"][0]["prompt_id"].as_str().unwrap();
    let history: Value = farm
        .http
        .get(format!("{}/history/{prompt_id}", farm.sim.url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let graph = &history[prompt_id]["prompt"][2];
    assert_eq!(graph["2"]["inputs"]["seed"], 77);
    assert_eq!(graph["3"]["inputs"]["filename_prefix"], "edited");

    // show, jobs and outputs read the same job.
    let o = run(farm.gantry(&["show", &id, "--json"])).await;
    assert_eq!(o.status.code(), Some(0));
    let shown: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(shown["state"], "succeeded");
    let o = run(farm.gantry(&["jobs", "--state", "succeeded", "--json"])).await;
    let listed: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(listed[0]["id"], json!(id));
    let again = dir.path().join("again");
    let o = run(farm.gantry(&["outputs", &id, "--out", again.to_str().unwrap()])).await;
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(std::fs::read_dir(&again).unwrap().count(), 1);
    farm.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_during_watch_cancels_the_job_on_the_server() {
    let farm = farm(&[]).await;
    let dir = tempfile::tempdir().unwrap();
    let file = write(dir.path(), "w.json", &sleep_graph(600.0, 300));
    let (child, id) = farm.spawn_submit(&["submit", &file, "--watch"]).await;
    farm.wait_job(&id, "executing", |j| {
        j["attempts"][0]["status"] == "executing"
    })
    .await;
    let sent = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    let o = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
        .await
        .unwrap();
    assert_eq!(o.status.code(), Some(130), "{}", stderr(&o));
    assert!(
        stderr(&o).contains(&format!("job {id} cancelled")),
        "{}",
        stderr(&o)
    );
    let job = farm.job(&id).await;
    assert_eq!(job["state"], "cancelled", "{job:#}");
    // Down to the backend: nothing of it runs there any more.
    let queue: Value = farm
        .http
        .get(format!("{}/queue", farm.sim.url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(queue["queue_running"], json!([]), "{queue:#}");
    farm.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn detach_leaves_the_job_running_and_watch_follows_it_again() {
    let farm = farm(&[]).await;
    let dir = tempfile::tempdir().unwrap();
    let file = write(dir.path(), "w.json", &sleep_graph(20.0, 10));
    let (child, id) = farm
        .spawn_submit(&["submit", &file, "--watch", "--detach"])
        .await;
    farm.wait_job(&id, "executing", |j| {
        j["attempts"][0]["status"] == "executing"
    })
    .await;
    Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    let o = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
        .await
        .unwrap();
    assert_eq!(o.status.code(), Some(130), "{}", stderr(&o));
    assert!(stderr(&o).contains("left job"), "{}", stderr(&o));
    assert_eq!(farm.job(&id).await["cancel_requested"], false);
    let o = run(farm.gantry(&["watch", &id])).await;
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    farm.shutdown().await;
}
