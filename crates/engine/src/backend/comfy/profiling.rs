//! From ComfyUI's WebSocket messages to an attempt's profile (`gantry_core::profile`):
//! the driver feeds each message about the attempt's prompt here as it arrives, stamped
//! with when gantry heard it.

use gantry_comfy::rest::HistoryEntry;
use gantry_comfy::ws::ServerMessage;
use gantry_core::profile::{Observed, ProfileBuilder};
use gantry_core::Millis;

/// Record `m`, heard at `at`, in `profile` (messages that say nothing about nodes are
/// skipped).
pub fn observe(profile: &mut ProfileBuilder, at: Millis, m: &ServerMessage) {
    let f = |n: &serde_json::Number| n.as_f64().unwrap_or_default();
    match m {
        ServerMessage::ExecutionStart(_) => profile.observe(at, Observed::Start),
        ServerMessage::ExecutionCached(c) => profile.observe(at, Observed::Cached(&c.nodes)),
        ServerMessage::Executing(e) => match &e.node {
            Some(node) => profile.observe(at, Observed::Executing(node)),
            None => profile.observe(at, Observed::Idle),
        },
        ServerMessage::Progress(p) => profile.observe(
            at,
            Observed::Progress {
                node: &p.node,
                value: f(&p.value),
                max: f(&p.max),
            },
        ),
        ServerMessage::Executed(e) => profile.observe(at, Observed::Executed(&e.node)),
        ServerMessage::ExecutionSuccess(_) => profile.observe(at, Observed::Success),
        ServerMessage::ExecutionError(e) => {
            let message = format!("{}: {}", e.exception_type, e.exception_message);
            profile.observe(
                at,
                Observed::Error {
                    node: &e.node_id,
                    message: &message,
                },
            )
        }
        ServerMessage::ExecutionInterrupted(i) => profile.observe(
            at,
            Observed::Interrupted {
                node: Some(&i.node_id),
            },
        ),
        ServerMessage::Status(_)
        | ServerMessage::ProgressState(_)
        | ServerMessage::FeatureFlags(_)
        | ServerMessage::Unknown { .. } => {}
    }
}

/// The prompt's end was read from `/history`, not heard: unless the builder heard the
/// outcome itself, what follows the last message heard is marked missing, and what the
/// entry's status messages tell (start, cached nodes, the error and the nodes that ran
/// before it) fills in, at the backend's timestamps.
pub fn recall_history(profile: &mut ProfileBuilder, now: Millis, entry: &HistoryEntry) {
    if profile.has_outcome() {
        return;
    }
    let from = profile.last_heard().unwrap_or(now);
    profile.observe(
        from,
        Observed::Lost("not heard on the WebSocket: the outcome was read from /history"),
    );
    for (kind, data) in &entry.status.messages {
        let at = data
            .get("timestamp")
            .and_then(serde_json::Value::as_i64)
            .unwrap_or(now);
        let Ok(m) = ServerMessage::from_parts(kind.clone(), data.clone()) else {
            continue;
        };
        match &m {
            ServerMessage::ExecutionStart(_) => profile.recall(at, Observed::Start),
            ServerMessage::ExecutionCached(c) => profile.recall(at, Observed::Cached(&c.nodes)),
            ServerMessage::ExecutionSuccess(_) => profile.recall(at, Observed::Success),
            ServerMessage::ExecutionError(e) => {
                profile.recall(at, Observed::Ran(&e.executed));
                let message = format!("{}: {}", e.exception_type, e.exception_message);
                profile.recall(
                    at,
                    Observed::Error {
                        node: &e.node_id,
                        message: &message,
                    },
                );
            }
            ServerMessage::ExecutionInterrupted(i) => {
                profile.recall(at, Observed::Ran(&i.executed));
                profile.recall(
                    at,
                    Observed::Interrupted {
                        node: Some(&i.node_id),
                    },
                );
            }
            _ => {}
        }
    }
}
