//! A gantry server in front of simulated ComfyUI backends, on ephemeral ports, with a
//! fresh data dir; and typed helpers that talk to it the way a client does. Every wait
//! polls a real signal with a deadline; nothing sleeps as synchronisation.

use gantry_server::{BackendConfig, Config, Server, StoreConfig};
use gantry_sim::{SimConfig, SimHandle};
use gantry_store::testing::FreshSchema;
use serde_json::{json, Value};
use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;
use tokio::time::Instant;

/// Simulated time runs this many times faster than real time.
pub const SPEED: f64 = 20.0;

/// How long any job may take to finish before a test gives up on it.
pub const TERMINAL_DEADLINE: Duration = Duration::from_secs(30);

pub struct TestApp {
    pub server: Server,
    pub sims: Vec<SimHandle>,
    pub http: reqwest::Client,
    /// The server's base URL, `http://127.0.0.1:PORT`.
    pub url: String,
    _data: tempfile::TempDir,
    /// The Postgres schema the server's store lives in, when it is not the embedded one.
    _schema: Option<FreshSchema>,
}

/// A simulator configuration as the tests use it: fast, on an ephemeral port.
pub fn sim_config() -> SimConfig {
    SimConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        speed: SPEED,
        ..SimConfig::default()
    }
}

/// Starts `n_backends` default simulators and a server whose backends are named a, b, c...
/// `tweak` may change the config (timeouts, priorities...) before the server starts.
pub async fn spawn_app(n_backends: usize, tweak: impl FnOnce(&mut Config)) -> TestApp {
    spawn_app_with((0..n_backends).map(|_| sim_config()).collect(), tweak).await
}

/// As `spawn_app`, on a fresh Postgres schema with the artifacts in the temp dir; `None`
/// (and a line on stderr) when `GANTRY_TEST_POSTGRES_URL` is not set.
pub async fn spawn_app_pg(n_backends: usize, tweak: impl FnOnce(&mut Config)) -> Option<TestApp> {
    let schema = FreshSchema::create().await?;
    let url = schema.url.clone();
    let sims = (0..n_backends).map(|_| sim_config()).collect();
    let mut app = spawn_app_with(sims, |c| {
        c.store = StoreConfig::Postgres(url);
        c.artifacts = Some(c.data_dir.join("../artifacts"));
        tweak(c)
    })
    .await;
    app._schema = Some(schema);
    Some(app)
}

/// As `spawn_app`, with one simulator per given configuration.
pub async fn spawn_app_with(sims: Vec<SimConfig>, tweak: impl FnOnce(&mut Config)) -> TestApp {
    let mut handles = Vec::new();
    for sim in sims {
        handles.push(gantry_sim::spawn(sim).await.expect("simulator starts"));
    }
    let data = tempfile::tempdir().expect("temp data dir");
    let mut config = Config::new("127.0.0.1:0".parse().unwrap(), data.path().join("data"));
    config.backends = handles
        .iter()
        .enumerate()
        .map(|(i, sim)| {
            let name = backend_name(i);
            BackendConfig::parse(&format!("{name}={}", sim.url())).unwrap()
        })
        .collect();
    tweak(&mut config);
    let server = Server::start(config).await.expect("server starts");
    let app = TestApp {
        url: server.url(),
        server,
        sims: handles,
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .unwrap(),
        _data: data,
        _schema: None,
    };
    app.wait_backends_idle().await;
    app
}

impl TestApp {
    /// A client of `server` alone: its backends' simulators belong to someone else (a
    /// farm of several coordinators).
    pub fn attach(server: Server) -> TestApp {
        TestApp {
            url: server.url(),
            server,
            sims: Vec::new(),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .unwrap(),
            _data: tempfile::tempdir().expect("temp dir"),
            _schema: None,
        }
    }
}

/// a, b, c, ...
pub fn backend_name(i: usize) -> String {
    char::from(b'a' + u8::try_from(i).unwrap()).to_string()
}

/// Calls `probe` every `every` until it answers Some, or panics with `what` and the last
/// value seen once `deadline` has passed.
pub async fn poll_until<T, L, F, Fut>(
    what: &str,
    deadline: Duration,
    every: Duration,
    mut probe: F,
) -> T
where
    L: std::fmt::Debug,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, L>>,
{
    let give_up = Instant::now() + deadline;
    loop {
        match probe().await {
            Ok(found) => return found,
            Err(last) if Instant::now() >= give_up => {
                panic!("{what}: not after {deadline:?}; last seen: {last:#?}")
            }
            Err(_) => tokio::time::sleep(every).await,
        }
    }
}

/// An API-format workflow from the repository's `fixtures` folder, e.g.
/// `workflows/txt2img.json` or `comfyui/workflows/a_normal.json`.
pub fn fixture(path: &str) -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures")
        .join(path);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// EmptyImage -> SaveImage: runs in milliseconds, writes one PNG.
pub fn tiny_workflow(prefix: &str) -> Value {
    json!({
        "1": {"class_type": "EmptyImage", "inputs": {"width": 16, "height": 16, "batch_size": 1, "color": 0x336699}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": prefix}}
    })
}

/// EmptyImage -> GantrySleep -> SaveImage; `seconds` of simulated time in `steps` steps
/// (real time is `seconds / SPEED`). `seed` changes the cache key.
pub fn sleep_workflow(seconds: f64, steps: u64, seed: u64) -> Value {
    json!({
        "1": {"class_type": "EmptyImage", "inputs": {"width": 16, "height": 16, "batch_size": 1, "color": 0xff00}},
        "2": {"class_type": "GantrySleep", "inputs": {"image": ["1", 0], "seconds": seconds, "steps": steps, "seed": seed}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "sleep"}}
    })
}

/// One event of an SSE stream.
#[derive(Clone, Debug)]
pub struct Sse {
    pub event: String,
    pub id: Option<String>,
    pub data: Value,
}

/// The event names, in order.
pub fn names<'a>(events: impl IntoIterator<Item = &'a Sse>) -> Vec<&'a str> {
    events.into_iter().map(|e| e.event.as_str()).collect()
}

/// Splits complete SSE blocks off the front of `buf`.
pub fn parse_sse_blocks(buf: &mut String, out: &mut Vec<Sse>) {
    while let Some(end) = buf.find("\n\n") {
        let block: String = buf.drain(..end + 2).collect();
        let (mut event, mut id, mut data) = (None, None, Vec::new());
        for line in block.lines() {
            if line.starts_with(':') || line.is_empty() {
                continue; // keep-alive comment
            }
            let (field, value) = line.split_once(':').unwrap_or((line, ""));
            let value = value.strip_prefix(' ').unwrap_or(value);
            match field {
                "event" => event = Some(value.to_owned()),
                "id" => id = Some(value.to_owned()),
                "data" => data.push(value.to_owned()),
                _ => {}
            }
        }
        if event.is_none() && data.is_empty() {
            continue;
        }
        let data = data.join("\n");
        out.push(Sse {
            event: event.unwrap_or_else(|| "message".to_owned()),
            id,
            data: serde_json::from_str(&data).unwrap_or(Value::String(data)),
        });
    }
}

impl TestApp {
    pub async fn wait_backends_idle(&self) {
        poll_until(
            "every backend idle",
            Duration::from_secs(10),
            Duration::from_millis(20),
            || async {
                let body = self.get_json("/v1/backends").await;
                let all_idle = body["backends"].as_array().is_some_and(|list| {
                    list.len() == self.sims.len() && list.iter().all(|b| b["status"] == "idle")
                });
                if all_idle {
                    Ok(())
                } else {
                    Err(body)
                }
            },
        )
        .await
    }

    /// GET a path of the server; panics unless it answers 200 with JSON.
    pub async fn get_json(&self, path: &str) -> Value {
        let (status, body) = self.get(path).await;
        assert_eq!(status, 200, "GET {path}: {body:#}");
        body
    }

    /// GET a path of the server: status and JSON body (Null when not JSON).
    pub async fn get(&self, path: &str) -> (u16, Value) {
        let response = self
            .http
            .get(format!("{}{path}", self.url))
            .send()
            .await
            .unwrap();
        status_and_json(response).await
    }

    /// POST /v1/jobs with this JSON body.
    pub async fn submit(&self, body: &Value) -> (u16, Value) {
        self.submit_raw(serde_json::to_vec(body).unwrap()).await
    }

    /// POST /v1/jobs with these bytes as the body.
    pub async fn submit_raw(&self, body: Vec<u8>) -> (u16, Value) {
        let response = self
            .http
            .post(format!("{}/v1/jobs", self.url))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        status_and_json(response).await
    }

    /// Submits `body` and answers the new job's id; panics unless the answer is 202.
    pub async fn submit_ok(&self, body: &Value) -> String {
        let (status, answer) = self.submit(body).await;
        assert_eq!(status, 202, "submit: {answer:#}");
        assert_eq!(answer["state"], "queued", "{answer:#}");
        answer["id"].as_str().expect("an id").to_owned()
    }

    pub async fn get_job(&self, id: &str) -> Value {
        self.get_json(&format!("/v1/jobs/{id}")).await
    }

    pub async fn cancel(&self, id: &str) -> (u16, Value) {
        let response = self
            .http
            .delete(format!("{}/v1/jobs/{id}", self.url))
            .send()
            .await
            .unwrap();
        status_and_json(response).await
    }

    /// Polls the job until `done` holds for it, or panics with the job's JSON.
    pub async fn wait_job(
        &self,
        id: &str,
        what: &str,
        deadline: Duration,
        done: impl Fn(&Value) -> bool,
    ) -> Value {
        poll_until(what, deadline, Duration::from_millis(20), || async {
            let job = self.get_job(id).await;
            if done(&job) {
                Ok(job)
            } else {
                Err(job)
            }
        })
        .await
    }

    /// Polls the job until it is succeeded, failed or cancelled.
    pub async fn wait_terminal(&self, id: &str) -> Value {
        self.wait_job(
            id,
            &format!("job {id} terminal"),
            TERMINAL_DEADLINE,
            |job| {
                matches!(
                    job["state"].as_str(),
                    Some("succeeded" | "failed" | "cancelled")
                )
            },
        )
        .await
    }

    /// Every job the list endpoint knows (first page of up to 1000).
    pub async fn all_jobs(&self) -> Vec<Value> {
        let body = self.get_json("/v1/jobs?limit=1000").await;
        body["jobs"].as_array().expect("a jobs array").clone()
    }

    /// Reads the job's event stream until the server closes it; panics when it stays
    /// open past the deadline, with what it had received.
    pub async fn read_sse(&self, id: &str) -> Vec<Sse> {
        let mut response = self
            .http
            .get(format!("{}/v1/jobs/{id}/events", self.url))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let content_type = response.headers()["content-type"]
            .to_str()
            .unwrap()
            .to_owned();
        assert!(
            content_type.starts_with("text/event-stream"),
            "{content_type}"
        );
        let deadline = tokio::time::Instant::now() + TERMINAL_DEADLINE;
        let (mut buf, mut events) = (String::new(), Vec::new());
        loop {
            let chunk = match tokio::time::timeout_at(deadline, response.chunk()).await {
                Ok(chunk) => chunk.unwrap(),
                Err(_) => panic!(
                    "the event stream of {id} did not close; got {:?}",
                    names(&events)
                ),
            };
            let Some(chunk) = chunk else { break };
            buf.push_str(std::str::from_utf8(&chunk).unwrap());
            parse_sse_blocks(&mut buf, &mut events);
        }
        assert!(
            buf.trim().is_empty(),
            "a partial event at the end of the stream: {buf:?}"
        );
        events
    }

    /// GET a path of a simulator, as JSON.
    pub async fn sim_json(&self, sim: usize, path: &str) -> Value {
        let response = self
            .http
            .get(format!("{}{path}", self.sims[sim].url()))
            .send()
            .await
            .unwrap();
        let (status, body) = status_and_json(response).await;
        assert_eq!(status, 200, "sim GET {path}: {body:#}");
        body
    }

    pub async fn shutdown(self) {
        self.server.shutdown().await;
        for sim in self.sims {
            sim.shutdown().await;
        }
    }
}

async fn status_and_json(response: reqwest::Response) -> (u16, Value) {
    let status = response.status().as_u16();
    let bytes = response.bytes().await.unwrap();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

/// Asserts an error answer: status, `error.code`, and that the message contains each of
/// `needles`. Answers the error object.
#[track_caller]
pub fn assert_error(answer: &(u16, Value), status: u16, code: &str, needles: &[&str]) -> Value {
    let (got, body) = answer;
    assert_eq!(*got, status, "{body:#}");
    let error = &body["error"];
    assert_eq!(error["code"], code, "{body:#}");
    let message = error["message"].as_str().expect("an error message");
    for needle in needles {
        assert!(
            message.contains(needle),
            "{needle:?} not in the message {message:?}"
        );
    }
    error.clone()
}

/// An RFC 3339 UTC timestamp with milliseconds: `YYYY-MM-DDTHH:MM:SS.mmmZ`.
#[track_caller]
pub fn assert_rfc3339_ms(v: &Value) {
    let s = v.as_str().unwrap_or_else(|| panic!("not a timestamp: {v}"));
    let bytes = s.as_bytes();
    let ok = bytes.len() == 24
        && s.ends_with('Z')
        && bytes[19] == b'.'
        && bytes[20..23].iter().all(u8::is_ascii_digit)
        && bytes[10] == b'T'
        && chrono::DateTime::parse_from_rfc3339(s).is_ok();
    assert!(ok, "not RFC 3339 with milliseconds: {s}");
}

/// Milliseconds since the epoch of an RFC 3339 timestamp in the API's JSON.
pub fn ms_of(v: &Value) -> i64 {
    let s = v.as_str().unwrap_or_else(|| panic!("not a timestamp: {v}"));
    chrono::DateTime::parse_from_rfc3339(s)
        .unwrap_or_else(|e| panic!("{s}: {e}"))
        .timestamp_millis()
}

/// Collects what the engine publishes about backends (blocks, circuit, stuck) from now on.
pub fn backend_events(app: &TestApp) -> BackendEvents {
    BackendEvents {
        rx: app.server.engine.bus().subscribe(),
        seen: Vec::new(),
    }
}

pub struct BackendEvents {
    rx: tokio::sync::broadcast::Receiver<gantry_server::bus::BusEvent>,
    /// (backend, event as JSON), in order.
    pub seen: Vec<(String, Value)>,
}

impl BackendEvents {
    /// Waits until an event of `kind` about `backend` has been published, and answers it.
    pub async fn wait_for(&mut self, backend: &str, kind: &str, deadline: Duration) -> Value {
        let give_up = tokio::time::Instant::now() + deadline;
        loop {
            if let Some((_, e)) = self
                .seen
                .iter()
                .find(|(b, e)| b == backend && e["type"] == kind)
            {
                return e.clone();
            }
            match tokio::time::timeout_at(give_up, self.rx.recv()).await {
                Ok(Ok(gantry_server::bus::BusEvent::Backend(e))) => {
                    self.seen
                        .push((e.backend.clone(), serde_json::to_value(&*e).unwrap()));
                }
                Ok(Ok(_)) => {}
                Ok(Err(tokio::sync::broadcast::error::RecvError::Lagged(_))) => {}
                Ok(Err(e)) => panic!("bus closed: {e}"),
                Err(_) => panic!(
                    "no {kind} event for {backend} within {deadline:?}; seen: {:#?}",
                    self.seen
                ),
            }
        }
    }
}

/// A TCP proxy in front of PostgreSQL that a test can cut (every connection dropped, new
/// ones refused) and restore: a database that becomes unreachable for a while.
pub struct PgProxy {
    pub addr: std::net::SocketAddr,
    cut: std::sync::Arc<std::sync::atomic::AtomicBool>,
    live: std::sync::Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl PgProxy {
    pub async fn start(upstream: std::net::SocketAddr) -> PgProxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cut = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let live = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (c, l) = (cut.clone(), live.clone());
        let accept = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                if c.load(std::sync::atomic::Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                let task = tokio::spawn(async move {
                    if let Ok(mut server) = tokio::net::TcpStream::connect(upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
                l.lock().unwrap().push(task.abort_handle());
            }
        });
        PgProxy {
            addr,
            cut,
            live,
            accept,
        }
    }

    /// `url` with its host and port replaced by the proxy's.
    pub fn url(&self, url: &str) -> String {
        let mut u = url::Url::parse(url).unwrap();
        u.set_host(Some("127.0.0.1")).unwrap();
        u.set_port(Some(self.addr.port())).unwrap();
        u.to_string()
    }

    pub fn cut(&self) {
        self.cut.store(true, std::sync::atomic::Ordering::SeqCst);
        for task in self.live.lock().unwrap().drain(..) {
            task.abort();
        }
    }

    pub fn restore(&self) {
        self.cut.store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for PgProxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}
