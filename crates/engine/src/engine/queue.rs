//! The queued jobs in dispatch order, in memory beside the store (`QueueIndex`).

use gantry_core::{Job, JobId, JobState, Millis};
use std::cmp::Reverse;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

/// Where a queued job stands in dispatch order: priority (higher first), then age.
pub(crate) type QueueKey = (Reverse<i32>, Millis, JobId);

/// The queued jobs in dispatch order, kept beside the store (which stays the truth) so
/// that a scheduling pass reads no rows. Jobs are grouped by everything routing looks at
/// (tags, workflow shape, models, backends to avoid): the jobs of a group are routed
/// alike, so a pass asks once per group, not once per job, and a runnable job is never
/// stuck behind any number of jobs that must wait. Kept by `submit` and `apply`; a
/// version check keeps a slow writer from putting back an older state, and a dispatch
/// refused for a stale entry fixes it.
///
/// The whole job is kept only while the queue is short (`HOT`): beyond that an entry is
/// its key and a few numbers, and the scheduler reads the job from the store when it
/// reaches the head of its group, so a deep queue costs little memory per job.
#[derive(Default)]
pub(crate) struct QueueIndex {
    pub(crate) groups: HashMap<u64, BTreeMap<QueueKey, Entry>>,
    pub(crate) keys: HashMap<JobId, (u64, QueueKey, Option<Millis>)>,
    /// Jobs with a deadline or queue timeout, by when the first of them ends.
    pub(crate) expiries: std::collections::BTreeSet<(Millis, JobId)>,
    /// How often each queued job has been passed over for one a backend was warm for.
    pub(crate) passed: HashMap<JobId, u32>,
}

/// One queued job in the index.
pub(crate) struct Entry {
    pub(crate) version: u64,
    pub(crate) not_before: Millis,
    /// The job itself, while the queue is short.
    pub(crate) job: Option<Arc<Job>>,
}

impl QueueIndex {
    /// Up to this many queued jobs are kept whole.
    pub(crate) const HOT: usize = 4096;

    pub(crate) fn key(job: &Job) -> QueueKey {
        (Reverse(job.spec.priority), job.created_at, job.id.clone())
    }

    /// What routing decides a job by.
    pub(crate) fn group(job: &Job) -> u64 {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        let mut tags = job.spec.tags.clone();
        tags.sort();
        tags.hash(&mut h);
        job.spec.workflow.shape_hash().hash(&mut h);
        job.spec.command.as_ref().map(|c| c.program()).hash(&mut h);
        for m in job.spec.workflow.models() {
            m.file.hash(&mut h);
        }
        let mut avoid: Vec<&str> = job
            .excluded
            .iter()
            .map(|e| e.backend.as_str())
            .chain(
                job.attempts
                    .iter()
                    .filter(|a| a.error.is_some())
                    .map(|a| a.backend.as_str()),
            )
            .collect();
        avoid.sort_unstable();
        avoid.dedup();
        avoid.hash(&mut h);
        h.finish()
    }

    /// When the job's deadline or queue timeout ends, if it has one.
    pub(crate) fn expiry(job: &Job, global: &gantry_core::Timeouts) -> Option<Millis> {
        let timeouts = job.spec.timeouts.or(global);
        let deadline = timeouts
            .deadline_ms
            .filter(|ms| *ms > 0)
            .map(|ms| job.created_at + ms as Millis);
        let queue = timeouts.queue_ms.filter(|ms| *ms > 0).map(|ms| {
            let since = job
                .attempts
                .last()
                .and_then(|a| a.finished_at)
                .unwrap_or(job.created_at);
            since + ms as Millis + 1
        });
        match (deadline, queue) {
            (Some(d), Some(q)) => Some(d.min(q)),
            (d, q) => d.or(q),
        }
    }

    /// Take the job's new state: in the queue when queued, out of it otherwise.
    pub(crate) fn note(&mut self, job: &Job, global: &gantry_core::Timeouts) {
        self.note_from(job, global, job.not_before);
    }

    /// As `note`, not dispatching the job before `not_before` (which may be later than
    /// the job's own: a job another coordinator queued is left to it for a moment).
    pub(crate) fn note_from(
        &mut self,
        job: &Job,
        global: &gantry_core::Timeouts,
        not_before: Millis,
    ) {
        if let Some((g, k, _)) = self.keys.get(&job.id) {
            let newer = self
                .groups
                .get(g)
                .and_then(|m| m.get(k))
                .is_some_and(|e| e.version > job.version);
            if newer {
                return;
            }
        }
        if let Some((g, k, expiry)) = self.keys.remove(&job.id) {
            if let Some(m) = self.groups.get_mut(&g) {
                m.remove(&k);
                if m.is_empty() {
                    self.groups.remove(&g);
                }
            }
            if let Some(at) = expiry {
                self.expiries.remove(&(at, job.id.clone()));
            }
        }
        if job.state != JobState::Queued {
            self.passed.remove(&job.id);
        } else {
            let (g, k) = (Self::group(job), Self::key(job));
            let expiry = Self::expiry(job, global);
            if let Some(at) = expiry {
                self.expiries.insert((at, job.id.clone()));
            }
            let hot = self.keys.len() < Self::HOT;
            self.keys.insert(job.id.clone(), (g, k.clone(), expiry));
            self.groups.entry(g).or_default().insert(
                k,
                Entry {
                    version: job.version,
                    not_before: not_before.max(job.not_before),
                    job: hot.then(|| Arc::new(job.clone())),
                },
            );
        }
    }

    /// The first job of group `g` after `after` that may run at `now`; the end of the
    /// earliest backoff passed over goes into `next`.
    pub(crate) fn eligible(
        &self,
        g: u64,
        after: Option<&QueueKey>,
        now: Millis,
        next: &mut Option<Millis>,
    ) -> Option<QueueKey> {
        use std::ops::Bound;
        let m = self.groups.get(&g)?;
        let from = match after {
            Some(k) => Bound::Excluded(k.clone()),
            None => Bound::Unbounded,
        };
        for (key, e) in m.range((from, Bound::Unbounded)) {
            if e.not_before <= now {
                return Some(key.clone());
            }
            *next = Some(next.map_or(e.not_before, |n| n.min(e.not_before)));
        }
        None
    }

    /// The whole job, when the index keeps it.
    pub(crate) fn hot(&self, id: &JobId) -> Option<Arc<Job>> {
        let (g, k, _) = self.keys.get(id)?;
        self.groups.get(g)?.get(k)?.job.clone()
    }

    pub(crate) fn len(&self) -> usize {
        self.keys.len()
    }

    pub(crate) fn passed(&self, id: &JobId) -> u32 {
        self.passed.get(id).copied().unwrap_or(0)
    }

    /// Another job was dispatched in `id`'s place.
    pub(crate) fn pass(&mut self, id: &JobId) {
        *self.passed.entry(id.clone()).or_default() += 1;
    }
}
