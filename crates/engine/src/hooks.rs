//! What a webhook is, apart from delivering it: the `[callback]` settings, the URLs a
//! callback may name, a callback parsed from a request or the config, the one that applies
//! to a job, and the notices the engine sends the deliverer (`callbacks::run`). A leaf,
//! so the config, the engine and the API use it without the deliverer.

use gantry_api as wire;
use gantry_core::{Callback, Job, JobId};
use serde_json::Value;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

/// `[callback]`: the default webhook and how deliveries are made.
#[derive(Clone, Debug)]
pub struct CallbackConfig {
    /// For jobs that do not name their own.
    pub default: Option<Callback>,
    /// Hosts a callback URL may name; empty means loopback only (127.0.0.0/8, ::1,
    /// localhost), so a job cannot make gantry call arbitrary internal addresses.
    pub allow_hosts: Vec<String>,
    /// How long a delivery is retried before it is given up.
    pub retry_for: Duration,
    /// The first wait between attempts; doubled each time up to a minute.
    pub backoff: Duration,
    /// How long one attempt may take.
    pub timeout: Duration,
}

impl Default for CallbackConfig {
    fn default() -> Self {
        CallbackConfig {
            default: None,
            allow_hosts: Vec::new(),
            retry_for: Duration::from_secs(600),
            backoff: Duration::from_secs(1),
            timeout: Duration::from_secs(10),
        }
    }
}

/// The terminal events a callback gets when it lists none.
pub const DEFAULT_EVENTS: [&str; 3] = ["succeeded", "failed", "cancelled"];

/// Checks a callback URL: http or https, and a host the allow-list admits.
pub fn check_url(url: &str, allow_hosts: &[String]) -> Result<(), String> {
    let parsed = url::Url::parse(url).map_err(|e| format!("{url:?} is not a URL: {e}"))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(format!(
            "{url:?}: the scheme must be http or https, not {}",
            parsed.scheme()
        ));
    }
    let host = match parsed.host() {
        Some(url::Host::Domain(d)) => d.to_ascii_lowercase(),
        Some(url::Host::Ipv4(ip)) => ip.to_string(),
        Some(url::Host::Ipv6(ip)) => ip.to_string(),
        None => return Err(format!("{url:?} has no host")),
    };
    if allow_hosts.is_empty() {
        let loopback =
            host == "localhost" || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback());
        if !loopback {
            return Err(format!(
                "{url:?}: host {host} is not allowed; with no [callback] allow_hosts only \
                 loopback hosts are (127.0.0.1, ::1, localhost)"
            ));
        }
        return Ok(());
    }
    if allow_hosts.iter().any(|h| h.eq_ignore_ascii_case(&host)) {
        Ok(())
    } else {
        Err(format!(
            "{url:?}: host {host} is not in [callback] allow_hosts ({})",
            allow_hosts.join(", ")
        ))
    }
}

/// A callback as given in a submit or the config, checked.
pub fn parse(req: &wire::CallbackRequest, allow_hosts: &[String]) -> Result<Callback, String> {
    check_url(&req.url, allow_hosts)?;
    let events = match &req.events {
        None => DEFAULT_EVENTS.map(String::from).to_vec(),
        Some(list) if list.is_empty() => return Err("events: list at least one event".into()),
        Some(list) => {
            for e in list {
                if !Callback::EVENTS.contains(&e.as_str()) {
                    return Err(format!(
                        "events: no event {e:?} (events: {})",
                        Callback::EVENTS.join(", ")
                    ));
                }
            }
            list.clone()
        }
    };
    if req.secret.as_deref() == Some("") {
        return Err("secret: must not be empty (leave it out for unsigned deliveries)".into());
    }
    Ok(Callback {
        url: req.url.clone(),
        events,
        secret: req.secret.clone(),
    })
}

/// What the engine tells the deliverer.
pub enum Notice {
    /// The job reached a terminal state (committed by this coordinator).
    Ended(Arc<Job>),
    /// A progress step of a job whose callback asks for progress.
    Progress {
        job_id: JobId,
        callback: Arc<Callback>,
        body: Value,
    },
}

/// The job's own callback, else the server's default.
pub fn effective<'a>(job: &'a Job, config: &'a CallbackConfig) -> Option<(&'a Callback, bool)> {
    match &job.spec.callback {
        Some(c) => Some((c, false)),
        None => config.default.as_ref().map(|c| (c, true)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_passes_an_empty_allow_list_and_only_listed_hosts_a_full_one() {
        for ok in [
            "http://127.0.0.1:9/x",
            "https://localhost/hook",
            "http://[::1]:80/",
        ] {
            assert_eq!(check_url(ok, &[]), Ok(()), "{ok}");
        }
        for bad in [
            "http://10.0.0.5/x",
            "http://169.254.169.254/latest/meta-data",
            "http://example.com/",
            "ftp://127.0.0.1/",
            "file:///etc/passwd",
            "not a url",
        ] {
            assert!(check_url(bad, &[]).is_err(), "{bad}");
        }
        let list = vec!["hooks.example.com".to_owned()];
        assert_eq!(check_url("https://HOOKS.example.com/a", &list), Ok(()));
        let e = check_url("http://127.0.0.1/", &list).unwrap_err();
        assert!(e.contains("not in [callback] allow_hosts"), "{e}");
    }

    #[test]
    fn events_default_to_the_terminal_ones_and_unknown_ones_are_named() {
        let req = wire::CallbackRequest {
            url: "http://127.0.0.1:1/".into(),
            events: None,
            secret: None,
        };
        assert_eq!(parse(&req, &[]).unwrap().events, DEFAULT_EVENTS);
        let req = wire::CallbackRequest {
            events: Some(vec!["done".into()]),
            ..req
        };
        let e = parse(&req, &[]).unwrap_err();
        assert!(e.contains("no event \"done\""), "{e}");
    }
}
