//! Webhooks against a local receiver: signed, retried after a failure, logged on the job,
//! never in dispatch's way; refused at submit when the URL's host is not allowed.

use crate::support::{
    assert_error, poll_until, sim_config, sleep_workflow, spawn_app, tiny_workflow, TestApp,
};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use gantry_server::config::{BackendConfig, Config};
use gantry_server::Server;
use serde_json::{json, Value};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Semaphore;

/// One POST the receiver got.
#[derive(Clone, Debug)]
struct Got {
    headers: HeaderMap,
    body: Vec<u8>,
}

#[derive(Clone)]
struct Receiver {
    got: Arc<Mutex<Vec<Got>>>,
    /// Answers 500 to this many requests first.
    fail_first: Arc<Mutex<usize>>,
    /// Each answer waits for a permit: the test decides when the receiver answers.
    gate: Arc<Semaphore>,
    url: String,
}

impl Receiver {
    async fn start(fail_first: usize, open: bool) -> Receiver {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        let gate = Arc::new(Semaphore::new(if open {
            Semaphore::MAX_PERMITS
        } else {
            0
        }));
        let r = Receiver {
            got: Arc::default(),
            fail_first: Arc::new(Mutex::new(fail_first)),
            gate,
            url,
        };
        let app = axum::Router::new()
            .route("/hook", post(hook))
            .with_state(r.clone());
        tokio::spawn(async move { axum::serve(listener, app).await });
        r
    }

    fn got(&self) -> Vec<Got> {
        self.got.lock().unwrap().clone()
    }
}

async fn hook(
    State(r): State<Receiver>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> StatusCode {
    r.got.lock().unwrap().push(Got {
        headers,
        body: body.to_vec(),
    });
    let _permit = r.gate.acquire().await.unwrap();
    let mut fail = r.fail_first.lock().unwrap();
    if *fail > 0 {
        *fail -= 1;
        StatusCode::INTERNAL_SERVER_ERROR
    } else {
        StatusCode::NO_CONTENT
    }
}

fn hmac_hex(secret: &str, body: &[u8]) -> String {
    use hmac::Mac;
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

#[tokio::test]
async fn a_webhook_is_signed_retried_after_a_500_and_every_attempt_logged_on_the_job() {
    let app = spawn_app(1, |c| c.callbacks.backoff = Duration::from_millis(20)).await;
    let receiver = Receiver::start(1, true).await;
    let id = app
        .submit_ok(&json!({
            "workflow": tiny_workflow("hooked"),
            "metadata": {"order": 7},
            "callback": {"url": receiver.url, "secret": "s3cret"},
        }))
        .await;
    let job = app.wait_terminal(&id).await;
    assert_eq!(job["state"], "succeeded", "{job:#}");
    assert_eq!(
        job["callback"],
        json!({"url": receiver.url, "events": ["succeeded", "failed", "cancelled"], "signed": true, "default": false})
    );
    let deliveries = poll_until(
        "two delivery attempts on the job",
        Duration::from_secs(10),
        Duration::from_millis(20),
        || async {
            let job = app.get_job(&id).await;
            let d = job["deliveries"].as_array().cloned().unwrap_or_default();
            if d.len() == 2 {
                Ok(d)
            } else {
                Err(d)
            }
        },
    )
    .await;
    assert_eq!(deliveries[0]["status"], 500);
    assert_eq!(deliveries[0]["delivered"], false);
    assert_eq!(deliveries[0]["final"], false);
    assert!(deliveries[0]["error"].as_str().unwrap().contains("500"));
    assert_eq!(deliveries[1]["status"], 204);
    assert_eq!(deliveries[1]["delivered"], true);
    assert_eq!(deliveries[1]["final"], true);
    assert_eq!(deliveries[0]["delivery_id"], deliveries[1]["delivery_id"]);
    assert_eq!(
        (
            deliveries[0]["attempt"].clone(),
            deliveries[1]["attempt"].clone()
        ),
        (json!(1), json!(2))
    );

    let got = receiver.got();
    assert_eq!(got.len(), 2, "one failed attempt, one retry");
    for g in &got {
        assert_eq!(g.body, got[0].body, "the retry sends the same body");
        assert_eq!(
            g.headers["x-gantry-signature"],
            hmac_hex("s3cret", &g.body).as_str()
        );
        assert_eq!(g.headers["x-gantry-event"], "succeeded");
        assert_eq!(
            g.headers["x-gantry-delivery"],
            deliveries[0]["delivery_id"].as_str().unwrap()
        );
        assert_eq!(g.headers["content-type"], "application/json");
    }
    assert_ne!(
        got[0].headers["x-gantry-signature"],
        hmac_hex("other", &got[0].body).as_str()
    );
    let body: Value = serde_json::from_slice(&got[0].body).unwrap();
    assert_eq!(body["job_id"], id.as_str());
    assert_eq!(body["state"], "succeeded");
    assert_eq!(body["metadata"], json!({"order": 7}));
    assert!(body["timings"]["total_ms"].is_i64(), "{body:#}");
    // Outputs by absolute URL, which serve the file.
    let url = body["outputs"][0]["url"].as_str().unwrap();
    assert!(url.starts_with(&app.url), "{url}");
    let png = app
        .http
        .get(url)
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert!(png.starts_with(b"\x89PNG"));
    app.shutdown().await;
}

#[tokio::test]
async fn a_receiver_that_does_not_answer_never_holds_up_dispatch() {
    let app = spawn_app(1, |_| {}).await;
    // The receiver takes every request and answers none until the test lets it.
    let receiver = Receiver::start(0, false).await;
    let mut ids = Vec::new();
    for i in 0..4 {
        ids.push(
            app.submit_ok(&json!({
                "workflow": tiny_workflow(&format!("blocked{i}")),
                "callback": {"url": receiver.url},
            }))
            .await,
        );
    }
    for id in &ids {
        assert_eq!(app.wait_terminal(id).await["state"], "succeeded");
    }
    poll_until(
        "the receiver holding all four deliveries",
        Duration::from_secs(10),
        Duration::from_millis(10),
        || async {
            let n = receiver.got().len();
            if n == 4 {
                Ok(())
            } else {
                Err(n)
            }
        },
    )
    .await;
    assert!(
        app.get_job(&ids[0]).await["deliveries"]
            .as_array()
            .unwrap()
            .is_empty(),
        "no attempt has an answer yet"
    );
    receiver.gate.add_permits(4);
    poll_until(
        "each job's delivery recorded",
        Duration::from_secs(10),
        Duration::from_millis(20),
        || async {
            for id in &ids {
                let d = app.get_job(id).await["deliveries"].clone();
                if d.as_array().is_none_or(|d| d.len() != 1) {
                    return Err(d);
                }
            }
            Ok(())
        },
    )
    .await;
    app.shutdown().await;
}

#[tokio::test]
async fn the_servers_default_callback_gets_progress_and_the_outcome() {
    let receiver = Receiver::start(0, true).await;
    let url = receiver.url.clone();
    let app = spawn_app(1, move |c| {
        c.callbacks.default = Some(gantry_core::Callback {
            url,
            events: vec!["progress".into(), "succeeded".into()],
            secret: None,
        });
    })
    .await;
    let id = app
        .submit_ok(&json!({"workflow": sleep_workflow(1.0, 4, 11)}))
        .await;
    assert_eq!(app.wait_terminal(&id).await["state"], "succeeded");
    let got = poll_until(
        "the outcome delivered",
        Duration::from_secs(10),
        Duration::from_millis(20),
        || async {
            let got = receiver.got();
            if got
                .iter()
                .any(|g| g.headers["x-gantry-event"] == "succeeded")
            {
                Ok(got)
            } else {
                Err(got.len())
            }
        },
    )
    .await;
    let progress: Vec<Value> = got
        .iter()
        .filter(|g| g.headers["x-gantry-event"] == "progress")
        .map(|g| serde_json::from_slice(&g.body).unwrap())
        .collect();
    assert!(!progress.is_empty(), "progress was asked for");
    assert!(
        progress
            .iter()
            .all(|p| p["job_id"] == id.as_str() && p["max"].as_f64() == Some(4.0)),
        "{progress:#?}"
    );
    assert!(
        got.iter()
            .all(|g| !g.headers.contains_key("x-gantry-signature")),
        "no secret, no signature"
    );
    let job = app.get_job(&id).await;
    assert_eq!(job["callback"]["default"], true);
    app.shutdown().await;
}

#[tokio::test]
async fn a_callback_to_a_host_outside_the_allow_list_is_refused_at_submit() {
    let app = spawn_app(1, |_| {}).await;
    let submit = |callback: Value| {
        let body = json!({"workflow": tiny_workflow("refused"), "callback": callback});
        let app = &app;
        async move { app.submit(&body).await }
    };
    // No allow-list: loopback only.
    let r = submit(json!({"url": "http://10.1.2.3/hook"})).await;
    assert_error(&r, 400, "invalid_callback", &["10.1.2.3", "loopback"]);
    let r = submit(json!({"url": "http://169.254.169.254/latest/meta-data"})).await;
    assert_error(&r, 400, "invalid_callback", &["169.254.169.254"]);
    let r = submit(json!({"url": "ftp://127.0.0.1/hook"})).await;
    assert_error(&r, 400, "invalid_callback", &["http or https"]);
    let r = submit(json!({"url": "http://127.0.0.1:1/", "events": ["finished"]})).await;
    assert_error(&r, 400, "invalid_callback", &["\"finished\"", "succeeded"]);
    let r = submit(json!({"url": "http://127.0.0.1:1/", "retries": 3})).await;
    assert_error(&r, 400, "invalid_callback", &["retries"]);
    assert!(
        app.all_jobs().await.is_empty(),
        "no refused submit made a job"
    );
    app.shutdown().await;

    // With an allow-list, only its hosts (loopback no longer implied).
    let app = spawn_app(1, |c| {
        c.callbacks.allow_hosts = vec!["hooks.example.com".into()]
    })
    .await;
    let r = app
        .submit(
            &json!({"workflow": tiny_workflow("r"), "callback": {"url": "http://127.0.0.1:1/"}}),
        )
        .await;
    assert_error(
        &r,
        400,
        "invalid_callback",
        &["not in [callback] allow_hosts", "hooks.example.com"],
    );
    let ok = app
        .submit(&json!({"workflow": tiny_workflow("r"), "callback": {"url": "https://hooks.example.com/x"}}))
        .await;
    assert_eq!(ok.0, 202, "{:#}", ok.1);
    app.shutdown().await;
}

#[tokio::test]
async fn a_callback_not_delivered_when_the_server_stops_goes_out_after_its_restart() {
    let sim = gantry_sim::spawn(sim_config()).await.unwrap();
    let receiver = Receiver::start(0, false).await;
    let data = tempfile::tempdir().unwrap();
    let config = || {
        let mut c = Config::new("127.0.0.1:0".parse().unwrap(), data.path().join("d"));
        c.backends = vec![BackendConfig::parse(&format!("a={}", sim.url())).unwrap()];
        c
    };
    let app = TestApp::attach(Server::start(config()).await.unwrap());
    poll_until(
        "backend a idle",
        Duration::from_secs(10),
        Duration::from_millis(20),
        || async {
            let list = app.get_json("/v1/backends").await;
            if list["backends"][0]["status"] == "idle" {
                Ok(())
            } else {
                Err(list)
            }
        },
    )
    .await;
    let id = app
        .submit_ok(&json!({
            "workflow": tiny_workflow("restarted"),
            "callback": {"url": receiver.url, "secret": "k"},
        }))
        .await;
    assert_eq!(app.wait_terminal(&id).await["state"], "succeeded");
    poll_until(
        "the first attempt at the receiver",
        Duration::from_secs(10),
        Duration::from_millis(10),
        || async {
            let n = receiver.got().len();
            if n == 1 {
                Ok(())
            } else {
                Err(n)
            }
        },
    )
    .await;
    // Stopped while the receiver holds the request: that attempt has no answer.
    app.shutdown().await;
    receiver.gate.add_permits(Semaphore::MAX_PERMITS / 2);

    let app = TestApp::attach(Server::start(config()).await.unwrap());
    let deliveries = poll_until(
        "the callback delivered by the restarted server",
        Duration::from_secs(10),
        Duration::from_millis(20),
        || async {
            let d = app.get_job(&id).await["deliveries"].clone();
            if d.as_array()
                .is_some_and(|d| d.iter().any(|x| x["delivered"] == true))
            {
                Ok(d)
            } else {
                Err(d)
            }
        },
    )
    .await;
    assert_eq!(deliveries.as_array().unwrap().len(), 1, "{deliveries:#}");
    assert_eq!(deliveries[0]["attempt"], 1);
    let got = receiver.got();
    assert_eq!(got.len(), 2, "the abandoned attempt and the resumed one");
    assert_eq!(
        got[0].headers["x-gantry-delivery"],
        got[1].headers["x-gantry-delivery"]
    );
    let bodies: Vec<Value> = got
        .iter()
        .map(|g| serde_json::from_slice(&g.body).unwrap())
        .collect();
    assert_eq!(
        (&bodies[1]["job_id"], &bodies[1]["state"]),
        (&json!(id), &json!("succeeded"))
    );
    assert_eq!(
        bodies[0]["outputs"][0]["sha256"],
        bodies[1]["outputs"][0]["sha256"]
    );
    app.shutdown().await;
    sim.shutdown().await;
}
