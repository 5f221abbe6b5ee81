//! A typed client of gantry's v1 HTTP API, as the `gantry` CLI uses it: each operation
//! has its own timeout (connecting, one request; a watch has none unless asked, since
//! the server owns a job's timeouts), errors keep the server's `{code, message,
//! details}`, and a job's event stream is read as typed events.

use serde_json::Value;
use std::path::Path;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot reach gantry at {server}: {reason}")]
    Connect { server: String, reason: String },
    #[error("{what} did not answer within {} ms", after.as_millis())]
    Timeout { what: String, after: Duration },
    /// The server refused, with its error body.
    #[error("{} ({}, HTTP {})", .0.message, .0.code, .0.status)]
    Api(Box<Refusal>),
    #[error("{0}")]
    Invalid(String),
    #[error("{what}: {reason}")]
    Io { what: String, reason: String },
}

/// A refusal by the server: its status and `{"error": {code, message, details}}`.
#[derive(Debug)]
pub struct Refusal {
    pub status: u16,
    pub code: String,
    pub message: String,
    pub details: Value,
}

pub type Result<T> = std::result::Result<T, Error>;

/// How long each kind of operation may take.
#[derive(Clone, Debug)]
pub struct Timeouts {
    pub connect: Duration,
    pub request: Duration,
}

impl Default for Timeouts {
    fn default() -> Timeouts {
        Timeouts {
            connect: Duration::from_secs(5),
            request: Duration::from_secs(30),
        }
    }
}

#[derive(Clone, Debug)]
pub struct Client {
    base: url::Url,
    http: reqwest::Client,
    timeouts: Timeouts,
    token: Option<String>,
}

pub use gantry_api as wire;
pub use gantry_api::{Accepted, Backend, BackendList, BackendStatusOf, Job, SubmitRequest};

/// One event of a job's stream: persisted ones have an id.
#[derive(Clone, Debug)]
pub struct Event {
    pub name: String,
    pub id: Option<i64>,
    pub data: Value,
}

impl Event {
    pub fn is_terminal(&self) -> bool {
        matches!(self.name.as_str(), "succeeded" | "failed" | "cancelled")
    }
}

/// A job's event stream, read event by event.
pub struct Events {
    response: reqwest::Response,
    buf: String,
    ready: std::collections::VecDeque<Event>,
}

impl Events {
    /// The next event; `None` once the server ends the stream (after the terminal event).
    pub async fn next(&mut self) -> Result<Option<Event>> {
        loop {
            if let Some(e) = self.ready.pop_front() {
                return Ok(Some(e));
            }
            let chunk = self.response.chunk().await.map_err(|e| Error::Io {
                what: "the job's event stream".into(),
                reason: e.to_string(),
            })?;
            let Some(chunk) = chunk else {
                return Ok(None);
            };
            self.buf.push_str(&String::from_utf8_lossy(&chunk));
            while let Some(end) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..end + 2).collect();
                if let Some(e) = parse_block(&block) {
                    self.ready.push_back(e);
                }
            }
        }
    }
}

fn parse_block(block: &str) -> Option<Event> {
    let (mut name, mut id, mut data) = (None, None, Vec::new());
    for line in block.lines() {
        if line.starts_with(':') {
            continue;
        }
        let (field, value) = line.split_once(':').unwrap_or((line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value);
        match field {
            "event" => name = Some(value.to_owned()),
            "id" => id = value.trim().parse().ok(),
            "data" => data.push(value),
            _ => {}
        }
    }
    if name.is_none() && data.is_empty() {
        return None;
    }
    let data = data.join("\n");
    Some(Event {
        name: name.unwrap_or_else(|| "message".into()),
        id,
        data: serde_json::from_str(&data).unwrap_or(Value::String(data)),
    })
}

impl Client {
    /// A client of the gantry at `server` (`http://host:port`).
    pub fn new(server: &str, timeouts: Timeouts, token: Option<String>) -> Result<Client> {
        let base = url::Url::parse(server)
            .ok()
            .filter(|u| matches!(u.scheme(), "http" | "https") && u.host_str().is_some())
            .ok_or_else(|| {
                Error::Invalid(format!(
                    "--server {server}: not an http:// or https:// URL with a host"
                ))
            })?;
        let http = reqwest::Client::builder()
            .connect_timeout(timeouts.connect)
            .build()
            .map_err(|e| Error::Invalid(format!("cannot build an HTTP client: {e}")))?;
        Ok(Client {
            base,
            http,
            timeouts,
            token,
        })
    }

    pub fn server(&self) -> &str {
        self.base.as_str().trim_end_matches('/')
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.server())
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let r = self.http.request(method, self.url(path));
        match &self.token {
            Some(t) => r.bearer_auth(t),
            None => r,
        }
    }

    /// Send with the request timeout, and turn a refusal into `Error::Api`.
    async fn send(&self, what: &str, r: reqwest::RequestBuilder) -> Result<reqwest::Response> {
        self.send_within(what, r, Some(self.timeouts.request)).await
    }

    async fn send_within(
        &self,
        what: &str,
        r: reqwest::RequestBuilder,
        limit: Option<Duration>,
    ) -> Result<reqwest::Response> {
        let sent = match limit {
            Some(limit) => {
                tokio::time::timeout(limit, r.send())
                    .await
                    .map_err(|_| Error::Timeout {
                        what: what.into(),
                        after: limit,
                    })?
            }
            None => r.send().await,
        };
        let response = sent.map_err(|e| self.transport(what, e))?;
        if response.status().is_success() {
            return Ok(response);
        }
        let status = response.status().as_u16();
        let e = match response.json::<wire::ErrorBody>().await {
            Ok(body) => body.error,
            // Not gantry's error shape (a proxy's page, say): the status says enough.
            Err(_) => wire::ErrorDetail {
                code: "http_error".into(),
                message: format!("{what}: HTTP {status}"),
                details: Value::Null,
            },
        };
        Err(Error::Api(Box::new(Refusal {
            status,
            code: e.code,
            message: e.message,
            details: e.details,
        })))
    }

    fn transport(&self, what: &str, e: reqwest::Error) -> Error {
        if e.is_connect() {
            // The innermost cause says what happened ("Connection refused").
            let mut cause: &dyn std::error::Error = &e;
            while let Some(inner) = cause.source() {
                cause = inner;
            }
            Error::Connect {
                server: self.server().to_owned(),
                reason: cause.to_string(),
            }
        } else if e.is_timeout() {
            Error::Timeout {
                what: what.into(),
                after: self.timeouts.connect,
            }
        } else {
            Error::Io {
                what: what.into(),
                reason: e.to_string(),
            }
        }
    }

    async fn json<T: serde::de::DeserializeOwned>(
        &self,
        what: &str,
        response: reqwest::Response,
    ) -> Result<T> {
        let limit = self.timeouts.request;
        let bytes = tokio::time::timeout(limit, response.bytes())
            .await
            .map_err(|_| Error::Timeout {
                what: what.into(),
                after: limit,
            })?
            .map_err(|e| self.transport(what, e))?;
        serde_json::from_slice(&bytes).map_err(|e| Error::Io {
            what: what.into(),
            reason: format!("the answer does not decode: {e}"),
        })
    }

    /// `POST /v1/jobs`.
    pub async fn submit(&self, body: &SubmitRequest) -> Result<Accepted> {
        let r = self.request(reqwest::Method::POST, "/v1/jobs").json(body);
        let response = self.send("submitting the job", r).await?;
        self.json("submitting the job", response).await
    }

    pub async fn job(&self, id: &str) -> Result<Job> {
        let what = format!("reading job {id}");
        let r = self.request(reqwest::Method::GET, &format!("/v1/jobs/{id}"));
        let response = self.send(&what, r).await?;
        self.json(&what, response).await
    }

    /// Newest first; `state` filters.
    pub async fn jobs(&self, state: Option<&str>, limit: u32) -> Result<Vec<Job>> {
        let mut path = format!("/v1/jobs?limit={limit}");
        if let Some(s) = state {
            path.push_str(&format!("&state={s}"));
        }
        let r = self.request(reqwest::Method::GET, &path);
        let response = self.send("listing jobs", r).await?;
        Ok(self
            .json::<wire::JobPage>("listing jobs", response)
            .await?
            .jobs)
    }

    /// `DELETE /v1/jobs/{id}`: the job's state after the request (`cancelled` at once
    /// for a queued job, `running` while the backend confirms).
    pub async fn cancel(&self, id: &str) -> Result<Job> {
        let what = format!("cancelling job {id}");
        let r = self.request(reqwest::Method::DELETE, &format!("/v1/jobs/{id}"));
        let response = self.send(&what, r).await?;
        self.json(&what, response).await
    }

    /// The job's request as accepted, ready to submit again.
    pub async fn request_of(&self, id: &str) -> Result<SubmitRequest> {
        let what = format!("reading the request of job {id}");
        let r = self.request(reqwest::Method::GET, &format!("/v1/jobs/{id}/request"));
        let response = self.send(&what, r).await?;
        self.json(&what, response).await
    }

    pub async fn backends(&self) -> Result<Vec<Backend>> {
        let r = self.request(reqwest::Method::GET, "/v1/backends");
        let response = self.send("listing backends", r).await?;
        Ok(self
            .json::<BackendList>("listing backends", response)
            .await?
            .backends)
    }

    /// `GET /v1/stats/nodes` with these query pairs (class, workflow, backend, since, by).
    pub async fn node_stats(&self, query: &[(&str, &str)]) -> Result<wire::NodeStatsList> {
        let r = self
            .request(reqwest::Method::GET, "/v1/stats/nodes")
            .query(query);
        let response = self.send("reading node statistics", r).await?;
        self.json("reading node statistics", response).await
    }

    /// `GET /v1/stats/timeouts`: the stall limits history gives, and why.
    pub async fn timeout_suggestions(&self) -> Result<wire::TimeoutSuggestions> {
        let r = self.request(reqwest::Method::GET, "/v1/stats/timeouts");
        let response = self.send("reading timeout suggestions", r).await?;
        self.json("reading timeout suggestions", response).await
    }

    /// Add a ComfyUI server to the farm (`POST /v1/backends`).
    pub async fn add_backend(&self, backend: &wire::AddBackend) -> Result<Backend> {
        let what = format!("adding backend {}", backend.url);
        let r = self
            .request(reqwest::Method::POST, "/v1/backends")
            .json(backend);
        let response = self.send(&what, r).await?;
        self.json(&what, response).await
    }

    /// Take a backend out of rotation (`drain`: no new work, what runs finishes) or put
    /// it back; answers its status.
    pub async fn set_draining(&self, backend: &str, drain: bool) -> Result<BackendStatusOf> {
        let action = if drain { "drain" } else { "resume" };
        let what = format!("{action} backend {backend}");
        let r = self.request(
            reqwest::Method::POST,
            &format!("/v1/backends/{backend}/{action}"),
        );
        let response = self.send(&what, r).await?;
        self.json(&what, response).await
    }

    /// The job's events from the first, until the server ends the stream at its terminal
    /// event. Only connecting is timed: a watch lasts as long as the job.
    pub async fn events(&self, id: &str) -> Result<Events> {
        let what = format!("the event stream of job {id}");
        let r = self.request(reqwest::Method::GET, &format!("/v1/jobs/{id}/events"));
        let response = self.send(&what, r).await?;
        Ok(Events {
            response,
            buf: String::new(),
            ready: Default::default(),
        })
    }

    /// `POST /v1/files`: stores an input file for jobs to attach by the hash answered.
    pub async fn upload_file(&self, bytes: Vec<u8>) -> Result<wire::StoredFile> {
        let r = self
            .request(reqwest::Method::POST, "/v1/files")
            .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
            .body(bytes);
        let response = self.send("uploading a file", r).await?;
        self.json("uploading a file", response).await
    }

    /// Download an output (its `url` from the job) into `dest`; answers its size.
    pub async fn download(&self, url_path: &str, dest: &Path) -> Result<u64> {
        let what = format!("downloading {url_path}");
        let r = self.request(reqwest::Method::GET, url_path);
        let response = self.send(&what, r).await?;
        let bytes = response
            .bytes()
            .await
            .map_err(|e| self.transport(&what, e))?;
        tokio::fs::write(dest, &bytes)
            .await
            .map_err(|e| Error::Io {
                what: format!("writing {}", dest.display()),
                reason: e.to_string(),
            })?;
        Ok(bytes.len() as u64)
    }
}
