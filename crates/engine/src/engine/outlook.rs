//! What routing says of a job against every backend: why a queued job waits, and what
//! refuses a submit (a class, a model or a program no backend has).

use super::registry::Connection;
use super::Engine;
use gantry_core::health::Health;
use gantry_core::routing::{self, Candidate};
use gantry_core::workflow::{ModelChoices, ModelRef};
use gantry_core::{Job, JobId, JobSpec, JobState, Millis, Workflow};
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::Arc;
use std::time::Duration;

pub use crate::clock::now_ms;

impl Engine {
    /// The first node of `workflow` whose class no backend has, judged by the backends
    /// whose classes are known; `None` when every class is found or nothing is known yet.
    pub fn unknown_class<'w>(&self, workflow: &'w Workflow) -> Option<(&'w str, &'w str)> {
        let backends = self.backends();
        let known: Vec<&HashSet<String>> = backends
            .values()
            .filter_map(|b| b.classes.as_deref())
            .collect();
        if known.is_empty() {
            return None;
        }
        workflow
            .nodes()
            .find(|(_, class)| !known.iter().any(|k| k.contains(*class)))
    }

    /// A model the workflow names that no backend offers, judged only when every
    /// backend has been read: (the model, each backend's reason). A backend that can run
    /// the job on every other count but offers no list for the input accepts it.
    pub fn missing_model(&self, spec: &JobSpec) -> Option<(ModelRef, BTreeMap<String, String>)> {
        let job = Job::new(JobId::random(), spec.clone(), now_ms());
        let backends = self.backends();
        let mut first = None;
        let mut reasons = BTreeMap::new();
        for b in backends.values() {
            let candidate = Candidate {
                name: &b.config.name,
                priority: b.config.priority,
                tags: &b.config.tags,
                classes: b.classes.as_deref(),
                idle: false,
                warm_models: &[],
                last_used: 0,
                blocked: false,
                slow: false,
                programs: b.programs.as_deref().map(Vec::as_slice),
            };
            let reason = match (routing::never_reason(&job, &candidate), &b.models) {
                (Some(never), _) => never,
                // Not read yet: it may have the model.
                (None, None) => return None,
                (None, Some(models)) => {
                    let missing = models.first_missing(&spec.workflow)?;
                    let reason = format!(
                        "does not offer {:?} for node {} input {}",
                        missing.file, missing.node, missing.input
                    );
                    first.get_or_insert(missing);
                    reason
                }
            };
            reasons.insert(b.config.name.clone(), reason);
        }
        Some((first?, reasons))
    }

    /// Read again the model lists of the classes `workflow` loads models with, from
    /// every backend that said it lacks one, so a refusal never rests on a list older
    /// than a file just installed. A backend that does not answer in time keeps its list.
    pub async fn refresh_models(&self, workflow: &Workflow) {
        let classes: BTreeSet<String> = workflow
            .models()
            .iter()
            .filter_map(|m| workflow.class_of(&m.node).map(str::to_owned))
            .collect();
        let targets: Vec<(String, String)> = self
            .backends()
            .values()
            .filter(|b| {
                b.models
                    .as_ref()
                    .is_some_and(|m| m.first_missing(workflow).is_some())
            })
            .map(|b| (b.config.name.clone(), b.config.url.clone()))
            .collect();
        let reads = targets.into_iter().map(|(name, url)| {
            let classes = &classes;
            async move {
                let client = gantry_comfy::Client::with_http(&url, self.inner.http.clone()).ok()?;
                let mut fresher = ModelChoices::default();
                for class in classes {
                    let read = tokio::time::timeout(
                        Duration::from_secs(2),
                        client.object_info_of(class),
                    )
                    .await;
                    match read {
                        Ok(Ok(info)) => fresher.update(ModelChoices::from_object_info(&info)),
                        Ok(Err(e)) => {
                            tracing::debug!(backend = %name, class, error = %e, "cannot read a class's model list");
                            return None;
                        }
                        Err(_) => return None,
                    }
                }
                Some((name, fresher))
            }
        });
        for (name, fresher) in futures_util::future::join_all(reads)
            .await
            .into_iter()
            .flatten()
        {
            if let Some(b) = self.backends().get_mut(&name) {
                let mut models = b.models.as_deref().cloned().unwrap_or_default();
                models.update(fresher);
                b.models = Some(Arc::new(models));
            }
        }
    }

    /// Why no backend can ever run this command job, when each has said what it allows.
    pub fn command_refusal(&self, spec: &JobSpec) -> Option<String> {
        let command = spec.command.as_ref()?;
        let job = Job::new(JobId::random(), spec.clone(), now_ms());
        let backends = self.backends();
        if backends.is_empty() {
            return Some(format!(
                "no agent allows program {:?}: no backend is known (run `gantry agent --allow {}`)",
                command.program(),
                command.program()
            ));
        }
        let mut reasons = Vec::new();
        for b in backends.values() {
            let candidate = Candidate {
                name: &b.config.name,
                priority: b.config.priority,
                tags: &b.config.tags,
                classes: b.classes.as_deref(),
                idle: false,
                warm_models: &[],
                last_used: 0,
                blocked: false,
                slow: false,
                programs: b.programs.as_deref().map(Vec::as_slice),
            };
            // An agent that has not said what it allows yet may allow it
            // (`never_reason` looks at programs only once they are known).
            match routing::never_reason(&job, &candidate) {
                Some(reason) => reasons.push(format!("{}: {reason}", b.config.name)),
                None => return None,
            }
        }
        Some(format!(
            "no backend may run program {:?}: {}",
            command.program(),
            reasons.join("; ")
        ))
    }

    /// Why `job` (queued) is not running now and until when, if it waits; `None` when a
    /// backend could take it now, or none ever can (the scheduler fails it promptly).
    pub fn waiting_for(&self, job: &Job) -> Option<routing::WaitingFor> {
        if job.state != JobState::Queued {
            return None;
        }
        match self.outlook(job, None, None, now_ms()) {
            routing::Outlook::Wait(w) => Some(w),
            routing::Outlook::Ready | routing::Outlook::Never(_) => None,
        }
    }

    /// What routing says of `job` at `now`, over every backend. `freeing` is an attempt
    /// that is ending (its backend counts as free of it); `health` stands in for one
    /// backend's health record (the one the ending attempt's failure is about to make).
    pub(crate) fn outlook(
        &self,
        job: &Job,
        freeing: Option<(&JobId, u32)>,
        health: Option<(&str, &Health)>,
        now: Millis,
    ) -> routing::Outlook {
        let backends = self.backends();
        let hash = job.spec.workflow.shape_hash();
        let command = job.spec.command.is_some();
        let pipeline = self.inner.config.pipeline;
        let mut candidates = Vec::with_capacity(backends.len());
        let mut standings = Vec::with_capacity(backends.len());
        for b in backends.values() {
            let health = match health {
                Some((name, h)) if name == b.config.name => h,
                _ => &b.health,
            };
            let ending = |slot: &Option<(JobId, u32)>| {
                slot.as_ref().is_some_and(|(j, n)| freeing == Some((j, *n)))
            };
            let current = b.current.is_some() && !ending(&b.current);
            let standing = if b.draining {
                routing::Standing::Draining
            } else if command {
                if !(b.linked && b.lease.is_some()) {
                    routing::Standing::Offline { why: None }
                } else if current {
                    routing::Standing::Busy
                } else {
                    routing::Standing::Free
                }
            } else if b.lease.is_none() {
                // Another coordinator drives it and may well take the job.
                routing::Standing::Free
            } else if b.connection != Connection::Connected {
                routing::Standing::Offline {
                    why: b.last_error.clone(),
                }
            } else if let Some(probe_at) = health.probe_at() {
                routing::Standing::CircuitOpen { probe_at }
            } else if let Some(until) = health
                .blocks()
                .get(&hash)
                .copied()
                .filter(|until| *until > now)
            {
                routing::Standing::Blocked { until }
            } else if b.stuck.is_some() {
                routing::Standing::Stuck
            } else if current
                && !(pipeline && b.accepts_next && b.next.is_none() && !ending(&b.next))
            {
                routing::Standing::Busy
            } else {
                routing::Standing::Free
            };
            standings.push(standing);
            candidates.push(Candidate {
                name: &b.config.name,
                priority: b.config.priority,
                tags: &b.config.tags,
                classes: b.classes.as_deref(),
                idle: false,
                warm_models: &[],
                last_used: 0,
                blocked: false,
                slow: false,
                programs: b.programs.as_deref().map(Vec::as_slice),
            });
        }
        routing::outlook(job, &candidates, &standings, now, &crate::clock::rfc3339)
    }
}
