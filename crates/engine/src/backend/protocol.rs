//! What the engine asks of a backend's driver, whatever the kind of backend: run an
//! attempt (`Assignment`, with everything needed to run and judge it) or stop one.

use gantry_core::watchdog::Limits;
use gantry_core::{Attachment, Attempt, AttemptStatus, Exclusion, Job, JobId, Millis, Workflow};
use std::collections::HashMap;

/// What the engine asks of a driver.
#[derive(Debug)]
pub enum Command {
    /// Run this attempt (or, when `adopt` is set, find and follow one a previous process
    /// started).
    Run(Box<Assignment>),
    /// Stop an attempt on the backend. With `confirm`, the job waits for the backend to
    /// confirm (a cancel); without, the attempt is already over for gantry.
    Stop {
        job_id: JobId,
        attempt: u32,
        prompt_id: String,
        confirm: bool,
    },
}

/// One attempt, with what the driver needs to run and judge it.
#[derive(Debug, Clone)]
pub struct Assignment {
    pub job_id: JobId,
    pub attempt: u32,
    pub prompt_id: String,
    pub workflow: Workflow,
    pub models: Vec<String>,
    /// Input files to upload before the submit; `uploaded` maps each attachment's name
    /// to where this backend put it, once uploaded.
    pub attachments: Vec<Attachment>,
    pub uploaded: HashMap<String, String>,
    pub limits: Limits,
    /// The job's deadline on the wall clock, and its length.
    pub deadline: Option<(Millis, u64)>,
    pub excluded: Vec<Exclusion>,
    /// A command job's program, run by the agent instead of a prompt (`command`).
    pub command: Option<gantry_core::CommandSpec>,
    pub adopt: bool,
    pub status: AttemptStatus,
    /// The attempt's span: what the driver logs while handling it carries the job id,
    /// the attempt number and the backend.
    pub span: tracing::Span,
}

impl Assignment {
    pub fn new(job: &Job, attempt: &Attempt, limits: Limits, adopt: bool) -> Assignment {
        Assignment {
            job_id: job.id.clone(),
            attempt: attempt.number,
            prompt_id: attempt.prompt_id.clone(),
            workflow: job.spec.workflow.clone(),
            models: job.spec.workflow.model_files(),
            attachments: job.spec.attachments.clone(),
            uploaded: HashMap::new(),
            deadline: limits
                .deadline()
                .map(|ms| (job.created_at + ms as Millis, ms)),
            limits,
            excluded: job.excluded.clone(),
            command: job.spec.command.clone(),
            adopt,
            status: attempt.status,
            span: tracing::info_span!(
                "attempt",
                job_id = %job.id,
                attempt = attempt.number,
                backend = %attempt.backend
            ),
        }
    }
}
