//! A backend's health record: which workflow shapes it is blocked for after failing them
//! (each block lifts by itself after a cooldown), and a circuit breaker that takes the
//! whole backend out of routing after repeated failures until a probe finds it healthy.
//! Pure: the engine feeds it outcomes and the time and publishes what it answers.

use serde::Serialize;
use std::collections::BTreeMap;

use crate::job::Millis;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HealthPolicy {
    /// How long a (backend, workflow hash) pair stays blocked after a backend fault.
    pub block_ms: u64,
    /// Backend faults in a row (with no success between) that open the circuit.
    pub circuit_threshold: u32,
    /// How long the circuit stays open before the first probe; doubles on every reopening
    /// without a success between, up to `circuit_max_ms`.
    pub circuit_ms: u64,
    pub circuit_max_ms: u64,
}

impl Default for HealthPolicy {
    fn default() -> HealthPolicy {
        HealthPolicy {
            block_ms: 60_000,
            circuit_threshold: 3,
            circuit_ms: 30_000,
            circuit_max_ms: 300_000,
        }
    }
}

/// The circuit breaker's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum Circuit {
    Closed,
    /// No new work; probed from `probe_at` on.
    Open {
        since: Millis,
        probe_at: Millis,
    },
}

/// What changed, for the event streams.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum HealthEvent {
    BackendBlocked {
        workflow_hash: String,
        until: Millis,
    },
    BackendUnblocked {
        workflow_hash: String,
    },
    BackendCircuitOpen {
        faults: u32,
        probe_at: Millis,
    },
    BackendCircuitClosed,
    /// gantry stopped a prompt there and it is still running after a grace: the backend
    /// takes nothing new and needs a person (or an agent) to restart it.
    BackendStuck {
        prompt_id: String,
        since: Millis,
    },
    /// The stuck prompt is gone at last.
    BackendRecovered {
        prompt_id: String,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Health {
    /// Workflow hash -> blocked until.
    blocks: BTreeMap<String, Millis>,
    faults_in_row: u32,
    circuit: Circuit,
    /// Open periods since the last success, for the doubling cooldown.
    openings: u32,
}

impl Default for Health {
    fn default() -> Health {
        Health {
            blocks: BTreeMap::new(),
            faults_in_row: 0,
            circuit: Circuit::Closed,
            openings: 0,
        }
    }
}

impl Health {
    pub fn circuit(&self) -> Circuit {
        self.circuit
    }

    pub fn blocks(&self) -> &BTreeMap<String, Millis> {
        &self.blocks
    }

    pub fn is_blocked(&self, workflow_hash: &str, now: Millis) -> bool {
        self.blocks
            .get(workflow_hash)
            .is_some_and(|until| *until > now)
    }

    /// Whether new work may go there at all.
    pub fn accepts_work(&self) -> bool {
        self.circuit == Circuit::Closed
    }

    /// An attempt failed by the backend's fault; `block` names the workflow shape to
    /// block there when the failure was that workflow's own trouble on this backend (a
    /// crash or a lost connection blocks nothing: it only counts towards the breaker).
    pub fn on_fault(
        &mut self,
        block: Option<&str>,
        now: Millis,
        p: &HealthPolicy,
    ) -> Vec<HealthEvent> {
        let mut events = Vec::new();
        if let (Some(workflow_hash), true) = (block, p.block_ms > 0) {
            let until = now + p.block_ms as Millis;
            self.blocks.insert(workflow_hash.to_owned(), until);
            events.push(HealthEvent::BackendBlocked {
                workflow_hash: workflow_hash.to_owned(),
                until,
            });
        }
        self.faults_in_row += 1;
        if p.circuit_threshold > 0
            && self.faults_in_row >= p.circuit_threshold
            && self.circuit == Circuit::Closed
        {
            let cooldown = p
                .circuit_ms
                .saturating_mul(1 << self.openings.min(16))
                .min(p.circuit_max_ms.max(p.circuit_ms));
            self.openings += 1;
            let probe_at = now + cooldown as Millis;
            self.circuit = Circuit::Open {
                since: now,
                probe_at,
            };
            events.push(HealthEvent::BackendCircuitOpen {
                faults: self.faults_in_row,
                probe_at,
            });
        }
        events
    }

    /// An attempt succeeded there: the fault streak ends.
    pub fn on_success(&mut self) -> Vec<HealthEvent> {
        self.faults_in_row = 0;
        self.openings = 0;
        self.close()
    }

    fn close(&mut self) -> Vec<HealthEvent> {
        if self.circuit == Circuit::Closed {
            return Vec::new();
        }
        self.circuit = Circuit::Closed;
        vec![HealthEvent::BackendCircuitClosed]
    }

    /// When a probe is due, if the circuit is open.
    pub fn probe_at(&self) -> Option<Millis> {
        match self.circuit {
            Circuit::Open { probe_at, .. } => Some(probe_at),
            Circuit::Closed => None,
        }
    }

    /// A probe answered. Healthy: the circuit closes, but one more fault reopens it
    /// (half-open), with a longer cooldown. Not healthy: probe again after the cooldown.
    pub fn on_probe(&mut self, healthy: bool, now: Millis, p: &HealthPolicy) -> Vec<HealthEvent> {
        let Circuit::Open { since, .. } = self.circuit else {
            return Vec::new();
        };
        if healthy {
            self.faults_in_row = p.circuit_threshold.saturating_sub(1);
            return self.close();
        }
        self.circuit = Circuit::Open {
            since,
            probe_at: now + p.circuit_ms as Millis,
        };
        Vec::new()
    }

    /// Lift the blocks whose time is up.
    pub fn expire(&mut self, now: Millis) -> Vec<HealthEvent> {
        let lifted: Vec<String> = self
            .blocks
            .iter()
            .filter(|(_, until)| **until <= now)
            .map(|(hash, _)| hash.clone())
            .collect();
        lifted
            .into_iter()
            .map(|hash| {
                self.blocks.remove(&hash);
                HealthEvent::BackendUnblocked {
                    workflow_hash: hash,
                }
            })
            .collect()
    }

    /// Lift a block by hand (the monitor's action).
    pub fn unblock(&mut self, workflow_hash: &str) -> Vec<HealthEvent> {
        match self.blocks.remove(workflow_hash) {
            Some(_) => vec![HealthEvent::BackendUnblocked {
                workflow_hash: workflow_hash.to_owned(),
            }],
            None => Vec::new(),
        }
    }

    /// The earliest moment something here changes by itself.
    pub fn next_change(&self) -> Option<Millis> {
        self.blocks.values().copied().min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> HealthPolicy {
        HealthPolicy {
            block_ms: 60_000,
            circuit_threshold: 3,
            circuit_ms: 30_000,
            circuit_max_ms: 100_000,
        }
    }

    #[test]
    fn a_block_is_per_workflow_and_lifts_by_itself() {
        let p = policy();
        let mut h = Health::default();
        let events = h.on_fault(Some("wf-a"), 1_000, &p);
        assert_eq!(
            events,
            vec![HealthEvent::BackendBlocked {
                workflow_hash: "wf-a".into(),
                until: 61_000
            }]
        );
        assert!(h.is_blocked("wf-a", 60_999));
        assert!(!h.is_blocked("wf-b", 2_000));
        assert!(h.accepts_work());
        assert_eq!(h.next_change(), Some(61_000));
        assert!(h.expire(60_999).is_empty());
        assert_eq!(
            h.expire(61_000),
            vec![HealthEvent::BackendUnblocked {
                workflow_hash: "wf-a".into()
            }]
        );
        assert!(!h.is_blocked("wf-a", 61_000));
        assert_eq!(h.next_change(), None);
    }

    #[test]
    fn repeated_faults_open_the_circuit_and_a_healthy_probe_closes_it() {
        let p = policy();
        let mut h = Health::default();
        h.on_fault(Some("a"), 0, &p);
        h.on_success();
        h.on_fault(Some("b"), 10, &p);
        h.on_fault(Some("c"), 20, &p);
        assert!(h.accepts_work(), "a success broke the streak");
        let events = h.on_fault(Some("d"), 30, &p);
        assert!(events.contains(&HealthEvent::BackendCircuitOpen {
            faults: 3,
            probe_at: 30_030
        }));
        assert!(!h.accepts_work());
        assert_eq!(h.probe_at(), Some(30_030));
        assert!(h.on_probe(false, 30_030, &p).is_empty());
        assert_eq!(h.probe_at(), Some(60_030));
        assert_eq!(
            h.on_probe(true, 60_030, &p),
            vec![HealthEvent::BackendCircuitClosed]
        );
        assert!(h.accepts_work());
        // Half-open: one more fault reopens it, for twice as long.
        let events = h.on_fault(Some("e"), 70_000, &p);
        assert!(events.contains(&HealthEvent::BackendCircuitOpen {
            faults: 3,
            probe_at: 130_000
        }));
        h.on_probe(true, 130_000, &p);
        let events = h.on_fault(Some("f"), 140_000, &p);
        assert!(
            events.contains(&HealthEvent::BackendCircuitOpen {
                faults: 3,
                probe_at: 240_000
            }),
            "capped at circuit_max: {events:?}"
        );
        assert_eq!(h.on_success(), vec![HealthEvent::BackendCircuitClosed]);
    }

    #[test]
    fn zero_turns_blocks_and_the_breaker_off() {
        let p = HealthPolicy {
            block_ms: 0,
            circuit_threshold: 0,
            ..policy()
        };
        let mut h = Health::default();
        for t in 0..10 {
            assert!(h.on_fault(Some("a"), t, &p).is_empty());
        }
        assert!(h.accepts_work());
        assert!(!h.is_blocked("a", 5));
    }

    #[test]
    fn a_fault_that_blocks_nothing_still_counts_towards_the_breaker() {
        let p = policy();
        let mut h = Health::default();
        assert!(h.on_fault(None, 0, &p).is_empty());
        assert!(h.on_fault(None, 1, &p).is_empty());
        assert!(h.blocks().is_empty());
        assert_eq!(
            h.on_fault(None, 2, &p),
            vec![HealthEvent::BackendCircuitOpen {
                faults: 3,
                probe_at: 30_002
            }]
        );
        assert!(!h.accepts_work());
    }
}
