//! The client commands: the farm from a terminal or a script, through `gantry-client`,
//! one module per command or family of commands (`submit`; `watch` and the follow that
//! `submit --watch`, `exec` and `retry --watch` share; `exec`; `jobs`: show, jobs,
//! outputs, cancel, retry; `backends`; `profile`; `stats`), with `opts` (the server,
//! the token, the timeouts, from flags, variables and the client config file) and `ui`
//! (the progress shown while following). Exit codes: 0 succeeded, 1 failed, 130
//! cancelled (Ctrl+C), 2 usage or connection errors.

pub mod backends;
pub mod exec;
pub mod jobs;
pub mod opts;
pub mod profile;
pub mod stats;
pub mod submit;
mod ui;
pub mod watch;

use gantry_client::Error;
use std::process::ExitCode;

/// Exit code for a job cancelled, or a watch stopped by Ctrl+C.
const CANCELLED: u8 = 130;
/// Exit code for bad usage and client errors (unreachable, timed out, refused).
const USAGE: u8 = 2;

/// Say `message` on stderr and answer exit code `code`.
fn fail(code: u8, message: impl std::fmt::Display) -> ExitCode {
    eprintln!("gantry: {message}");
    ExitCode::from(code)
}

/// Exit code 2, for a client error: unreachable, timed out, refused, bad usage.
fn error_exit(e: &Error) -> ExitCode {
    fail(USAGE, e)
}

/// `value` as indented JSON, for `--json` and `--format json`. (Written with
/// `unwrap_or_default` before, a failure printed an empty line, which a script reads as
/// no answer at all; now it is a client error, exit code 2, saying what failed.)
fn pretty_json(value: &impl serde::Serialize, what: &str) -> Result<String, Error> {
    serde_json::to_string_pretty(value).map_err(|e| Error::Io {
        what: format!("writing {what} as JSON"),
        reason: e.to_string(),
    })
}

/// A command's exit code: its own, or 2 when it stopped on a client error.
pub fn exit(done: Result<ExitCode, Error>) -> ExitCode {
    done.unwrap_or_else(|e| error_exit(&e))
}
