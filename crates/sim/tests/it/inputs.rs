//! Input files as ComfyUI takes them (PROTOCOL.md section 9): `POST /upload/image` puts a
//! file in the input folder, LoadImage and LoadAudio validate the names they are given,
//! `/view?type=input` serves the file back.

use crate::smoke::until_end;
use gantry_comfy::client::Submitted;
use gantry_comfy::rest::{FileRef, Outcome, PromptRequest};
use gantry_comfy::Client;
use gantry_sim::image::Picture;
use gantry_sim::{spawn, SimConfig};
use serde_json::{json, Map, Value};

fn graph(v: Value) -> Map<String, Value> {
    v.as_object().cloned().unwrap()
}

fn img2img(image: &str) -> Map<String, Value> {
    graph(json!({
        "1": {"class_type": "LoadImage", "inputs": {"image": image}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "i2i"}},
    }))
}

async fn fast_sim() -> gantry_sim::SimHandle {
    spawn(SimConfig {
        speed: 50.0,
        ..Default::default()
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn an_uploaded_image_is_loaded_by_name_and_served_from_the_input_folder() {
    let sim = fast_sim().await;
    let client = Client::new(&sim.url()).unwrap();
    let png = Picture::from_color(24, 16, 0x102030).png().unwrap();
    let at = client
        .upload("face.png", png.clone().into(), "gantry", true)
        .await
        .unwrap();
    assert_eq!(
        at,
        FileRef {
            filename: "face.png".into(),
            subfolder: "gantry".into(),
            kind: "input".into()
        }
    );
    assert_eq!(client.view(&at).await.unwrap().as_ref(), png.as_slice());

    let mut session = client.connect(false).await.unwrap();
    let req = PromptRequest {
        prompt: img2img("gantry/face.png"),
        client_id: Some(session.client_id().to_string()),
        ..Default::default()
    };
    let Submitted::Accepted(accepted) = client.submit(&req).await.unwrap() else {
        panic!("an uploaded file must validate");
    };
    until_end(&mut session, &accepted.prompt_id).await;
    let entry = client
        .history_of(&accepted.prompt_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(entry.outcome(), Outcome::Success);
    let out = client.view(&entry.files()[0]).await.unwrap();
    // LoadImage read the uploaded picture: its size, its colour inverted.
    let got = Picture::from_png(&out).unwrap();
    assert_eq!(
        (got.width, got.height, got.rgb),
        (24, 16, [0xef, 0xdf, 0xcf])
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn a_file_the_server_does_not_have_fails_custom_validation_naming_it() {
    let sim = fast_sim().await;
    let client = Client::new(&sim.url()).unwrap();
    let req = PromptRequest {
        prompt: img2img("gantry/nowhere.png"),
        ..Default::default()
    };
    let Submitted::Rejected(r) = client.submit(&req).await.unwrap() else {
        panic!("a missing input file must be refused");
    };
    assert_eq!(r.error.kind, "prompt_outputs_failed_validation");
    let e = &r.node_errors["1"].errors[0];
    assert_eq!(e.kind, "custom_validation_failed");
    assert_eq!(e.details, "image - Invalid image file: gantry/nowhere.png");

    let audio = graph(json!({
        "1": {"class_type": "LoadAudio", "inputs": {"audio": "clip.wav"}},
        "2": {"class_type": "SaveAudio", "inputs": {"audio": ["1", 0], "filename_prefix": "audio/ComfyUI"}},
    }));
    let Submitted::Rejected(r) = client
        .submit(&PromptRequest {
            prompt: audio,
            ..Default::default()
        })
        .await
        .unwrap()
    else {
        panic!("a missing audio file must be refused");
    };
    assert_eq!(
        r.node_errors["1"].errors[0].details,
        "audio - Invalid audio file: clip.wav"
    );
    assert!(client.queue().await.unwrap().queue_pending.is_empty());
    sim.shutdown().await;
}

#[tokio::test]
async fn uploading_again_keeps_identical_bytes_and_renames_different_ones_unless_overwrite() {
    let sim = fast_sim().await;
    let client = Client::new(&sim.url()).unwrap();
    let a = bytes::Bytes::from_static(b"first");
    let b = bytes::Bytes::from_static(b"second");
    let name = |f: FileRef| f.filename;
    assert_eq!(
        name(client.upload("x.png", a.clone(), "", false).await.unwrap()),
        "x.png"
    );
    assert_eq!(
        name(client.upload("x.png", a.clone(), "", false).await.unwrap()),
        "x.png"
    );
    assert_eq!(
        name(client.upload("x.png", b.clone(), "", false).await.unwrap()),
        "x (1).png"
    );
    assert_eq!(
        name(client.upload("x.png", b.clone(), "", true).await.unwrap()),
        "x.png"
    );
    let x = FileRef {
        filename: "x.png".into(),
        subfolder: String::new(),
        kind: "input".into(),
    };
    assert_eq!(client.view(&x).await.unwrap(), b);
    // /object_info lists the input folder's own files for LoadImage's combo.
    let info = client.object_info().await.unwrap();
    assert_eq!(
        info["LoadImage"]["input"]["required"]["image"][0],
        json!(["x (1).png", "x.png"])
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn an_upload_that_would_land_outside_the_input_folder_is_refused() {
    let sim = fast_sim().await;
    let http = reqwest::Client::new();
    let form = reqwest::multipart::Form::new()
        .part(
            "image",
            reqwest::multipart::Part::bytes(b"x".to_vec()).file_name("evil.png"),
        )
        .text("subfolder", "../../etc");
    let resp = http
        .post(format!("{}/upload/image", sim.url()))
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let no_file = reqwest::multipart::Form::new().text("subfolder", "a");
    let resp = http
        .post(format!("{}/upload/image", sim.url()))
        .multipart(no_file)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400, "a form without an image is a 400");
    sim.shutdown().await;
}

#[tokio::test]
async fn an_audio_file_goes_through_load_audio_and_save_audio_as_an_audio_output() {
    let sim = fast_sim().await;
    let client = Client::new(&sim.url()).unwrap();
    let wav = bytes::Bytes::from_static(b"RIFF\x24\x00\x00\x00WAVEfmt ");
    client
        .upload("clip.wav", wav.clone(), "", true)
        .await
        .unwrap();
    let mut session = client.connect(false).await.unwrap();
    let req = PromptRequest {
        prompt: graph(json!({
            "1": {"class_type": "LoadAudio", "inputs": {"audio": "clip.wav"}},
            "2": {"class_type": "SaveAudio", "inputs": {"audio": ["1", 0], "filename_prefix": "audio/ComfyUI"}},
        })),
        client_id: Some(session.client_id().to_string()),
        ..Default::default()
    };
    let Submitted::Accepted(accepted) = client.submit(&req).await.unwrap() else {
        panic!("rejected");
    };
    until_end(&mut session, &accepted.prompt_id).await;
    let entry = client
        .history_of(&accepted.prompt_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(entry.outputs["2"]["audio"][0]["subfolder"], "audio");
    let name = entry.outputs["2"]["audio"][0]["filename"].as_str().unwrap();
    assert_eq!(name, "ComfyUI_00001_.flac");
    let file = FileRef {
        filename: name.into(),
        subfolder: "audio".into(),
        kind: "output".into(),
    };
    assert_eq!(client.view(&file).await.unwrap(), wav);
    sim.shutdown().await;
}
