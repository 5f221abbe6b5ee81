//! The scheduler: queued jobs to idle backends in priority order, deadlines and queue
//! timeouts of waiting jobs, and retention.

use super::registry::{BackendState, Connection};
use super::{Applied, Engine, Error, QueueIndex, QueueKey};
use gantry_core::routing::{self, Candidate, Choice};
use gantry_core::{Input, Job, JobId, JobState, Millis};
use indexmap::IndexMap;
use std::cmp::Reverse;
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use crate::backend::protocol::{Assignment, Command};

pub use crate::clock::now_ms;

/// How many other groups' heads a free backend may look at for a job it is warm for.
pub(crate) const LOOKAHEAD: usize = 8;
/// How many times a queued job may be passed over for one a free backend is warm for.
pub(crate) const MAX_PASSED: u32 = 8;

/// What one scheduling decision reads: the backends as they are now.
pub(crate) struct Scheduling<'a> {
    backends: &'a IndexMap<String, BackendState>,
    slow: &'a HashSet<(String, String)>,
    /// Some backend has a block or an open circuit (else no job's shape is hashed).
    any_blocks: bool,
    random: bool,
    pipeline: bool,
    now: Millis,
}

impl Scheduling<'_> {
    /// Where `job` goes now (`only` restricts it to that backend), and whether it is
    /// queued behind a running prompt there rather than on an idle backend.
    fn choose(&self, job: &Job, only: Option<&str>) -> (Result<String, Choice>, bool) {
        let hash = self.any_blocks.then(|| job.spec.workflow.shape_hash());
        let command = job.spec.command.is_some();
        let classes: Vec<&str> = job.spec.workflow.nodes().map(|(_, c)| c).collect();
        // An idle backend first; else one whose running prompt can have this one
        // queued behind it.
        let mut choice = Err(Choice::Wait(routing::Waiting::Busy));
        let mut behind = false;
        for second in [false, true] {
            // A command is never queued behind a prompt: it runs on the agent, not in
            // ComfyUI's queue.
            if second
                && !(self.pipeline
                    && job.spec.command.is_none()
                    && matches!(choice, Err(Choice::Wait(_))))
            {
                break;
            }
            let candidates: Vec<Candidate<'_>> = self
                .backends
                .values()
                .map(|b| Candidate {
                    // A command runs on the agent, not in ComfyUI: ComfyUI's health and
                    // reachability are no matter (a command may be what repairs it).
                    blocked: !command
                        && (!b.health.accepts_work()
                            || hash
                                .as_deref()
                                .is_some_and(|h| b.health.is_blocked(h, self.now))),
                    name: &b.config.name,
                    priority: b.config.priority,
                    tags: &b.config.tags,
                    classes: b.classes.as_deref(),
                    idle: if command {
                        b.linked && b.lease.is_some()
                    } else {
                        b.connection == Connection::Connected
                    } && !b.draining
                        && only.is_none_or(|o| o == b.config.name)
                        && if second {
                            b.current.is_some() && b.accepts_next && b.next.is_none()
                        } else {
                            b.current.is_none()
                        },
                    warm_models: if self.random { &[] } else { &b.warm_models },
                    last_used: if self.random {
                        rand::random()
                    } else {
                        b.last_used
                    },
                    slow: !self.random
                        && classes.iter().any(|c| {
                            self.slow
                                .contains(&((*c).to_owned(), b.config.name.clone()))
                        }),
                    programs: b.programs.as_deref().map(Vec::as_slice),
                })
                .collect();
            choice = match routing::choose(job, &candidates) {
                Choice::Run(idx) => Ok(candidates[idx].name.to_owned()),
                other => Err(other),
            };
            behind = second;
        }
        (choice, behind)
    }
}

impl Engine {
    /// The scheduler loop: whenever woken (or every second, for backoffs and queue
    /// timeouts), give queued jobs to idle backends in priority order.
    pub(crate) async fn schedule(self) {
        loop {
            let next = match self.schedule_once().await {
                Ok(next) => next,
                Err(e) => {
                    tracing::warn!(error = %e, "scheduling pass failed");
                    None
                }
            };
            // Wake when a backoff ends or a block lifts, not only on the next tick.
            let tick = Duration::from_millis(500);
            let nap = next
                .map(|at| Duration::from_millis((at - now_ms()).max(0) as u64))
                .map_or(tick, |d| d.min(tick));
            tokio::select! {
                _ = self.inner.shutdown.cancelled() => return,
                _ = self.inner.wake.notified() => {}
                _ = tokio::time::sleep(nap) => {}
            }
        }
    }

    /// Delete jobs that finished longer than `retention` ago, and node statistics of
    /// hours older than `stats_retention`, once a minute.
    pub(crate) async fn purge_loop(self) {
        const PASS: u32 = 1000;
        let retention = self.inner.config.retention.as_millis() as Millis;
        loop {
            let before = now_ms() - retention;
            let mut more = retention > 0;
            while more {
                more = false;
                match self.inner.store.purge_finished(before, PASS).await {
                    Ok(n) if n == u64::from(PASS) => more = true,
                    Ok(0) => {}
                    Ok(n) => tracing::info!(jobs = n, "purged finished jobs past retention"),
                    Err(e) => tracing::warn!(error = %e, "cannot purge finished jobs"),
                }
            }
            let stats = self.inner.config.stats_retention.as_millis() as Millis;
            if stats > 0 {
                match self.inner.store.purge_node_stats(now_ms() - stats).await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(rows = n, "purged node statistics past retention"),
                    Err(e) => tracing::warn!(error = %e, "cannot purge node statistics"),
                }
            }
            tokio::select! {
                _ = self.inner.shutdown.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(60)) => {}
            }
        }
    }

    /// One pass over the queue; answers when the next backoff, block or timeout ends.
    ///
    /// Timeouts come from the index of expiries, so only the jobs whose time is up are
    /// looked at. Dispatching asks each group of alike jobs (see `QueueIndex`) in
    /// priority order while some backend is idle, so a pass costs the same with 100 or
    /// 100 000 jobs waiting. Every `SWEEP_MS` every group is asked even with no backend
    /// idle, so a job that can never run fails promptly.
    pub(crate) async fn schedule_once(&self) -> Result<Option<Millis>, Error> {
        const SWEEP_MS: Millis = 200;
        let now = now_ms();
        self.expire_blocks(now);
        let mut next: Option<Millis> = self
            .backends()
            .values()
            .filter_map(|b| b.health.next_change())
            .min();
        self.expire_queued(now).await?;
        let sweep = {
            let mut last = self
                .inner
                .last_sweep
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            let due = now - *last >= SWEEP_MS;
            if due {
                *last = now;
            }
            due
        };
        let pipeline = self.inner.config.pipeline;
        let idle = |backends: &IndexMap<String, BackendState>| {
            backends.values().any(|b| {
                b.connection == Connection::Connected
                    && !b.draining
                    && b.health.accepts_work()
                    && (b.current.is_none() || (pipeline && b.accepts_next && b.next.is_none()))
            })
        };
        let earliest = |next: Option<Millis>, q: &QueueIndex| {
            // One whose expiry was refused stays behind: it must not make the loop spin.
            let expiry = q.expiries.iter().map(|(at, _)| *at).find(|at| *at > now);
            [next, expiry, Some(now + SWEEP_MS)]
                .into_iter()
                .flatten()
                .min()
        };
        if !sweep && !idle(&self.backends()) {
            return Ok(earliest(next, &self.queue()));
        }
        // The head of each group, best first.
        let mut heads = std::collections::BinaryHeap::new();
        {
            let q = self.queue();
            for g in q.groups.keys() {
                if let Some(key) = q.eligible(*g, None, now, &mut next) {
                    heads.push(Reverse((key, *g)));
                }
            }
        }
        let any_blocks = self
            .backends()
            .values()
            .any(|b| !b.health.blocks().is_empty() || !b.health.accepts_work());
        let mut dispatches = Vec::new();
        while let Some(Reverse((key, g))) = heads.pop() {
            let hot = self.queue().hot(&key.2);
            let job = match hot {
                Some(job) => job,
                None => match self.inner.store.job(&key.2).await? {
                    Some(job) if job.state == JobState::Queued => Arc::new(job),
                    other => {
                        // The index was behind the store: take the stored state.
                        if let Some(job) = other {
                            self.queue().note(&job, &self.inner.config.timeouts);
                        }
                        if let Some(key) = self.queue().eligible(g, Some(&key), now, &mut next) {
                            heads.push(Reverse((key, g)));
                        }
                        continue;
                    }
                },
            };
            let random = self.inner.config.routing == crate::config::Routing::Random;
            // Other groups' heads of the same priority that a free backend may take
            // instead, when it is warm for their model files and cold for this job's
            // (ComfyUI reloads weights it does not hold: seconds per job). Bounded: a
            // job is passed over at most `MAX_PASSED` times.
            let job_models: Vec<String> = job.spec.workflow.model_files();
            let mut others: Vec<(QueueKey, u64, Arc<Job>)> = Vec::new();
            let mut set_aside = Vec::new();
            if !random && !job_models.is_empty() && self.queue().passed(&job.id) < MAX_PASSED {
                let q = self.queue();
                while others.len() < LOOKAHEAD {
                    let Some(Reverse((k, og))) = heads.peek().cloned() else {
                        break;
                    };
                    if k.0 != key.0 {
                        break;
                    }
                    heads.pop();
                    if let Some(other) = q.hot(&k.2) {
                        others.push((k, og, other));
                    } else {
                        set_aside.push(Reverse((k, og)));
                    }
                }
            }
            let (taken, choice) = {
                let mut backends = self.backends();
                let slow = self.lock_slow();
                if !sweep && !idle(&backends) {
                    break;
                }
                let view = Scheduling {
                    backends: &backends,
                    slow: &slow,
                    any_blocks,
                    random,
                    pipeline,
                    now,
                };
                let (choice, behind) = view.choose(&job, None);
                // The job dispatched now: this one, or another group's head.
                let mut taken = None;
                if let Ok(name) = &choice {
                    let warm = |models: &[String]| {
                        backends
                            .get(name)
                            .is_some_and(|b| models.iter().all(|m| b.warm_models.contains(m)))
                    };
                    if !warm(&job_models) {
                        taken = others.iter().position(|(_, _, other)| {
                            let models: Vec<String> = other.spec.workflow.model_files();
                            !models.is_empty()
                                && warm(&models)
                                && view.choose(other, Some(name)) == (Ok(name.clone()), behind)
                        });
                    }
                }
                let job = match taken {
                    Some(i) => &others[i].2,
                    None => &job,
                };
                if let Ok(backend) = &choice {
                    if let Some(b) = backends.get_mut(backend) {
                        // Reserve before the dispatch commits, so no other job takes it.
                        let slot = Some((job.id.clone(), job.attempts.len() as u32 + 1));
                        if behind {
                            b.next = slot;
                            b.accepts_next = false;
                        } else {
                            b.current = slot;
                        }
                        b.last_used = now;
                        b.warm_models = job.spec.workflow.model_files();
                    }
                }
                (taken, choice)
            };
            // What was looked at and not taken goes back; so does this job when another
            // took its place (it is the best head still).
            let (job, key, g) = match taken {
                Some(i) => {
                    let (k, og, other) = others.swap_remove(i);
                    self.queue().pass(&job.id);
                    heads.push(Reverse((key, g)));
                    (other, k, og)
                }
                None => (job, key, g),
            };
            heads.extend(others.into_iter().map(|(k, og, _)| Reverse((k, og))));
            heads.extend(set_aside);
            let go_on = match choice {
                Ok(backend) => {
                    dispatches.push((job, backend));
                    true
                }
                Err(Choice::Never(error)) => {
                    self.apply(&job.id, Input::Unroutable { error }).await?;
                    true
                }
                // The rest of the group would wait alike.
                Err(Choice::Run(_) | Choice::Wait(_)) => false,
            };
            if go_on {
                if let Some(key) = self.queue().eligible(g, Some(&key), now, &mut next) {
                    heads.push(Reverse((key, g)));
                }
            }
        }
        // The dispatches commit together (the store groups concurrent writes).
        let results = futures_util::future::join_all(
            dispatches
                .iter()
                .map(|(job, backend)| self.dispatch(job, backend)),
        )
        .await;
        for r in results {
            r?;
        }
        Ok(earliest(next, &self.queue()))
    }

    /// Fail the queued jobs whose deadline or queue timeout has passed.
    pub(crate) async fn expire_queued(&self, now: Millis) -> Result<(), Error> {
        let due: Vec<JobId> = self
            .queue()
            .expiries
            .iter()
            .take_while(|(at, _)| *at <= now)
            .map(|(_, id)| id.clone())
            .collect();
        for id in due {
            let hot = self.queue().hot(&id);
            let job = match hot {
                Some(job) => job,
                None => match self.inner.store.job(&id).await? {
                    Some(job) => Arc::new(job),
                    None => continue,
                },
            };
            let timeouts = job.spec.timeouts.or(&self.inner.config.timeouts);
            if let Some(limit) = timeouts.deadline_ms.filter(|ms| *ms > 0) {
                if now - job.created_at >= limit as i64 {
                    self.apply(&job.id, Input::DeadlinePassed { limit_ms: limit })
                        .await?;
                    continue;
                }
            }
            if let Some(limit) = timeouts.queue_ms.filter(|ms| *ms > 0) {
                self.apply(&job.id, Input::QueueTimeout { limit_ms: limit })
                    .await?;
            }
        }
        Ok(())
    }

    pub(crate) async fn dispatch(&self, job: &Job, backend: &str) -> Result<(), Error> {
        let prompt_id = uuid::Uuid::new_v4().to_string();
        let reserved = (job.id.clone(), job.attempts.len() as u32 + 1);
        let applied = self
            .apply(
                &job.id,
                Input::Dispatch {
                    backend: backend.to_owned(),
                    prompt_id,
                },
            )
            .await;
        let mut backends = self.backends();
        let Some(b) = backends.get_mut(backend) else {
            return Ok(());
        };
        // The reservation may have moved from `next` to `current` meanwhile (the prompt
        // ahead ended): clear it wherever it is.
        let release = |b: &mut BackendState| {
            if b.current.as_ref() == Some(&reserved) {
                b.current = b.next.take();
            } else if b.next.as_ref() == Some(&reserved) {
                b.next = None;
            }
        };
        match applied {
            Ok(Applied::Changed(job)) => {
                if let Some(attempt) = job.live_attempt() {
                    let limits = self.limits_for(&job, backend);
                    let assignment = Assignment::new(&job, attempt, limits, false);
                    b.tell(Command::Run(Box::new(assignment)));
                } else {
                    release(b);
                }
                Ok(())
            }
            Ok(Applied::Refused(..)) => {
                release(b);
                Ok(())
            }
            Err(e) => {
                release(b);
                Err(e)
            }
        }
    }
}
