//! An in-process backend that finishes every prompt the moment it gets it: no HTTP, no
//! WebSocket, no outputs. It exists so `gantry bench engine` can measure the engine alone
//! (store, scheduler, event bus) with the same dispatch and transition path as a real
//! backend; it is never configured from a file or the command line.

use gantry_core::Input;
use std::collections::HashSet;
use std::sync::Arc;
use tokio::sync::mpsc;

use crate::backend::protocol::Command;
use crate::engine::{now_ms, Connection, Engine};

pub async fn run(
    engine: Engine,
    name: String,
    mut commands: mpsc::UnboundedReceiver<Command>,
    shutdown: tokio_util::sync::CancellationToken,
) {
    {
        let mut backends = engine.backends();
        let Some(b) = backends.get_mut(&name) else {
            return;
        };
        let classes: HashSet<String> = b.config.instant.iter().flatten().cloned().collect();
        b.classes = Some(Arc::new(classes));
        b.connection = Connection::Connected;
        b.connected_once = true;
        b.last_seen = Some(now_ms());
    }
    engine.wake_scheduler();
    loop {
        let cmd = tokio::select! {
            _ = shutdown.cancelled() => return,
            cmd = commands.recv() => match cmd {
                Some(cmd) => cmd,
                None => return,
            },
        };
        match cmd {
            Command::Run(a) => {
                let (job, attempt) = (a.job_id, a.attempt);
                // All three are known at once: one commit, as a cached prompt's would be.
                let inputs = vec![
                    Input::Submitted { attempt },
                    Input::Started { attempt },
                    Input::Succeeded {
                        attempt,
                        outputs: Vec::new(),
                        result: None,
                    },
                ];
                if let Err(e) = engine.apply_steps(&job, inputs).await {
                    tracing::error!(backend = %name, job_id = %job, error = %e, "instant backend cannot record a change");
                }
                free(&engine, &name, &job, attempt);
            }
            Command::Stop {
                job_id,
                attempt,
                confirm,
                ..
            } => {
                if confirm {
                    if let Err(e) = engine
                        .apply(&job_id, Input::CancelConfirmed { attempt })
                        .await
                    {
                        tracing::error!(backend = %name, job_id = %job_id, error = %e, "instant backend cannot record a cancel");
                    }
                }
                free(&engine, &name, &job_id, attempt);
            }
        }
    }
}

fn free(engine: &Engine, name: &str, job: &gantry_core::JobId, attempt: u32) {
    if let Some(b) = engine.backends().get_mut(name) {
        if b.current
            .as_ref()
            .is_some_and(|(j, n)| j == job && *n == attempt)
        {
            b.current = None;
        }
        // In-process: always heard.
        b.last_seen = Some(now_ms());
    }
    engine.wake_scheduler();
}
