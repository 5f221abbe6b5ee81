//! `gantry agent`: the process on a GPU machine. It opens one outbound WebSocket to a
//! coordinator (`link`), carries the coordinator's TCP streams over it to the local
//! ComfyUI (`tunnel`, whose framing both ends share), supervises that ComfyUI when asked
//! (`supervise`) and runs the command jobs its allow-list admits (`process`). It needs
//! no database and no HTTP server.

pub mod link;
pub mod process;
pub mod supervise;
pub mod tunnel;

/// Wall-clock now as RFC 3339 with milliseconds, for what the agent stamps.
fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}
