//! Jobs that carry their own input files: stored once by content, uploaded through each
//! backend's own `POST /upload/image` before each attempt, named in the workflow by the
//! name the backend answered; refused at submit when missing or too large.

use crate::support::{assert_error, sim_config, spawn_app, spawn_app_with};
use base64::Engine as _;
use gantry_sim::image::Picture;
use serde_json::{json, Value};

fn img2img(name: &str) -> Value {
    json!({
        "1": {"class_type": "LoadImage", "inputs": {"image": name}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "i2i"}}
    })
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

async fn post_file(app: &crate::support::TestApp, bytes: Vec<u8>) -> (u16, Value) {
    let r = app
        .http
        .post(format!("{}/v1/files", app.url))
        .body(bytes)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap())
}

/// The bytes a simulator has in its input folder under `value` (`sub/name`).
async fn sim_input(app: &crate::support::TestApp, sim: usize, value: &str) -> Option<Vec<u8>> {
    let (sub, name) = value.rsplit_once('/').unwrap_or(("", value));
    let r = app
        .http
        .get(format!("{}/view", app.sims[sim].url()))
        .query(&[("type", "input"), ("subfolder", sub), ("filename", name)])
        .send()
        .await
        .unwrap();
    (r.status() == 200).then_some(r.bytes().await.unwrap().to_vec())
}

#[tokio::test]
async fn an_attachment_is_uploaded_to_each_backend_an_attempt_runs_on() {
    let app = spawn_app(2, |c| {
        c.backends[0].priority = 10;
        c.backoff_base = std::time::Duration::from_millis(10);
    })
    .await;
    // a runs out of memory once the prompt runs, after the upload: the retry goes to b.
    app.sims[0].set_faults(&["oom"]).unwrap();
    let png = Picture::from_color(24, 16, 0x102030).png().unwrap();
    let (status, stored) = post_file(&app, png.clone()).await;
    assert_eq!(status, 201, "{stored:#}");
    assert_eq!(stored["size"], png.len());
    let sha = stored["sha256"].as_str().unwrap().to_owned();

    let id = app
        .submit_ok(&json!({
            "workflow": img2img("face.png"),
            "attachments": [{"name": "face.png", "sha256": sha}],
        }))
        .await;
    let job = app.wait_terminal(&id).await;
    assert_eq!(job["state"], "succeeded", "{job:#}");
    let backends: Vec<&str> = job["attempts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["backend"].as_str().unwrap())
        .collect();
    assert_eq!(backends, ["a", "b"], "{job:#}");
    assert_eq!(job["attempts"][0]["error"]["code"], "out_of_memory");
    assert_eq!(
        job["attachments"],
        json!([{"name": "face.png", "sha256": sha, "size": png.len()}])
    );
    // Neither backend had the file before; each got it under a name made from its hash.
    let value = format!("gantry/{}-face.png", &sha[..16]);
    assert_eq!(sim_input(&app, 0, &value).await.as_deref(), Some(&png[..]));
    assert_eq!(sim_input(&app, 1, &value).await.as_deref(), Some(&png[..]));
    // b ran the workflow on the uploaded picture: its size, its colour inverted.
    let url = job["outputs"][0]["url"].as_str().unwrap();
    let out = app
        .http
        .get(format!("{}{url}", app.url))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let pic = Picture::from_png(&out).unwrap();
    assert_eq!(
        (pic.width, pic.height, pic.rgb),
        (24, 16, [0xef, 0xdf, 0xcf])
    );
    // The request as accepted names the file by hash, ready to submit again.
    let request = app.get_json(&format!("/v1/jobs/{id}/request")).await;
    assert_eq!(
        request["attachments"],
        json!([{"name": "face.png", "sha256": sha}])
    );
    app.shutdown().await;
}

#[tokio::test]
async fn an_inline_attachment_is_stored_like_an_uploaded_one() {
    let app = spawn_app(1, |_| {}).await;
    let png = Picture::from_color(8, 8, 0xffffff).png().unwrap();
    let id = app
        .submit_ok(&json!({
            "workflow": img2img("white.png"),
            "attachments": [{"name": "white.png", "data": b64(&png)}],
        }))
        .await;
    let job = app.wait_terminal(&id).await;
    assert_eq!(job["state"], "succeeded", "{job:#}");
    // Uploading the same bytes answers the hash the inline copy was stored under.
    let (status, stored) = post_file(&app, png.clone()).await;
    assert_eq!(status, 201);
    assert_eq!(job["attachments"][0]["sha256"], stored["sha256"]);
    // And a multipart form gives the same hash too.
    let form = reqwest::multipart::Form::new().part(
        "file",
        reqwest::multipart::Part::bytes(png.clone()).file_name("white.png"),
    );
    let r = app
        .http
        .post(format!("{}/v1/files", app.url))
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let multipart: Value = r.json().await.unwrap();
    assert_eq!(multipart["sha256"], stored["sha256"]);
    app.shutdown().await;
}

#[tokio::test]
async fn a_missing_unused_or_oversized_attachment_is_refused_with_no_job() {
    let app = spawn_app(1, |c| c.max_attachment_bytes = 1000).await;
    let unknown = "ab".repeat(32);
    let refused = app
        .submit(&json!({
            "workflow": img2img("face.png"),
            "attachments": [{"name": "face.png", "sha256": unknown}],
        }))
        .await;
    assert_error(
        &refused,
        400,
        "missing_attachment",
        &["face.png", &unknown, "POST /v1/files"],
    );
    let refused = app
        .submit(&json!({
            "workflow": img2img("face.png"),
            "attachments": [{"name": "other.png", "data": b64(b"x")}],
        }))
        .await;
    assert_error(&refused, 400, "unused_attachment", &["other.png"]);
    let refused = app
        .submit(&json!({
            "workflow": img2img("face.png"),
            "attachments": [{"name": "face.png", "data": b64(&[7u8; 1001])}],
        }))
        .await;
    assert_error(
        &refused,
        413,
        "attachment_too_large",
        &["1001 bytes", "1000"],
    );
    let refused = app
        .submit(&json!({
            "workflow": img2img("face.png"),
            "attachments": [{"name": "face.png"}],
        }))
        .await;
    assert_error(
        &refused,
        400,
        "invalid_field",
        &["attachments[0]", "exactly one of sha256 and data"],
    );
    let refused = app
        .submit(&json!({
            "workflow": img2img("../face.png"),
            "attachments": [{"name": "../face.png", "data": b64(b"x")}],
        }))
        .await;
    assert_error(&refused, 400, "invalid_field", &["without /"]);
    let (status, body) = post_file(&app, vec![1u8; 1001]).await;
    assert_eq!(
        (status, &body["error"]["code"]),
        (413, &json!("attachment_too_large")),
        "{body:#}"
    );
    let (status, body) = post_file(&app, Vec::new()).await;
    assert_eq!(
        (status, &body["error"]["code"]),
        (400, &json!("empty_file")),
        "{body:#}"
    );
    assert!(
        app.all_jobs().await.is_empty(),
        "no refused submit made a job"
    );
    app.shutdown().await;
}

#[tokio::test]
async fn a_workflow_naming_a_file_no_backend_has_fails_as_a_missing_attachment() {
    let app = spawn_app(2, |_| {}).await;
    let id = app
        .submit_ok(&json!({"workflow": img2img("nowhere.png")}))
        .await;
    let job = app.wait_terminal(&id).await;
    assert_eq!(job["state"], "failed", "{job:#}");
    assert_eq!(job["error"]["code"], "missing_attachment", "{job:#}");
    let message = job["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("node 1 (LoadImage) input image: nowhere.png"),
        "{message}"
    );
    assert!(message.contains("--attach 1.image=PATH"), "{message}");
    // Not a missing model: one attempt, no backend excluded.
    assert_eq!(job["attempts"].as_array().unwrap().len(), 1, "{job:#}");
    assert_eq!(job["excluded"], json!([]));
    app.shutdown().await;
}

#[tokio::test]
async fn an_audio_output_is_collected_and_served_with_its_content_type() {
    let app = spawn_app(1, |_| {}).await;
    let wav = b"RIFF\x24\x00\x00\x00WAVEfmt \x10\x00\x00\x00".to_vec();
    let id = app
        .submit_ok(&json!({
            "workflow": {
                "1": {"class_type": "LoadAudio", "inputs": {"audio": "clip.wav"}},
                "2": {"class_type": "SaveAudio", "inputs": {"audio": ["1", 0], "filename_prefix": "audio/ComfyUI"}}
            },
            "attachments": [{"name": "clip.wav", "data": b64(&wav)}],
        }))
        .await;
    let job = app.wait_terminal(&id).await;
    assert_eq!(job["state"], "succeeded", "{job:#}");
    let out = &job["outputs"][0];
    assert_eq!(out["filename"], "ComfyUI_00001_.flac");
    assert_eq!(out["subfolder"], "audio");
    assert_eq!(out["content_type"], "audio/flac");
    let r = app
        .http
        .get(format!("{}{}", app.url, out["url"].as_str().unwrap()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["content-type"], "audio/flac");
    assert_eq!(r.bytes().await.unwrap().as_ref(), &wav[..]);
    app.shutdown().await;
}

#[tokio::test]
async fn a_backend_that_cannot_take_the_upload_is_skipped_for_another() {
    // On a, the input subfolder gantry uploads into is a file: its upload route fails
    // (500), as a full disk would.
    let broken = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(broken.path().join("input")).unwrap();
    std::fs::write(broken.path().join("input/gantry"), b"not a folder").unwrap();
    let a = gantry_sim::SimConfig {
        data_dir: Some(broken.path().to_path_buf()),
        ..sim_config()
    };
    let app = spawn_app_with(vec![a, sim_config()], |c| {
        c.backends[0].priority = 10;
        c.backoff_base = std::time::Duration::from_millis(10);
    })
    .await;
    let png = Picture::from_color(4, 4, 0x00ff00).png().unwrap();
    let id = app
        .submit_ok(&json!({
            "workflow": img2img("g.png"),
            "attachments": [{"name": "g.png", "data": b64(&png)}],
        }))
        .await;
    let job = app.wait_terminal(&id).await;
    assert_eq!(job["state"], "succeeded", "{job:#}");
    assert_eq!(job["attempts"][0]["backend"], "a");
    assert_eq!(
        job["attempts"][0]["error"]["code"], "attachment_upload_failed",
        "{job:#}"
    );
    assert!(
        job["attempts"][0]["error"]["message"]
            .as_str()
            .unwrap()
            .contains("g.png"),
        "{job:#}"
    );
    assert_eq!(job["attempts"][1]["backend"], "b");
    app.shutdown().await;
}
