//! What the engine knows of each backend (`BackendState`): its connection, capabilities,
//! health, the attempts it holds and the channel to its driver.

use gantry_core::health::Health;
use gantry_core::workflow::ModelChoices;
use gantry_core::{JobId, Millis};
use std::collections::HashSet;
use std::sync::Arc;
use tokio::sync::mpsc;

use crate::backend::protocol::Command;
use crate::config::BackendConfig;

/// How a backend's connection is, as its driver last saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Connection {
    Connecting,
    Connected,
    Offline,
}

/// What the engine knows of one backend.
pub struct BackendState {
    pub config: BackendConfig,
    pub connection: Connection,
    /// Node classes from `/object_info`.
    pub classes: Option<Arc<HashSet<String>>>,
    /// The model files its loaders offer, from the same read (and refreshed per class
    /// before a submit is refused for a model no backend offered).
    pub models: Option<Arc<ModelChoices>>,
    /// Model files of the latest prompt sent to it: ComfyUI keeps only what its latest
    /// prompt used (PROTOCOL.md section 6), so these are what it holds, or will once
    /// the prompts it has are done.
    pub warm_models: Vec<String>,
    pub last_used: Millis,
    /// The attempt it is running (reserved by the scheduler before the dispatch commits).
    pub current: Option<(JobId, u32)>,
    /// The attempt queued on it behind `current` (pipelining), promoted when it ends.
    pub next: Option<(JobId, u32)>,
    /// Its driver takes a next attempt: `current` is executing and not being stopped.
    pub accepts_next: bool,
    pub last_seen: Option<Millis>,
    /// It has been connected at least once: until then a failed connect is still
    /// `connecting` (the machine may not have started yet), not `offline`.
    pub connected_once: bool,
    pub last_error: Option<String>,
    /// Blocks per workflow shape and the circuit breaker.
    pub health: Health,
    /// A prompt gantry stopped that still runs there after the grace: (prompt id, since).
    pub stuck: Option<(String, Millis)>,
    /// Commands for this backend's driver.
    pub commands: mpsc::UnboundedSender<Command>,
    /// The fencing token of this coordinator's lease on it, while it drives it (always
    /// `Some(0)` with the embedded store, where one coordinator drives every backend).
    pub lease: Option<i64>,
    /// An operator took it out of rotation: it takes no new work; what runs finishes.
    pub draining: bool,
    /// The programs it runs for command jobs: an agent's `--allow` list (`None` until
    /// the agent says), empty for a URL backend.
    pub programs: Option<Arc<Vec<String>>>,
    /// It is an agent's (`/v1/agents/connect`), not a URL the coordinator was given.
    pub agent: bool,
    /// The agent reports its supervised ComfyUI exiting soon after each start.
    pub crash_looping: bool,
    /// The agent is linked to this coordinator now: it can run commands, whatever
    /// state its ComfyUI is in.
    pub linked: bool,
}

impl BackendState {
    /// A configured backend before its driver has connected.
    pub fn new(config: BackendConfig, commands: mpsc::UnboundedSender<Command>) -> BackendState {
        BackendState {
            config,
            connection: Connection::Connecting,
            classes: None,
            models: None,
            warm_models: Vec::new(),
            last_used: 0,
            current: None,
            next: None,
            accepts_next: false,
            last_seen: None,
            connected_once: false,
            last_error: None,
            health: Health::default(),
            stuck: None,
            commands,
            lease: Some(0),
            draining: false,
            programs: Some(Arc::default()),
            agent: false,
            crash_looping: false,
            linked: false,
        }
    }

    /// Hand `command` to the backend's driver. A driver stops only when this coordinator
    /// stops or loses the backend's lease; whoever drives the backend next adopts what
    /// runs there, so what the command asked is left to it, and said in the log.
    pub fn tell(&self, command: Command) {
        if let Err(mpsc::error::SendError(command)) = self.commands.send(command) {
            let (what, job, attempt) = match &command {
                Command::Run(a) => ("run", a.job_id.clone(), a.attempt),
                Command::Stop {
                    job_id, attempt, ..
                } => ("stop", job_id.clone(), *attempt),
            };
            tracing::warn!(backend = %self.config.name, job_id = %job, attempt, "cannot {what} the attempt: the backend's driver has stopped; its next driver adopts what runs there");
        }
    }

    /// Take the node classes a (re)connection reported, unless the answer was empty: a
    /// known value is never replaced by an unknown one (DESIGN.md invariant 8, seed 002).
    pub fn learn_classes(&mut self, classes: HashSet<String>, models: ModelChoices) -> bool {
        if classes.is_empty() {
            return false;
        }
        self.classes = Some(Arc::new(classes));
        self.models = Some(Arc::new(models));
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reconnection_never_forgets_known_classes() {
        let (tx, _rx) = mpsc::unbounded_channel();
        let mut b = BackendState::new(BackendConfig::parse("gpu-1=http://h:1").unwrap(), tx);
        assert!(b.learn_classes(["KSampler".to_owned()].into(), ModelChoices::default()));
        // Seed 002: a re-registration with nothing in it must not blank the record.
        assert!(!b.learn_classes(HashSet::new(), ModelChoices::default()));
        let classes = b.classes.as_deref().unwrap();
        assert!(classes.contains("KSampler"));
        assert_eq!(b.config.name, "gpu-1");
    }
}
