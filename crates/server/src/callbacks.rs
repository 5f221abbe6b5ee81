//! Webhooks: a job's outcome (and, if asked, its progress) POSTed to a URL the job or the
//! server names, signed with HMAC-SHA256, retried with backoff for a bounded time, each
//! attempt recorded with the job. Deliveries run on their own tasks: dispatch never waits
//! for a receiver. Only the coordinator that committed an event delivers it.

use gantry_api as wire;
use gantry_core::{Callback, Job, JobId, JobState};
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::clock::{now_ms, rfc3339};
use crate::engine::Engine;
use crate::hooks::{effective, Notice};

/// `sha256=HEX` of HMAC-SHA256(secret, body).
pub fn signature(secret: &str, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes())
        .unwrap_or_else(|_| unreachable!("HMAC takes a key of any length"));
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// The body of a terminal event: the job's state, outputs with absolute URLs, error and
/// timings.
fn ended_body(job: &Job, base_url: &str) -> Value {
    let view = crate::api::views::job_view(job);
    let outputs: Vec<Value> = view
        .outputs
        .iter()
        .map(|o| {
            json!({
                "name": o.name,
                "node_id": o.node_id,
                "filename": o.filename,
                "content_type": o.content_type,
                "size": o.size,
                "sha256": o.sha256,
                "url": format!("{base_url}{}", o.url),
            })
        })
        .collect();
    json!({
        "event": job.state.as_str(),
        "job_id": job.id.to_string(),
        "state": job.state,
        "attempts": job.attempts.len(),
        "backend": job.attempts.last().map(|a| a.backend.clone()),
        "outputs": outputs,
        "error": job.error,
        "note": job.note,
        "timings": {
            "created_at": view.created_at,
            "ended_at": view.updated_at,
            "queue_ms": view.profile.queue_ms,
            "total_ms": view.profile.total_ms,
        },
        "metadata": job.spec.metadata,
    })
}

/// Receives notices and starts deliveries; progress is coalesced per job (one delivery
/// in flight, the latest step waiting behind it).
pub async fn run(engine: Engine, mut rx: mpsc::UnboundedReceiver<Notice>, base_url: String) {
    let http = match reqwest::Client::builder()
        // A redirect could lead anywhere: the allow-list covers only the URL given.
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("gantry/", env!("CARGO_PKG_VERSION")))
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "callbacks disabled: no HTTP client");
            return;
        }
    };
    resume(&engine, &http, &base_url).await;
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<JobId>();
    let mut in_flight: HashMap<JobId, Option<(Arc<Callback>, Value)>> = HashMap::new();
    let stop = engine.shutdown_token().clone();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            Some(job_id) = done_rx.recv() => {
                if let Some(Some((callback, body))) = in_flight.remove(&job_id) {
                    in_flight.insert(job_id.clone(), None);
                    spawn_progress(&engine, &http, &done_tx, job_id, callback, body);
                }
            }
            notice = rx.recv() => match notice {
                None => return,
                Some(Notice::Ended(job)) => {
                    let config = &engine.config().callbacks;
                    let Some((callback, _)) = effective(&job, config) else { continue };
                    let event = job.state.as_str();
                    if !callback.wants(event) {
                        continue;
                    }
                    let body = ended_body(&job, &base_url);
                    let delivery = Delivering {
                        engine: engine.clone(),
                        http: http.clone(),
                        job_id: job.id.clone(),
                        callback: callback.clone(),
                        event: event.to_owned(),
                        retry: true,
                        delivery_id: ended_delivery_id(&job),
                        first_attempt: 1,
                        give_up: Instant::now() + config.retry_for,
                    };
                    tokio::spawn(delivery.run(body));
                }
                Some(Notice::Progress { job_id, callback, body }) => {
                    match in_flight.get_mut(&job_id) {
                        Some(waiting) => *waiting = Some((callback, body)),
                        None => {
                            in_flight.insert(job_id.clone(), None);
                            spawn_progress(&engine, &http, &done_tx, job_id, callback, body);
                        }
                    }
                }
            }
        }
    }
}

fn spawn_progress(
    engine: &Engine,
    http: &reqwest::Client,
    done: &mpsc::UnboundedSender<JobId>,
    job_id: JobId,
    callback: Arc<Callback>,
    body: Value,
) {
    let delivery = Delivering {
        engine: engine.clone(),
        http: http.clone(),
        job_id: job_id.clone(),
        callback: (*callback).clone(),
        event: "progress".into(),
        // Progress is best effort: the next step supersedes a lost one.
        retry: false,
        delivery_id: uuid::Uuid::new_v4().to_string(),
        first_attempt: 1,
        give_up: Instant::now(),
    };
    let done = done.clone();
    tokio::spawn(async move {
        delivery.run(body).await;
        // Refused only once the deliverer stopped (shutdown): no progress waits then.
        let _ = done.send(job_id);
    });
}

/// A terminal event's delivery id: the same across retries and restarts, so a receiver
/// can tell a repeat from a new event.
fn ended_delivery_id(job: &Job) -> String {
    format!("{}.{}", job.id, job.state.as_str())
}

/// At start, the terminal callbacks a previous life of this server had not finished
/// (the process stopped while retrying, or between the commit and the first attempt) go
/// out again, for what is left of their retry window from the job's end. With several
/// coordinators on one store this is not done: which one would resend is not decided.
async fn resume(engine: &Engine, http: &reqwest::Client, base_url: &str) {
    if engine.cluster().is_some() {
        return;
    }
    let config = engine.config().callbacks.clone();
    let window = config.retry_for.as_millis() as i64;
    let since = now_ms() - window;
    for state in [JobState::Succeeded, JobState::Failed, JobState::Cancelled] {
        let mut before = None;
        'pages: loop {
            let filter = gantry_store::JobFilter {
                state: Some(state),
                limit: 200,
                before,
            };
            let page = match engine.store().list_jobs(&filter).await {
                Ok(p) => p,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot look for unfinished callbacks");
                    return;
                }
            };
            for job in page.jobs {
                if job.updated_at < since {
                    break 'pages;
                }
                let Some((callback, _)) = effective(&job, &config) else {
                    continue;
                };
                if !callback.wants(state.as_str()) {
                    continue;
                }
                let done = match engine.store().deliveries(&job.id).await {
                    Ok(d) => d,
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot read a job's deliveries");
                        continue;
                    }
                };
                let ours: Vec<&Value> = done
                    .iter()
                    .filter(|d| d["event"] == state.as_str())
                    .collect();
                if ours.iter().any(|d| d["final"] == true) {
                    continue;
                }
                let left = window - (now_ms() - job.updated_at);
                tracing::info!(job_id = %job.id, event = state.as_str(), "callback resumed after a restart");
                let delivery = Delivering {
                    engine: engine.clone(),
                    http: http.clone(),
                    job_id: job.id.clone(),
                    callback: callback.clone(),
                    event: state.as_str().to_owned(),
                    retry: true,
                    delivery_id: ended_delivery_id(&job),
                    first_attempt: ours.len() as u32 + 1,
                    give_up: Instant::now() + Duration::from_millis(left.max(0) as u64),
                };
                tokio::spawn(delivery.run(ended_body(&job, base_url)));
            }
            match page.next {
                Some(n) => before = Some(n),
                None => break,
            }
        }
    }
}

/// One delivery, with its retries.
struct Delivering {
    engine: Engine,
    http: reqwest::Client,
    job_id: JobId,
    callback: Callback,
    event: String,
    retry: bool,
    delivery_id: String,
    first_attempt: u32,
    /// No retry starts after this.
    give_up: Instant,
}

impl Delivering {
    async fn run(self, body: Value) {
        let config = self.engine.config().callbacks.clone();
        let bytes = match serde_json::to_vec(&body) {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(error = %e, "callback body does not serialise");
                return;
            }
        };
        let signature = self
            .callback
            .secret
            .as_deref()
            .map(|s| signature(s, &bytes));
        let delivery_id = self.delivery_id.clone();
        let mut backoff = config.backoff;
        let stop = self.engine.shutdown_token().clone();
        for attempt in self.first_attempt.. {
            let sent = Instant::now();
            let mut request = self
                .http
                .post(&self.callback.url)
                .timeout(config.timeout)
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .header("X-Gantry-Event", &self.event)
                .header("X-Gantry-Delivery", &delivery_id)
                .header("X-Gantry-Job", self.job_id.as_str())
                .body(bytes.clone());
            if let Some(sig) = &signature {
                request = request.header("X-Gantry-Signature", sig);
            }
            // Stopping abandons an attempt in flight; the next start resumes it (`resume`).
            let answer = tokio::select! {
                _ = stop.cancelled() => return,
                answer = request.send() => answer,
            };
            let (status, error) = match answer {
                Ok(r) if r.status().is_success() => (Some(r.status().as_u16()), None),
                Ok(r) => (
                    Some(r.status().as_u16()),
                    Some(format!("the receiver answered {}", r.status())),
                ),
                Err(e) => (None, Some(delivery_error(&e))),
            };
            let delivered = error.is_none();
            let more = !delivered && self.retry && Instant::now() + backoff < self.give_up;
            let record = wire::Delivery {
                delivery_id: delivery_id.clone(),
                event: self.event.clone(),
                attempt,
                at: rfc3339(now_ms()),
                url: self.callback.url.clone(),
                status,
                error,
                duration_ms: sent.elapsed().as_millis() as u64,
                delivered,
                last: !more,
            };
            match serde_json::to_value(&record) {
                Ok(v) => {
                    if let Err(e) = self
                        .engine
                        .store()
                        .record_delivery(&self.job_id, now_ms(), &v)
                        .await
                    {
                        tracing::warn!(job_id = %self.job_id, error = %e, "cannot record a callback delivery");
                    }
                }
                Err(e) => tracing::error!(error = %e, "delivery record does not serialise"),
            }
            if !more {
                if !delivered {
                    tracing::warn!(job_id = %self.job_id, event = %self.event, attempts = attempt, "callback given up");
                }
                return;
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(60));
        }
    }
}

/// A transport error, said plainly (reqwest's Display hides the cause).
fn delivery_error(e: &reqwest::Error) -> String {
    let mut s = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        source = cause.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signature_is_hmac_sha256_of_the_body() {
        // RFC 4231 test case 2.
        assert_eq!(
            signature("Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
