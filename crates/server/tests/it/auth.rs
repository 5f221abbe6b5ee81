//! Tokens and scopes: the API is open until a token exists, then each route needs its
//! scope; a submitter cancels only its own jobs; the session cookie stands in for the
//! header (EventSource); a revoked token is refused at once; a non-loopback listener
//! needs a token or `insecure`.

use crate::support::{backend_name, sleep_workflow, spawn_app, tiny_workflow, TestApp};
use gantry_core::auth::Scope;
use gantry_server::{Config, Server};
use serde_json::{json, Value};

async fn token(app: &TestApp, scope: Scope, name: &str) -> (String, String) {
    let (token, record) = gantry_server::auth::issue(scope, name, 1);
    app.server
        .engine
        .store()
        .create_token(&record)
        .await
        .unwrap();
    (token, record.id)
}

/// Method, path, bearer, JSON body: status and JSON answer.
async fn call(
    app: &TestApp,
    method: &str,
    path: &str,
    bearer: Option<&str>,
    body: Option<Value>,
) -> (u16, Value) {
    let url = format!("{}{path}", app.url);
    let mut r = app.http.request(method.parse().unwrap(), url);
    if let Some(t) = bearer {
        r = r.bearer_auth(t);
    }
    if let Some(b) = body {
        r = r.json(&b);
    }
    let response = r.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// The job's state once it is terminal, read with `bearer`.
async fn terminal_state(app: &TestApp, id: &str, bearer: &str) -> String {
    crate::support::poll_until(
        "the job ends",
        std::time::Duration::from_secs(30),
        std::time::Duration::from_millis(20),
        || async {
            let job = call(app, "GET", &format!("/v1/jobs/{id}"), Some(bearer), None)
                .await
                .1;
            match job["state"].as_str() {
                Some(s @ ("succeeded" | "failed" | "cancelled")) => Ok(s.to_owned()),
                _ => Err(job),
            }
        },
    )
    .await
}

#[tokio::test]
async fn each_route_needs_its_scope_once_a_token_exists() {
    let app = spawn_app(1, |_| {}).await;
    // Open while no token exists.
    assert_eq!(call(&app, "GET", "/v1/jobs", None, None).await.0, 200);
    let (read, _) = token(&app, Scope::Read, "dashboard").await;
    let (alice, alice_id) = token(&app, Scope::Submit, "alice").await;
    let (bob, _) = token(&app, Scope::Submit, "bob").await;
    let (admin, _) = token(&app, Scope::Admin, "ops").await;
    app.server.auth.refresh().await;

    let (status, body) = call(&app, "GET", "/v1/jobs", None, None).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (401, Some("unauthenticated"))
    );
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("scope read"),
        "{body}"
    );
    let wrong = call(&app, "GET", "/v1/jobs", Some("gantry_t0_nope"), None).await;
    assert_eq!(
        (wrong.0, wrong.1["error"]["code"].as_str()),
        (401, Some("invalid_token"))
    );
    // Health and the API document stay open.
    assert_eq!(call(&app, "GET", "/healthz", None, None).await.0, 200);
    let doc = app
        .http
        .get(format!("{}/v1/openapi.json", app.url))
        .send()
        .await
        .unwrap();
    assert_eq!(doc.status(), 200);
    // So does the monitor's page (it holds no data), while what it draws needs a token.
    for page in ["/", "/ui/app.js"] {
        let r = app
            .http
            .get(format!("{}{page}", app.url))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{page}");
    }
    assert_eq!(call(&app, "GET", "/v1/state", None, None).await.0, 401);
    assert_eq!(
        call(&app, "GET", "/v1/state", Some(&read), None).await.0,
        200
    );
    let lift = call(&app, "DELETE", "/v1/backends/a/blocks/x", Some(&read), None).await;
    assert_eq!(lift.0, 403, "{lift:?}");
    // Input files are part of submitting: a submit token stores one, a read token cannot.
    let file = call(&app, "POST", "/v1/files", Some(&read), Some(json!("x"))).await;
    assert_eq!(file.0, 403, "{file:?}");
    let file = call(&app, "POST", "/v1/files", Some(&alice), Some(json!("x"))).await;
    assert_eq!(file.0, 201, "{file:?}");
    // An agent's link needs an agent (or admin) token, and an agent token opens nothing
    // else.
    let link = call(&app, "GET", "/v1/agents/connect?name=g", Some(&alice), None).await;
    assert_eq!(link.0, 403, "{link:?}");
    let (agent_token, _) = token(&app, Scope::Agent, "gpu-farm").await;
    for (method, path) in [
        ("GET", "/v1/jobs"),
        ("GET", "/v1/state"),
        ("POST", "/v1/files"),
    ] {
        let r = call(&app, method, path, Some(&agent_token), Some(json!("x"))).await;
        assert_eq!(r.0, 403, "{method} {path}: {r:?}");
    }
    // With its token the link is past the guard (a plain GET is then refused as not a
    // WebSocket upgrade, not for want of a scope).
    let link = call(
        &app,
        "GET",
        "/v1/agents/connect?name=g",
        Some(&agent_token),
        None,
    )
    .await;
    assert_ne!(link.0, 403, "{link:?}");
    assert_ne!(link.0, 401, "{link:?}");

    // A read token reads, and cannot submit: refused, and no job is made.
    assert_eq!(
        call(&app, "GET", "/v1/backends", Some(&read), None).await.0,
        200
    );
    let body = json!({"workflow": tiny_workflow("auth")});
    let (status, refused) = call(&app, "POST", "/v1/jobs", Some(&read), Some(body.clone())).await;
    assert_eq!(status, 403, "{refused}");
    assert_eq!(refused["error"]["code"], "forbidden");
    let message = refused["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("scope read") && message.contains("needs scope submit"),
        "{message}"
    );
    let listed = call(&app, "GET", "/v1/jobs", Some(&read), None).await.1;
    assert_eq!(listed["jobs"], json!([]));

    // A submitter's job is its own: another submitter cannot cancel it; it can.
    let long = json!({"workflow": sleep_workflow(30.0, 30, 1)});
    let (status, accepted) = call(&app, "POST", "/v1/jobs", Some(&alice), Some(long.clone())).await;
    assert_eq!(status, 202, "{accepted}");
    let id = accepted["id"].as_str().unwrap().to_owned();
    let job = call(&app, "GET", &format!("/v1/jobs/{id}"), Some(&read), None)
        .await
        .1;
    assert_eq!(job["owner"], alice_id.as_str());
    let (status, e) = call(&app, "DELETE", &format!("/v1/jobs/{id}"), Some(&bob), None).await;
    assert_eq!(status, 403, "{e}");
    assert!(e["error"]["message"]
        .as_str()
        .unwrap()
        .contains("needs scope admin"));
    let (status, _) = call(
        &app,
        "DELETE",
        &format!("/v1/jobs/{id}"),
        Some(&alice),
        None,
    )
    .await;
    assert!(status == 200 || status == 202, "{status}");
    assert_eq!(terminal_state(&app, &id, &admin).await, "cancelled");
    // An admin cancels anyone's.
    let (_, other) = call(&app, "POST", "/v1/jobs", Some(&bob), Some(long)).await;
    let other = other["id"].as_str().unwrap().to_owned();
    let (status, _) = call(
        &app,
        "DELETE",
        &format!("/v1/jobs/{other}"),
        Some(&admin),
        None,
    )
    .await;
    assert!(status == 200 || status == 202, "{status}");
    assert_eq!(terminal_state(&app, &other, &admin).await, "cancelled");

    // Backends are administered by admin tokens only.
    let drain = format!("/v1/backends/{}/drain", backend_name(0));
    assert_eq!(call(&app, "POST", &drain, Some(&alice), None).await.0, 403);
    assert_eq!(call(&app, "POST", &drain, Some(&admin), None).await.0, 200);
    let resume = format!("/v1/backends/{}/resume", backend_name(0));
    assert_eq!(call(&app, "POST", &resume, Some(&admin), None).await.0, 200);

    // Revoked: refused from the next request on.
    let store = app.server.engine.store();
    let tokens = store.tokens().await.unwrap();
    let read_id = tokens
        .iter()
        .find(|t| t.name == "dashboard")
        .unwrap()
        .id
        .clone();
    assert!(store.revoke_token(&read_id, 2).await.unwrap());
    let (status, e) = call(&app, "GET", "/v1/jobs", Some(&read), None).await;
    assert_eq!(
        (status, e["error"]["code"].as_str()),
        (401, Some("token_revoked"))
    );
    app.shutdown().await;
}

#[tokio::test]
async fn a_browser_signs_in_for_a_cookie_that_opens_the_event_stream() {
    let app = spawn_app(1, |_| {}).await;
    let (read, read_id) = token(&app, Scope::Read, "monitor").await;
    app.server.auth.refresh().await;
    let no_cookie = app
        .http
        .get(format!("{}/v1/events", app.url))
        .send()
        .await
        .unwrap();
    assert_eq!(no_cookie.status(), 401);

    // Signing in with a bad token sets nothing.
    let bad = app
        .http
        .post(format!("{}/v1/session", app.url))
        .json(&json!({"token": "gantry_t0_nope"}))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 401);
    assert!(bad.headers().get("set-cookie").is_none());

    let signed = app
        .http
        .post(format!("{}/v1/session", app.url))
        .json(&json!({ "token": read }))
        .send()
        .await
        .unwrap();
    assert_eq!(signed.status(), 200);
    let cookie = signed.headers()["set-cookie"].to_str().unwrap().to_owned();
    for attr in ["HttpOnly", "SameSite=Strict", "Path=/"] {
        assert!(cookie.contains(attr), "{cookie}");
    }
    let session: Value = signed.json().await.unwrap();
    assert_eq!(session["auth"], true);
    assert_eq!(session["token"]["id"], read_id.as_str());
    assert_eq!(session["token"]["scope"], "read");

    // The cookie alone, as EventSource sends it, opens the stream and reads the API.
    let pair = cookie.split(';').next().unwrap().to_owned();
    let stream = app
        .http
        .get(format!("{}/v1/events", app.url))
        .header("cookie", &pair)
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), 200);
    assert!(stream.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    drop(stream);
    let who: Value = app
        .http
        .get(format!("{}/v1/session", app.url))
        .header("cookie", &pair)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(who["token"]["name"], "monitor");
    // The same scopes hold: a read cookie cannot submit.
    let submit = app
        .http
        .post(format!("{}/v1/jobs", app.url))
        .header("cookie", &pair)
        .json(&json!({"workflow": tiny_workflow("cookie")}))
        .send()
        .await
        .unwrap();
    assert_eq!(submit.status(), 403);

    let out = app
        .http
        .delete(format!("{}/v1/session", app.url))
        .send()
        .await
        .unwrap();
    assert!(out.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .contains("Max-Age=0"));
    app.shutdown().await;
}

#[tokio::test]
async fn a_non_loopback_listener_needs_a_token_or_insecure() {
    let data = tempfile::tempdir().unwrap();
    let config = Config::new("0.0.0.0:0".parse().unwrap(), data.path().join("d"));
    let refused = Server::start(config.clone()).await;
    let message = refused.err().expect("refused").to_string();
    assert!(
        message.contains("0.0.0.0:0")
            && message.contains("gantry token create")
            && message.contains("--insecure"),
        "{message}"
    );

    let mut open = config.clone();
    open.insecure = true;
    Server::start(open)
        .await
        .expect("served with insecure")
        .shutdown()
        .await;

    // With a token in its store, it serves, and asks for the token.
    let store = gantry_store::SqliteStore::open(&data.path().join("d"))
        .await
        .unwrap();
    let (_, record) = gantry_server::auth::issue(Scope::Admin, "ops", 1);
    gantry_store::Store::create_token(&store, &record)
        .await
        .unwrap();
    drop(store);
    let server = Server::start(config).await.expect("served with a token");
    let url = format!("http://127.0.0.1:{}/v1/jobs", server.addr.port());
    let status = reqwest::get(url).await.unwrap().status();
    assert_eq!(status, 401);
    server.shutdown().await;
}
