//! Backends' health as the engine keeps it: blocks, the circuit breaker's probes, the
//! stuck mark, an operator's drain and unblock.

use super::Engine;
use gantry_core::health::HealthEvent;
use gantry_core::Millis;
use std::sync::Arc;

use crate::bus::{BackendEvent, BusEvent};

pub use crate::clock::now_ms;

impl Engine {
    /// Publish health changes of `backend` on the global stream.
    pub fn publish_health(&self, backend: &str, events: Vec<HealthEvent>) {
        let at = now_ms();
        for kind in events {
            tracing::info!(backend, event = ?kind, "backend health");
            self.inner
                .bus
                .publish(BusEvent::Backend(Arc::new(BackendEvent {
                    backend: backend.to_owned(),
                    at,
                    kind,
                })));
        }
    }

    /// An attempt succeeded on `backend`: its fault streak ends.
    pub fn backend_ok(&self, backend: &str) {
        let events = match self.backends().get_mut(backend) {
            Some(b) => b.health.on_success(),
            None => return,
        };
        self.publish_health(backend, events);
    }

    /// A circuit probe of `backend` answered.
    pub fn probe_result(&self, backend: &str, healthy: bool) {
        let events = match self.backends().get_mut(backend) {
            Some(b) => b
                .health
                .on_probe(healthy, now_ms(), &self.inner.config.health),
            None => return,
        };
        if !events.is_empty() {
            self.wake_scheduler();
        }
        self.publish_health(backend, events);
    }

    /// Mark `backend` stuck on `prompt_id` (Some) or free of it (None).
    pub fn set_stuck(&self, backend: &str, stuck: Option<&str>) {
        let event = {
            let mut backends = self.backends();
            let Some(b) = backends.get_mut(backend) else {
                return;
            };
            match (stuck, b.stuck.take()) {
                (Some(pid), None) => {
                    let since = now_ms();
                    b.stuck = Some((pid.to_owned(), since));
                    // An agent that supervises its ComfyUI restarts it (issue 11).
                    self.inner.agents.on_stuck(backend, pid);
                    HealthEvent::BackendStuck {
                        prompt_id: pid.to_owned(),
                        since,
                    }
                }
                (None, Some((pid, _))) => HealthEvent::BackendRecovered { prompt_id: pid },
                (_, was) => {
                    b.stuck = was;
                    return;
                }
            }
        };
        self.publish_health(backend, vec![event]);
    }

    /// Take `backend` out of rotation (`drain`) or put it back. Answers `None` for a
    /// backend this server does not know, and `Some(false)` for one it knows but does not
    /// drive (another coordinator holds its lease).
    pub fn set_draining(&self, backend: &str, drain: bool) -> Option<bool> {
        let changed = {
            let mut backends = self.backends();
            let b = backends.get_mut(backend)?;
            if b.lease.is_none() {
                return Some(false);
            }
            b.draining = drain;
            true
        };
        tracing::info!(backend, drain, "backend taken out of rotation or put back");
        self.wake_scheduler();
        Some(changed)
    }

    /// Lift `backend`'s block on a workflow shape before its cooldown ends. `None`: no
    /// such backend; `Some(Err(()))`: another coordinator drives it; `Some(Ok(false))`:
    /// it has no such block.
    pub fn lift_block(&self, backend: &str, workflow_hash: &str) -> Option<Result<bool, ()>> {
        let events = {
            let mut backends = self.backends();
            let b = backends.get_mut(backend)?;
            if b.lease.is_none() {
                return Some(Err(()));
            }
            b.health.unblock(workflow_hash)
        };
        if events.is_empty() {
            return Some(Ok(false));
        }
        tracing::info!(backend, workflow_hash, "block lifted by an operator");
        self.publish_health(backend, events);
        self.wake_scheduler();
        Some(Ok(true))
    }

    /// Lift the blocks whose cooldown is over.
    pub(crate) fn expire_blocks(&self, now: Millis) {
        let lifted: Vec<(String, Vec<HealthEvent>)> = self
            .backends()
            .values_mut()
            .filter(|b| b.health.next_change().is_some_and(|at| at <= now))
            .map(|b| (b.config.name.clone(), b.health.expire(now)))
            .collect();
        for (backend, events) in lifted {
            self.publish_health(&backend, events);
        }
    }
}
