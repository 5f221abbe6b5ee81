//! The writer task that commits a store's job writes in groups.
//!
//! Every write goes to one writer task per store, which takes whatever writes queued up
//! while the previous commit was syncing and commits them in one transaction, each still
//! conditional on its own and answered only after the commit is durable. One sync for
//! many writes is what lets a 202 mean "on disk" at thousands of jobs a second.

use async_trait::async_trait;
use gantry_core::{EventKind, Job, JobId, JobState, Millis};
use tokio::sync::{mpsc, oneshot};

use crate::rows::{EventRows, JobRow};
use crate::{Created, Error, Event, Fence, Result};

pub(crate) enum Op {
    Create {
        row: JobRow,
        /// The job's spec as JSON, written only here.
        spec: String,
        request_hash: String,
        events: EventRows,
    },
    Update {
        row: JobRow,
        events: EventRows,
        fence: Option<Fence>,
    },
    Append {
        events: EventRows,
    },
    /// Delete up to `limit` terminal jobs last changed before `before`, with their events.
    Purge {
        before: Millis,
        limit: u32,
    },
}

impl Op {
    /// The job the write is about, if one.
    pub fn job_id(&self) -> Option<&JobId> {
        match self {
            Op::Create { row, .. } | Op::Update { row, .. } => Some(&row.id),
            Op::Append { events } => Some(&events.job_id),
            Op::Purge { .. } => None,
        }
    }
}

pub(crate) enum Done {
    Created(Created),
    Events(Vec<Event>),
    Purged(u64),
}

pub(crate) struct Write {
    pub op: Op,
    pub reply: oneshot::Sender<Result<Done>>,
}

/// The round of each write in a group: a job written twice in one group is written in
/// two rounds, in order, so each round touches a job at most once.
pub(crate) fn rounds(batch: &[Write]) -> Vec<usize> {
    let mut seen: std::collections::HashMap<&JobId, usize> = std::collections::HashMap::new();
    batch
        .iter()
        .map(|w| match w.op.job_id() {
            Some(id) => {
                let n = seen.entry(id).or_insert(0);
                *n += 1;
                *n - 1
            }
            None => 0,
        })
        .collect()
}

/// A store's way of committing one group of writes in one transaction. Each write's own
/// refusal (a conflict) is its outcome and leaves the others alone; an `Err` means
/// nothing of the group committed.
#[async_trait]
pub(crate) trait Committer: Send + 'static {
    async fn commit(&mut self, batch: &[Write]) -> Result<Vec<Result<Done>>>;
}

/// The most writes one transaction takes.
const MAX_GROUP: usize = 1024;

/// The sending side of a store's writer task.
pub(crate) struct Writer {
    tx: mpsc::UnboundedSender<Write>,
}

impl Writer {
    /// Start the writer task over `committer`; it ends when the `Writer` is dropped.
    pub fn spawn(committer: impl Committer) -> Writer {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(write_loop(committer, rx));
        Writer { tx }
    }

    pub async fn write(&self, op: Op) -> Result<Done> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Write { op, reply })
            .map_err(|_| Error::Database(sqlx::Error::PoolClosed))?;
        rx.await
            .map_err(|_| Error::Database(sqlx::Error::PoolClosed))?
    }

    pub async fn create(&self, job: &Job, request_hash: &str) -> Result<Created> {
        let op = Op::Create {
            row: JobRow::of(job)?,
            spec: serde_json::to_string(&job.spec)?,
            request_hash: request_hash.to_owned(),
            events: EventRows::of(
                job,
                job.created_at,
                &[EventKind::Queued {
                    priority: job.spec.priority,
                }],
            )?,
        };
        match self.write(op).await? {
            Done::Created(c) => Ok(c),
            Done::Events(_) | Done::Purged(_) => Err(unexpected("create")),
        }
    }

    pub async fn update(
        &self,
        job: &Job,
        events: &[EventKind],
        fence: Option<&Fence>,
    ) -> Result<Vec<Event>> {
        let op = Op::Update {
            row: JobRow::of(job)?,
            events: EventRows::of(job, job.updated_at, events)?,
            fence: fence.cloned(),
        };
        events_of(self.write(op).await?)
    }

    pub async fn update_steps(
        &self,
        job: &Job,
        steps: &[(JobState, Vec<EventKind>)],
        fence: Option<&Fence>,
    ) -> Result<Vec<Event>> {
        let op = Op::Update {
            row: JobRow::of(job)?,
            events: EventRows::steps(&job.id, job.updated_at, steps)?,
            fence: fence.cloned(),
        };
        events_of(self.write(op).await?)
    }

    pub async fn append(
        &self,
        job: &JobId,
        state: JobState,
        at: Millis,
        events: &[EventKind],
    ) -> Result<Vec<Event>> {
        let op = Op::Append {
            events: EventRows::about(job, state, at, events)?,
        };
        events_of(self.write(op).await?)
    }

    pub async fn purge(&self, before: Millis, limit: u32) -> Result<u64> {
        match self.write(Op::Purge { before, limit }).await? {
            Done::Purged(n) => Ok(n),
            Done::Created(_) | Done::Events(_) => Err(unexpected("purge")),
        }
    }
}

fn unexpected(what: &str) -> Error {
    Error::Database(sqlx::Error::Protocol(format!(
        "a {what} was answered with another kind of outcome"
    )))
}

fn events_of(done: Done) -> Result<Vec<Event>> {
    match done {
        Done::Events(events) => Ok(events),
        Done::Created(_) | Done::Purged(_) => Err(unexpected("write of events")),
    }
}

/// Take every write that is waiting, commit them together, answer each.
async fn write_loop(mut committer: impl Committer, mut rx: mpsc::UnboundedReceiver<Write>) {
    let mut batch: Vec<Write> = Vec::new();
    while let Some(first) = rx.recv().await {
        batch.push(first);
        while batch.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(w) => batch.push(w),
                Err(_) => break,
            }
        }
        let outcomes = match committer.commit(&batch).await {
            Ok(outcomes) => outcomes,
            Err(e) => {
                // Nothing of the group committed: every write in it fails alike.
                let unavailable = e.is_unavailable();
                let message = e.to_string();
                batch
                    .iter()
                    .map(|_| {
                        Err(if unavailable {
                            Error::Unavailable(message.clone())
                        } else {
                            Error::Database(sqlx::Error::Protocol(message.clone()))
                        })
                    })
                    .collect()
            }
        };
        for (w, outcome) in batch.drain(..).zip(outcomes) {
            // A caller that stopped waiting (its request was dropped) changes nothing: the
            // write stands or fails all the same, and whatever it committed is read from
            // the store by whoever needs it (a stream fills a gap on its bus from there).
            if let Err(outcome) = w.reply.send(outcome) {
                tracing::debug!(
                    job = ?w.op.job_id(),
                    committed = outcome.is_ok(),
                    "a store write's caller left before its outcome"
                );
            }
        }
    }
}

/// Every write of a group gets an outcome, or says it was not carried out.
pub(crate) fn finish(outcomes: Vec<Option<Result<Done>>>) -> Vec<Result<Done>> {
    outcomes
        .into_iter()
        .map(|o| {
            o.unwrap_or_else(|| {
                Err(Error::Database(sqlx::Error::Protocol(
                    "a write of the group was not carried out".into(),
                )))
            })
        })
        .collect()
}
