//! Where the server is and how long each kind of operation may take: `--server`,
//! `--token` and the timeouts from their flags, else their `GANTRY_*` variables, else the
//! client config file, else their defaults.

use gantry_client::{Client, Error, Timeouts};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Where the server is and how long each kind of operation may take. Each comes from
/// its flag, else its `GANTRY_*` variable, else the client config file, else its default.
#[derive(clap::Args, Clone, Debug)]
pub struct ServerOpts {
    /// The gantry to talk to [default: http://127.0.0.1:8700].
    #[arg(long, env = "GANTRY_SERVER")]
    server: Option<String>,
    /// Bearer token for a server that asks for one.
    #[arg(long, env = "GANTRY_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Longest wait for a connection [default: 5s].
    #[arg(long, env = "GANTRY_CONNECT_TIMEOUT", value_parser = limit)]
    connect_timeout: Option<Duration>,
    /// Longest wait for one request's answer [default: 30s].
    #[arg(long, env = "GANTRY_REQUEST_TIMEOUT", value_parser = limit)]
    request_timeout: Option<Duration>,
    /// Stop watching after this long (the job goes on); none by default, since the
    /// server owns the job's timeouts.
    #[arg(long, env = "GANTRY_WATCH_TIMEOUT", value_parser = limit)]
    watch_timeout: Option<Duration>,
    /// The client config file (TOML: server, token, connect_timeout, request_timeout,
    /// watch_timeout) [default: $XDG_CONFIG_HOME/gantry/client.toml or
    /// ~/.config/gantry/client.toml, when it exists].
    #[arg(long, env = "GANTRY_CLIENT_CONFIG", value_name = "FILE")]
    client_config: Option<PathBuf>,
    /// Print JSON instead of tables and messages.
    #[arg(long)]
    json: bool,
}

/// The client config file's keys; any other is refused, by name.
#[derive(serde::Deserialize, Default, Debug)]
#[serde(deny_unknown_fields)]
struct ClientFile {
    server: Option<String>,
    token: Option<String>,
    connect_timeout: Option<String>,
    request_timeout: Option<String>,
    watch_timeout: Option<String>,
}

/// What the client uses, once flags, variables, the file and defaults are merged.
#[derive(Clone, Debug)]
pub struct Settings {
    pub server: String,
    pub token: Option<String>,
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
    pub watch_timeout: Option<Duration>,
}

/// The default client config file, when `$XDG_CONFIG_HOME` or `$HOME` says where.
fn default_client_config() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))?;
    Some(base.join("gantry").join("client.toml"))
}

impl ServerOpts {
    pub fn settings(&self) -> Result<Settings, Error> {
        let (file, path) = match &self.client_config {
            Some(path) => (read_client_file(path)?, Some(path.clone())),
            None => match default_client_config().filter(|p| p.exists()) {
                Some(path) => (read_client_file(&path)?, Some(path)),
                None => (ClientFile::default(), None),
            },
        };
        let duration = |key: &str, v: &Option<String>| -> Result<Option<Duration>, Error> {
            v.as_deref()
                .map(|s| {
                    limit(s).map_err(|e| {
                        Error::Invalid(format!(
                            "{}: {key} = {s:?}: {e} (write durations like 30s, 5m)",
                            path.as_deref()
                                .unwrap_or(Path::new("client config"))
                                .display()
                        ))
                    })
                })
                .transpose()
        };
        Ok(Settings {
            server: self
                .server
                .clone()
                .or(file.server)
                .unwrap_or_else(|| "http://127.0.0.1:8700".into()),
            token: self.token.clone().or(file.token),
            connect_timeout: match self.connect_timeout {
                Some(d) => d,
                None => duration("connect_timeout", &file.connect_timeout)?
                    .unwrap_or(Duration::from_secs(5)),
            },
            request_timeout: match self.request_timeout {
                Some(d) => d,
                None => duration("request_timeout", &file.request_timeout)?
                    .unwrap_or(Duration::from_secs(30)),
            },
            watch_timeout: match self.watch_timeout {
                Some(d) => Some(d),
                None => duration("watch_timeout", &file.watch_timeout)?,
            },
        })
    }

    /// Whether `--json` was given.
    pub fn json(&self) -> bool {
        self.json
    }

    pub fn client(&self) -> Result<Client, Error> {
        let s = self.settings()?;
        Client::new(
            &s.server,
            Timeouts {
                connect: s.connect_timeout,
                request: s.request_timeout,
            },
            s.token,
        )
    }
}

fn read_client_file(path: &Path) -> Result<ClientFile, Error> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::Io {
        what: format!("reading the client config {}", path.display()),
        reason: e.to_string(),
    })?;
    toml::from_str(&text)
        .map_err(|e| Error::Invalid(format!("client config {}: {e}", path.display())))
}

/// A client timeout: a human duration of at most ten years, since a deadline adds it to
/// the clock (`--watch-timeout 500000000000y` overflowed it).
pub(super) fn limit(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| e.to_string())?;
    if d > Duration::from_millis(gantry_core::MAX_LIMIT_MS) {
        return Err("longer than the longest limit, 10 years".into());
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A watch deadline is the clock plus the timeout: one past what the clock holds
    /// panicked as it was added.
    #[test]
    fn a_timeout_longer_than_ten_years_is_refused() {
        assert_eq!(limit("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(
            limit("500000000000y"),
            Err("longer than the longest limit, 10 years".to_owned())
        );
        assert!(limit("soon").is_err());
    }
}
