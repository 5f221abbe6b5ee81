//! Backends: the kinds of worker gantry drives, each behind the same protocol
//! (`protocol::Command` in, `Engine::apply` out), chosen in one place (`Kind::of`) and
//! started by one function (`spawn`). A ComfyUI at a URL and an agent's ComfyUI (reached
//! through its link, which also runs command jobs) share the ComfyUI driver; `instant`
//! is the in-process backend of `gantry bench engine`.

pub mod comfy;
pub mod command;
pub mod instant;
pub mod protocol;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::{BackendConfig, AGENT_SCHEME};
use crate::engine::Engine;
use protocol::Command;

/// The kinds of backend. A new kind is a module beside `comfy` and `instant` and an arm
/// here and in `spawn`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A ComfyUI server gantry reaches at its URL.
    Comfy,
    /// An agent's ComfyUI, reached through the agent's link (a loopback listener here),
    /// which also runs the agent's command jobs.
    Agent,
    /// Finishes every prompt at once, in process (benchmarks only).
    Instant,
}

impl Kind {
    /// The kind a backend's configuration names.
    pub fn of(config: &BackendConfig, agent: bool) -> Kind {
        if config.instant.is_some() {
            Kind::Instant
        } else if agent || config.url.starts_with(AGENT_SCHEME) {
            Kind::Agent
        } else {
            Kind::Comfy
        }
    }
}

/// Start the driver of backend `name` of `kind`: it takes `commands` until they end or
/// `stop` fires.
pub fn spawn(
    engine: Engine,
    name: String,
    kind: Kind,
    commands: mpsc::UnboundedReceiver<Command>,
    stop: CancellationToken,
) -> JoinHandle<()> {
    match kind {
        Kind::Comfy | Kind::Agent => {
            tokio::spawn(async move { comfy::run(engine, name, commands, stop).await })
        }
        Kind::Instant => {
            tokio::spawn(async move { instant::run(engine, name, commands, stop).await })
        }
    }
}
