//! The engine's side of a farm of coordinators: the leases it holds and what another
//! coordinator's changes ask of it.

use super::Engine;
use gantry_core::{Job, JobId, JobState, Millis};

use crate::backend::protocol::Command;

pub use crate::clock::now_ms;

impl Engine {
    /// The backends leased here, with their tokens.
    pub fn owned_leases(&self) -> Vec<(String, i64)> {
        if self.inner.cluster.is_none() {
            return Vec::new();
        }
        self.backends()
            .values()
            .filter_map(|b| b.lease.map(|t| (b.config.name.clone(), t)))
            .collect()
    }

    pub fn leases_backend(&self, name: &str) -> bool {
        self.backends().get(name).is_some_and(|b| b.lease.is_some())
    }

    /// A lease to give back when this coordinator has more than its share: an idle
    /// backend's if there is one. Never an agent's: only the coordinator it links to can
    /// drive it.
    pub fn lease_to_give_back(&self) -> Option<(String, i64)> {
        let backends = self.backends();
        let owned = || backends.values().filter(|b| b.lease.is_some() && !b.agent);
        owned()
            .find(|b| b.current.is_none())
            .or_else(|| owned().next())
            .and_then(|b| b.lease.map(|t| (b.config.name.clone(), t)))
    }

    pub fn is_queued_here(&self, id: &JobId) -> bool {
        self.queue().keys.contains_key(id)
    }

    /// An attempt of the job runs (or waits) on a backend driven here.
    pub fn runs_here(&self, id: &JobId) -> bool {
        self.backends().values().any(|b| {
            [&b.current, &b.next]
                .iter()
                .any(|s| s.as_ref().is_some_and(|(j, _)| j == id))
        })
    }

    /// Take the stored state of a job another coordinator queued or took into the queue
    /// index. A queued one is left to that coordinator for `STEAL_MS` first: every
    /// coordinator racing to claim every job wastes writes, and the one that queued it
    /// dispatches it at once if it can.
    pub fn note_queued(&self, job: &Job) {
        const STEAL_MS: Millis = 50;
        self.queue()
            .note_from(job, &self.inner.config.timeouts, now_ms() + STEAL_MS);
        if job.state == JobState::Queued {
            self.wake_scheduler();
        }
    }

    /// Another coordinator finished the job or asked to cancel it: stop its attempt on
    /// the backend driven here.
    pub fn stop_here(&self, job: &Job) {
        let confirm = job.state == JobState::Running && job.cancel_requested;
        let backends = self.backends();
        for b in backends.values() {
            for slot in [&b.current, &b.next] {
                let Some((id, n)) = slot else { continue };
                if *id != job.id {
                    continue;
                }
                let Some(a) = job.attempts.get((*n as usize).saturating_sub(1)) else {
                    continue;
                };
                if job.state.is_terminal() || confirm {
                    b.tell(Command::Stop {
                        job_id: job.id.clone(),
                        attempt: *n,
                        prompt_id: a.prompt_id.clone(),
                        confirm,
                    });
                }
            }
        }
    }
}
