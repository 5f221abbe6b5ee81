//! Server-sent event streams: a job's whole history then its live events, and the farm's
//! stream (every committed event once and in order, backends' rows, coalesced progress).

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::header;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use gantry_core::{EventKind, JobId};
use gantry_store::Event;
use serde::Deserialize;
use serde_json::json;
use std::convert::Infallible;
use std::time::Duration;
use tokio::sync::{broadcast, mpsc};

use gantry_api as wire;
use std::sync::Arc;
use utoipa::IntoParams;

use crate::bus::BusEvent;
use crate::clock::rfc3339;
use crate::engine::Engine;

use super::{error::*, jobs::*, views::*};

/// An event's JSON as the streams send it.
pub(crate) fn event_data(e: &Event) -> String {
    let wire = wire::StreamEvent {
        seq: e.seq,
        job_id: e.job_id.to_string(),
        at: rfc3339(e.at),
        state: e.state,
        kind: e.kind.clone(),
    };
    json_of(&wire, "event")
}

/// A frame's JSON. Serialising gantry's own wire types cannot fail (no map has other
/// than string keys, no value is a float NaN): a failure would be a bug, logged, and the
/// frame carries an error object rather than an empty `data:`.
pub(crate) fn json_of<T: serde::Serialize>(value: &T, what: &str) -> String {
    serde_json::to_string(value).unwrap_or_else(|e| {
        tracing::error!(error = %e, what, "cannot serialise a stream frame");
        format!(r#"{{"error":"cannot serialise this {what}"}}"#)
    })
}

pub(crate) fn sse_with(e: &Event, data: &str) -> SseEvent {
    SseEvent::default()
        .id(e.seq.to_string())
        .event(e.kind.name())
        .data(data)
}

pub(crate) fn sse_of_event(e: &Event) -> SseEvent {
    sse_with(e, &event_data(e))
}

/// The terminal event itself, not another event of the same transition (an
/// `attempt_failed` is stored with the job's new state too) nor a late one.
pub(crate) fn ends_stream(e: &Event) -> bool {
    e.state.is_terminal()
        && matches!(
            e.kind,
            EventKind::Succeeded { .. } | EventKind::Failed { .. } | EventKind::Cancelled { .. }
        )
}

/// Send persisted events in order, keeping `last` at the newest sent; false once the
/// stream is over (the client left, or the job's terminal event went out).
pub(crate) async fn send_persisted(
    tx: &mpsc::Sender<SseEvent>,
    events: &[Event],
    last: &mut i64,
) -> bool {
    for e in events {
        *last = e.seq;
        if tx.send(sse_of_event(e)).await.is_err() || ends_stream(e) {
            return false;
        }
    }
    true
}

/// The job's history (state changes and each node's start, end and cached mark) from its
/// first event, or after `since` / `Last-Event-ID`, then live ones (step progress, a
/// command's output lines, which have no `id`), until its terminal event: a client that
/// subscribes late, or again, misses nothing and sees it in order.
#[utoipa::path(get, path = "/v1/jobs/{id}/events", tag = "events",
    params(("id" = String, Path, description = "The job's id"), EventsQuery,
        ("Last-Event-ID" = Option<String>, Header, description = "The last `id` this client saw")),
    responses(
        (status = 200, description = "Server-sent events: persisted ones carry `id: seq`", content_type = "text/event-stream", body = wire::StreamEvent),
        (status = 400, description = "`since` is not a sequence number", body = wire::ErrorBody),
        (status = 404, description = "No such job", body = wire::ErrorBody),
    ))]
pub(crate) async fn job_events(
    State(engine): State<Engine>,
    State(metrics): State<Arc<crate::metrics::Metrics>>,
    Path(id): Path<String>,
    Query(q): Query<EventsQuery>,
    headers: axum::http::HeaderMap,
) -> Result<Sse<impl futures_util::Stream<Item = Result<SseEvent, Infallible>>>, ApiError> {
    let since = since_of(q.since.as_deref(), headers.get("last-event-id"))?;
    let id = parse_id(&id)?;
    // Subscribe before reading the job and its backlog, so nothing falls between.
    let mut live = engine.bus().subscribe();
    let job = load(&engine, id.as_str()).await?;
    let backlog = engine.store().job_events(&job.id, since).await?;
    let (tx, rx) = mpsc::channel::<SseEvent>(256);
    let open = crate::metrics::StreamGuard::new(&metrics);
    tokio::spawn(async move {
        let _open = open;
        let mut last = since;
        if !send_persisted(&tx, &backlog, &mut last).await {
            return;
        }
        // Resumed past the end: nothing more will come.
        if job.state.is_terminal() {
            return;
        }
        loop {
            let next = tokio::select! {
                // A stream never outlives the server: shutdown waits for open connections.
                _ = engine.shutdown_token().cancelled() => return,
                next = live.recv() => next,
            };
            match next {
                // Writers on different tasks may publish out of sequence order: what
                // the store has up to here (everything below a committed number is
                // committed) goes out in order, so none is skipped.
                Ok(BusEvent::Persisted(e)) if e.job_id == job.id && e.seq > last => {
                    let Ok(missed) = engine.store().job_events(&job.id, last).await else {
                        return;
                    };
                    if !send_persisted(&tx, &missed, &mut last).await {
                        return;
                    }
                }
                Ok(BusEvent::Live(l)) if l.job_id == job.id => {
                    if tx
                        .send(SseEvent::default().event(live_kind(&l)).data(live_data(&l)))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
                Ok(_) => {}
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    // Progress may be lost; state changes are re-read from the store.
                    let Ok(missed) = engine.store().job_events(&job.id, last).await else {
                        return;
                    };
                    if !send_persisted(&tx, &missed, &mut last).await {
                        return;
                    }
                }
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
    });
    Ok(sse_of(rx))
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct EventsQuery {
    /// Start after this sequence number (or after `Last-Event-ID`); 0 by default.
    since: Option<String>,
}

/// Every persisted event after `since` (or `Last-Event-ID`), once and in sequence order,
/// then live ones as they commit; with them, without an `id`, each backend's whole row
/// (`backend`: every backend first, then one whenever what it shows changes) and the
/// running jobs' progress (`node`, `progress`). Publishers on different tasks may reach
/// the bus out of sequence order, so a gap is filled from the store (where everything
/// below a published sequence number has committed) rather than skipped. Progress is
/// coalesced for a client that reads slowly (the latest per job wins) and always sent
/// before any later state change, never after it. A client more than `resync_gap`
/// (10 000) events behind (`since` > 0), or ahead of the store, gets one `resync` event instead:
/// fetch `/v1/state` and follow from its `seq`.
#[utoipa::path(get, path = "/v1/events", tag = "events",
    params(EventsQuery, ("Last-Event-ID" = Option<String>, Header, description = "The last `id` this client saw")),
    responses(
        (status = 200, description = "Server-sent events: every job event once and in sequence order (`id` = seq, data a StreamEvent), `backend` rows (data a Backend), `node` and `progress` (data a LiveEvent), or one `resync` (data a Resync)", content_type = "text/event-stream", body = wire::StreamEvent),
        (status = 400, description = "`since` is not a sequence number", body = wire::ErrorBody),
    ))]
pub(crate) async fn all_events(
    State(engine): State<Engine>,
    State(metrics): State<Arc<crate::metrics::Metrics>>,
    Query(q): Query<EventsQuery>,
    headers: axum::http::HeaderMap,
) -> Result<Response, ApiError> {
    let since = since_of(q.since.as_deref(), headers.get("last-event-id"))?;
    let mut live = engine.bus().subscribe();
    let newest = engine.store().last_seq().await?;
    let (tx, rx) = mpsc::channel::<Bytes>(1024);
    let resync = if since > newest {
        Some(format!(
            "since {since} is past the newest event {newest} (another store?)"
        ))
    } else if since > 0 && newest - since > engine.config().resync_gap {
        Some(format!(
            "{} events behind, more than {}",
            newest - since,
            engine.config().resync_gap
        ))
    } else {
        None
    };
    if let Some(reason) = resync {
        let data = json_of(
            &wire::Resync {
                seq: newest,
                reason,
            },
            "resync",
        );
        // The channel is new and empty: the one frame always fits.
        let _ = tx.try_send(frame(None, "resync", &data));
        drop(tx);
        return Ok(farm_body(rx));
    }
    let open = crate::metrics::StreamGuard::new(&metrics);
    streams_runtime().spawn(async move {
        let _open = open;
        let mut last = since;
        let mut feed = Feed {
            tx,
            pending: Vec::new(),
        };
        // Every backend as it is now, then the backlog page by page; then the live tail.
        if !feed.backends(&engine).await || !catch_up(&engine, &feed.tx, &mut last).await {
            return;
        }
        let mut keep_alive = tokio::time::interval(KEEP_ALIVE);
        keep_alive.tick().await;
        // Made once: a fresh `cancelled()` per event would take the token's lock each time.
        let stopping = engine.shutdown_token().clone();
        let cancelled = stopping.cancelled();
        tokio::pin!(cancelled);
        // Committed events that reached the bus ahead of one before them (publishers run
        // on different tasks): held until the gap fills, which takes microseconds, or
        // read from the store if it has not after `HOLD` (200 streams each reading the
        // store on every such gap is what would cost).
        let mut held = Held::new();
        let mut held_until = tokio::time::Instant::now();
        loop {
            let first = tokio::select! {
                _ = tokio::time::sleep_until(held_until), if !held.is_empty() => {
                    let ok = catch_up(&engine, &feed.tx, &mut last).await
                        && feed.release(&mut held, &mut last).await;
                    if !ok {
                        return;
                    }
                    continue;
                }
                // A stream never outlives the server: shutdown waits for open connections.
                _ = &mut cancelled => return,
                next = live.recv() => next,
                // A comment line keeps proxies from closing a quiet stream.
                _ = keep_alive.tick() => {
                    if feed.tx.send(Bytes::from_static(b":\n\n")).await.is_err() {
                        return;
                    }
                    continue;
                }
                // Coalesced progress goes out as soon as the client has room.
                _ = tokio::time::sleep(Duration::from_millis(50)), if !feed.pending.is_empty() => {
                    if !feed.flush().await {
                        return;
                    }
                    continue;
                }
            };
            // Whatever else is already on the bus is handled in the same wake-up: with
            // many streams open, waking each once per event is what costs.
            let mut next = Some(first);
            let mut handled = 0;
            while let Some(event) = next.take() {
                let ok = match event {
                    Ok(BusEvent::Persisted(e)) if e.seq == last + 1 => {
                        last = e.seq;
                        feed.flush().await
                            && feed.tx.send(frame_of_published(&e)).await.is_ok()
                            && feed.release(&mut held, &mut last).await
                    }
                    Ok(BusEvent::Persisted(e)) if e.seq > last => {
                        if held.is_empty() {
                            held_until = tokio::time::Instant::now() + HOLD;
                        }
                        held.insert(e.seq, e);
                        if held.len() > 1024 {
                            feed.flush().await
                                && catch_up(&engine, &feed.tx, &mut last).await
                                && feed.release(&mut held, &mut last).await
                        } else {
                            true
                        }
                    }
                    Ok(BusEvent::BackendState(b)) => {
                        let bytes = b.frame(|b| frame(None, "backend", &json_of(b, "backend row")));
                        feed.flush().await && feed.tx.send(bytes).await.is_ok()
                    }
                    // A command's output goes to its job's stream only.
                    Ok(BusEvent::Live(l)) if matches!(l.kind, wire::LiveKind::Log { .. }) => true,
                    Ok(BusEvent::Live(l)) => feed.live(&l),
                    Ok(_) => true,
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        // Backend rows are not in the store: send them all again.
                        feed.flush().await
                            && catch_up(&engine, &feed.tx, &mut last).await
                            && feed.release(&mut held, &mut last).await
                            && feed.backends(&engine).await
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                };
                if !ok {
                    return;
                }
                handled += 1;
                if handled < 256 {
                    next = match live.try_recv() {
                        Ok(e) => Some(Ok(e)),
                        Err(broadcast::error::TryRecvError::Lagged(n)) => {
                            Some(Err(broadcast::error::RecvError::Lagged(n)))
                        }
                        Err(broadcast::error::TryRecvError::Closed) => {
                            Some(Err(broadcast::error::RecvError::Closed))
                        }
                        Err(broadcast::error::TryRecvError::Empty) => None,
                    };
                }
            }
        }
    });
    Ok(farm_body(rx))
}

/// Where a stream starts: `since`, else `Last-Event-ID`, else 0. Either must be a
/// sequence number (0 or more); the error names the one at fault.
pub(crate) fn since_of(
    query: Option<&str>,
    header: Option<&axum::http::HeaderValue>,
) -> Result<i64, ApiError> {
    let (what, text) = match (query, header) {
        (Some(s), _) => ("since", s.to_owned()),
        (None, Some(h)) => match h.to_str() {
            Ok(s) => ("Last-Event-ID", s.to_owned()),
            Err(_) => {
                return Err(ApiError::bad(
                    "invalid_since",
                    "Last-Event-ID must be an event sequence number, not bytes that are not visible ASCII",
                    json!({ "field": "Last-Event-ID" }),
                ))
            }
        },
        (None, None) => return Ok(0),
    };
    match text.trim().parse::<i64>() {
        Ok(n) if n >= 0 => Ok(n),
        _ => Err(ApiError::bad(
            "invalid_since",
            format!("{what} must be an event sequence number (0 or more), not {text:?}"),
            json!({ "field": what, "since": text }),
        )),
    }
}

/// Where farm streams run: a thread of their own at a lower OS priority, so that with
/// hundreds of monitors open, rendering and queueing their frames gives way to dispatch
/// (tokio has no task priorities; the kernel has thread priorities). Falls back to the
/// caller's runtime if the thread cannot be made.
pub(crate) fn streams_runtime() -> tokio::runtime::Handle {
    static STREAMS: std::sync::OnceLock<Option<tokio::runtime::Handle>> =
        std::sync::OnceLock::new();
    let made = STREAMS.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("gantry-streams")
            .on_thread_start(lower_this_threads_priority)
            .enable_all()
            .build()
            .map_err(|e| tracing::warn!("farm streams share the main runtime: {e}"))
            .ok()?;
        let handle = rt.handle().clone();
        // The runtime lives as long as the process; its thread parks when no stream is open.
        std::mem::forget(rt);
        Some(handle)
    });
    made.clone().unwrap_or_else(tokio::runtime::Handle::current)
}

/// Nice 19 for the calling thread only (Linux applies setpriority to one thread).
pub(crate) fn lower_this_threads_priority() {
    #[cfg(target_os = "linux")]
    // SAFETY: gettid and setpriority take no pointers; failure only leaves the priority as is.
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, 19);
    }
}

/// Committed events a farm stream holds back until the ones before them come.
pub(crate) type Held = std::collections::BTreeMap<i64, Arc<crate::bus::Published>>;

/// How long a farm stream waits for a gap in the sequence to fill from the bus.
pub(crate) const HOLD: Duration = Duration::from_millis(100);

/// How often a quiet farm stream sends a comment line.
pub(crate) const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// One SSE frame.
pub(crate) fn frame(id: Option<i64>, event: &str, data: &str) -> Bytes {
    use bytes::BufMut;
    let mut b = bytes::BytesMut::with_capacity(data.len() + event.len() + 40);
    if let Some(id) = id {
        b.put_slice(b"id: ");
        b.put_slice(id.to_string().as_bytes());
        b.put_u8(b'\n');
    }
    b.put_slice(b"event: ");
    b.put_slice(event.as_bytes());
    b.put_u8(b'\n');
    for line in data.split('\n') {
        b.put_slice(b"data: ");
        b.put_slice(line.as_bytes());
        b.put_u8(b'\n');
    }
    b.put_u8(b'\n');
    b.freeze()
}

pub(crate) fn frame_of_event(e: &Event) -> Bytes {
    frame(Some(e.seq), e.kind.name(), &event_data(e))
}

/// A committed event's frame, made once for every stream.
pub(crate) fn frame_of_published(p: &crate::bus::Published) -> Bytes {
    p.frame(|e| frame(Some(e.seq), e.kind.name(), p.wire(event_data)))
}

/// The farm stream's response: what its task puts on `rx`, whatever has piled up sent
/// as one chunk (one write for a burst, however many streams are open).
pub(crate) fn farm_body(rx: mpsc::Receiver<Bytes>) -> Response {
    const BATCH: usize = 64 * 1024;
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        let first = rx.recv().await?;
        let mut more = Vec::new();
        let mut size = first.len();
        while size < BATCH {
            match rx.try_recv() {
                Ok(b) => {
                    size += b.len();
                    more.push(b);
                }
                Err(_) => break,
            }
        }
        let chunk = if more.is_empty() {
            first
        } else {
            let mut all = bytes::BytesMut::with_capacity(size);
            all.extend_from_slice(&first);
            for b in more {
                all.extend_from_slice(&b);
            }
            all.freeze()
        };
        Some((Ok::<_, Infallible>(chunk), rx))
    });
    (
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        Body::from_stream(stream),
    )
        .into_response()
}

/// One client of `/v1/events`: its channel, and the progress it had no room for.
pub(crate) struct Feed {
    tx: mpsc::Sender<Bytes>,
    /// The latest node and progress event per job, in order of first arrival.
    pending: Vec<(JobId, &'static str, Bytes)>,
}

impl Feed {
    /// Send or coalesce a live event; false once the client has left.
    fn live(&mut self, l: &crate::bus::Published<crate::bus::LiveEvent>) -> bool {
        let kind = live_kind(l);
        let event = l.frame(|l| frame(None, kind, &live_data(l)));
        // Behind coalesced ones, a new event waits its turn so the order holds.
        if !self.pending.is_empty() {
            self.coalesce(l.job_id.clone(), kind, event);
            return true;
        }
        match self.tx.try_send(event) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(event)) => {
                self.coalesce(l.job_id.clone(), kind, event);
                true
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }

    /// Keep only the latest: a progress event replaces the job's pending one (whatever
    /// its node: a node's start and end are persisted events, never coalesced).
    fn coalesce(&mut self, job: JobId, kind: &'static str, event: Bytes) {
        match self
            .pending
            .iter_mut()
            .find(|(j, k, _)| *j == job && *k == kind)
        {
            Some(slot) => slot.2 = event,
            None => self.pending.push((job, kind, event)),
        }
    }

    /// Send what was coalesced, before anything later; false once the client has left.
    async fn flush(&mut self) -> bool {
        for (_, _, event) in std::mem::take(&mut self.pending) {
            if self.tx.send(event).await.is_err() {
                return false;
            }
        }
        true
    }

    /// Send the held events that now follow `last` in sequence, dropping those already
    /// sent; false once the client has left.
    async fn release(&mut self, held: &mut Held, last: &mut i64) -> bool {
        held.retain(|seq, _| *seq > *last);
        while let Some(e) = held.remove(&(*last + 1)) {
            *last = e.seq;
            if self.tx.send(frame_of_published(&e)).await.is_err() {
                return false;
            }
        }
        true
    }

    /// Every backend's row as it is now.
    async fn backends(&mut self, engine: &Engine) -> bool {
        for (b, _) in backend_rows(engine) {
            let data = json_of(&b, "backend row");
            if self.tx.send(frame(None, "backend", &data)).await.is_err() {
                return false;
            }
        }
        true
    }
}

/// The SSE response that sends what a stream's task puts on `rx`, until it ends.
pub(crate) fn sse_of(
    rx: mpsc::Receiver<SseEvent>,
) -> Sse<impl futures_util::Stream<Item = Result<SseEvent, Infallible>>> {
    let stream =
        futures_util::stream::unfold(
            rx,
            |mut rx| async move { rx.recv().await.map(|e| (Ok(e), rx)) },
        );
    Sse::new(stream).keep_alive(KeepAlive::default())
}

/// The SSE event name of a live event.
pub(crate) fn live_kind(l: &crate::bus::LiveEvent) -> &'static str {
    match l.kind {
        wire::LiveKind::Progress { .. } => "progress",
        wire::LiveKind::Log { .. } => "log",
    }
}

/// A live event's JSON as the streams send it.
pub(crate) fn live_data(l: &crate::bus::LiveEvent) -> String {
    json_of(
        &wire::LiveEvent {
            job_id: l.job_id.to_string(),
            attempt: l.attempt,
            backend: l.backend.clone(),
            kind: l.kind.clone(),
        },
        "live event",
    )
}

/// Send every stored event after `last`; false once the client has left.
pub(crate) async fn catch_up(engine: &Engine, tx: &mpsc::Sender<Bytes>, last: &mut i64) -> bool {
    loop {
        let page = match engine.store().events_since(*last, 1000).await {
            Ok(page) => page,
            Err(e) => {
                tracing::warn!(error = %e, "event stream: cannot read the store");
                return false;
            }
        };
        for e in &page {
            *last = e.seq;
            if tx.send(frame_of_event(e)).await.is_err() {
                return false;
            }
        }
        if page.len() < 1000 {
            return true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::LiveEvent;

    fn live(job: &JobId, kind: wire::LiveKind) -> crate::bus::Published<LiveEvent> {
        crate::bus::Published::new(LiveEvent {
            job_id: job.clone(),
            attempt: 1,
            backend: "a".into(),
            kind,
        })
    }

    fn progress(node: &str, value: f64) -> wire::LiveKind {
        wire::LiveKind::Progress {
            node: node.into(),
            value,
            max: 10.0,
        }
    }

    /// A frame as text.
    fn text(e: &Bytes) -> String {
        String::from_utf8_lossy(e).into_owned()
    }

    #[tokio::test]
    async fn a_slow_reader_gets_the_latest_progress_in_order_and_before_what_follows() {
        let (tx, mut rx) = mpsc::channel(1);
        let mut feed = Feed {
            tx,
            pending: Vec::new(),
        };
        let (j, k) = (JobId::random(), JobId::random());
        // The channel takes one; the rest wait, coalesced per job.
        assert!(feed.live(&live(&j, progress("3", 1.0))));
        for v in 2..=5 {
            assert!(feed.live(&live(&j, progress("3", f64::from(v)))));
        }
        assert!(feed.live(&live(&k, progress("7", 1.0))));
        // Progress of the next node makes the job's pending progress moot.
        assert!(feed.live(&live(&j, progress("8", 1.0))));
        assert_eq!(feed.pending.len(), 2, "j's latest progress and k's");
        let first = rx.recv().await.unwrap();
        assert!(text(&first).contains("\"value\":1.0"), "{}", text(&first));
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            while let Some(e) = rx.recv().await {
                got.push(text(&e));
            }
            got
        });
        assert!(feed.flush().await);
        drop(feed);
        let got = reader.await.unwrap();
        assert_eq!(got.len(), 2, "{got:#?}");
        assert!(
            got[0].contains(&j.to_string()) && got[0].contains("\"node\":\"8\""),
            "{got:#?}"
        );
        assert!(got[1].contains(&k.to_string()), "{got:#?}");
        assert!(
            !got.iter().any(|g| g.contains("\"node\":\"3\"")),
            "{got:#?}"
        );
    }
}
