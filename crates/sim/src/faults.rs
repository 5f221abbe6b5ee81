//! Fault injection: the `--fault SPEC` strings, parsed, and the choice of which runs
//! each fault hits (`p=0.25` with a seeded generator, or `every=N`).

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::time::Duration;

/// What a fault does.
#[derive(Debug, Clone, PartialEq)]
pub enum Kind {
    /// The prompt is accepted, then stays pending forever; later prompts queue behind it.
    HangBeforeStart,
    /// The first node with progress stops at `at_pct` percent and the server goes silent.
    Stall {
        at_pct: f64,
        /// Keep re-sending the same progress and progress_state, plus status, every 100 ms.
        chatty: bool,
        /// POST /interrupt does not end the stall (a node blocked in one call).
        uninterruptible: bool,
        /// The node goes on this long (simulated time) into the stall and the run
        /// finishes normally: a completion that races the watchdog.
        resume_after: Option<Duration>,
    },
    /// Nodes of this class raise an exception.
    Error { class: String },
    /// The first node that executes raises a CUDA out-of-memory error.
    Oom,
    /// Every WebSocket is dropped (no close frame) this long into a run.
    WsDrop { after: Duration },
    /// Nothing about the run is sent on any WebSocket; it still completes into history.
    WsSilent,
    /// After this many runs the server dies (1006 on every socket, HTTP refused); with
    /// `restart` it comes back that much later, empty.
    Crash {
        after_jobs: u64,
        restart: Option<Duration>,
    },
    /// Everything takes `factor` times longer.
    Slow { factor: f64 },
    /// The run's history entry is never written.
    LoseHistory,
}

/// Which runs a fault hits.
#[derive(Debug, Clone, PartialEq)]
pub enum When {
    Always,
    Probability(f64),
    Every(u64),
}

/// One parsed `--fault` spec.
#[derive(Debug, Clone, PartialEq)]
pub struct Fault {
    pub spec: String,
    pub kind: Kind,
    pub when: When,
}

/// Why a spec was refused; the message names the spec and the part at fault.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("bad fault spec {spec:?}: {reason}")]
pub struct ParseError {
    pub spec: String,
    pub reason: String,
}

impl Fault {
    /// Parses `NAME[:key=value,flag,...]`.
    pub fn parse(spec: &str) -> Result<Fault, ParseError> {
        let err = |reason: String| ParseError {
            spec: spec.to_string(),
            reason,
        };
        let (name, rest) = spec.split_once(':').unwrap_or((spec, ""));
        let mut params: Vec<(String, Option<String>)> = Vec::new();
        for part in rest.split(',').filter(|p| !p.is_empty()) {
            match part.split_once('=') {
                Some((k, v)) => params.push((k.trim().to_string(), Some(v.trim().to_string()))),
                None => params.push((part.trim().to_string(), None)),
            }
        }
        let mut used = vec![false; params.len()];
        let mut take = |key: &str| -> Option<Option<String>> {
            let i = params.iter().position(|(k, _)| k == key)?;
            used[i] = true;
            Some(params[i].1.clone())
        };
        let num = |key: &str, v: Option<Option<String>>| -> Result<Option<f64>, ParseError> {
            match v {
                None => Ok(None),
                Some(None) => Err(err(format!("{key} needs a value ({key}=N)"))),
                Some(Some(s)) => s
                    .parse::<f64>()
                    .ok()
                    .filter(|f| f.is_finite() && *f >= 0.0)
                    .map(Some)
                    .ok_or_else(|| err(format!("{key}={s} is not a non-negative number"))),
            }
        };
        let flag = |key: &str, v: Option<Option<String>>| -> Result<bool, ParseError> {
            match v {
                None => Ok(false),
                Some(None) => Ok(true),
                Some(Some(_)) => Err(err(format!("{key} is a flag and takes no value"))),
            }
        };
        let p = num("p", take("p"))?;
        let every = num("every", take("every"))?;
        let when = match (p, every) {
            (Some(_), Some(_)) => return Err(err("give p= or every=, not both".into())),
            (Some(p), None) if p <= 1.0 => When::Probability(p),
            (Some(p), None) => return Err(err(format!("p={p} is not a probability in [0, 1]"))),
            (None, Some(n)) if n >= 1.0 && n.fract() == 0.0 => When::Every(n as u64),
            (None, Some(n)) => return Err(err(format!("every={n} is not a whole number >= 1"))),
            (None, None) => When::Always,
        };
        let kind = match name {
            "hang-before-start" => Kind::HangBeforeStart,
            "stall" => {
                let at_pct = num("at", take("at"))?.ok_or_else(|| err("stall needs at=PCT".into()))?;
                if at_pct > 100.0 {
                    return Err(err(format!("at={at_pct} is over 100")));
                }
                Kind::Stall {
                    at_pct,
                    chatty: flag("chatty", take("chatty"))?,
                    uninterruptible: flag("uninterruptible", take("uninterruptible"))?,
                    resume_after: num("resume_ms", take("resume_ms"))?
                        .map(|ms| Duration::from_secs_f64(ms / 1000.0)),
                }
            }
            "error" => match take("class") {
                Some(Some(class)) if !class.is_empty() => Kind::Error { class },
                _ => return Err(err("error needs class=CLASS".into())),
            },
            "oom" => Kind::Oom,
            "ws-drop" => {
                let ms = num("after_ms", take("after_ms"))?
                    .ok_or_else(|| err("ws-drop needs after_ms=N".into()))?;
                Kind::WsDrop {
                    after: Duration::from_secs_f64(ms / 1000.0),
                }
            }
            "ws-silent" => Kind::WsSilent,
            "crash" => {
                let after_jobs = num("after_jobs", take("after_jobs"))?
                    .ok_or_else(|| err("crash needs after_jobs=N".into()))?;
                if after_jobs.fract() != 0.0 {
                    return Err(err(format!("after_jobs={after_jobs} is not a whole number")));
                }
                let restart = num("restart_ms", take("restart_ms"))?
                    .map(|ms| Duration::from_secs_f64(ms / 1000.0));
                Kind::Crash {
                    after_jobs: after_jobs as u64,
                    restart,
                }
            }
            "slow" => {
                let factor = num("factor", take("factor"))?
                    .ok_or_else(|| err("slow needs factor=F".into()))?;
                if factor <= 0.0 {
                    return Err(err("factor must be above 0".into()));
                }
                Kind::Slow { factor }
            }
            "lose-history" => Kind::LoseHistory,
            other => {
                return Err(err(format!(
                    "unknown fault {other:?}; known: hang-before-start, stall, error, oom, ws-drop, ws-silent, crash, slow, lose-history"
                )))
            }
        };
        if let Some(i) = used.iter().position(|u| !u) {
            return Err(err(format!(
                "unknown parameter {:?} for {name}",
                params[i].0
            )));
        }
        Ok(Fault {
            spec: spec.to_string(),
            kind,
            when,
        })
    }
}

/// The faults in force, with what each needs to decide which runs it hits.
#[derive(Debug)]
pub struct FaultSet {
    faults: Vec<(Fault, u64)>,
    rng: StdRng,
}

impl FaultSet {
    pub fn new(faults: Vec<Fault>, seed: u64) -> FaultSet {
        FaultSet {
            faults: faults.into_iter().map(|f| (f, 0)).collect(),
            rng: StdRng::seed_from_u64(seed),
        }
    }

    /// Replaces the faults (counters start again; the generator goes on).
    pub fn replace(&mut self, faults: Vec<Fault>) {
        self.faults = faults.into_iter().map(|f| (f, 0)).collect();
    }

    pub fn specs(&self) -> Vec<String> {
        self.faults.iter().map(|(f, _)| f.spec.clone()).collect()
    }

    /// Decides, for one run, which faults hit it. Each fault counts the runs it is asked
    /// about, so `every=3` hits the 3rd, 6th, ... run.
    pub fn roll(&mut self, applies: impl Fn(&Kind) -> bool) -> Vec<Kind> {
        let mut hit = Vec::new();
        for (fault, count) in &mut self.faults {
            if !applies(&fault.kind) {
                continue;
            }
            *count += 1;
            let yes = match fault.when {
                When::Always => true,
                When::Every(n) => *count % n == 0,
                When::Probability(p) => self.rng.random::<f64>() < p,
            };
            if yes {
                hit.push(fault.kind.clone());
            }
        }
        hit
    }

    /// The crash fault, if any, without counting a run.
    pub fn crash(&self) -> Option<(u64, Option<Duration>, When)> {
        self.faults.iter().find_map(|(f, _)| match f.kind {
            Kind::Crash {
                after_jobs,
                restart,
            } => Some((after_jobs, restart, f.when.clone())),
            _ => None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_kind() {
        let ok = [
            ("hang-before-start", Kind::HangBeforeStart),
            (
                "stall:at=50,chatty,uninterruptible",
                Kind::Stall {
                    at_pct: 50.0,
                    chatty: true,
                    uninterruptible: true,
                    resume_after: None,
                },
            ),
            (
                "stall:at=10,resume_ms=1500",
                Kind::Stall {
                    at_pct: 10.0,
                    chatty: false,
                    uninterruptible: false,
                    resume_after: Some(Duration::from_millis(1500)),
                },
            ),
            (
                "error:class=KSampler",
                Kind::Error {
                    class: "KSampler".into(),
                },
            ),
            ("oom", Kind::Oom),
            (
                "ws-drop:after_ms=250",
                Kind::WsDrop {
                    after: Duration::from_millis(250),
                },
            ),
            ("ws-silent", Kind::WsSilent),
            (
                "crash:after_jobs=2,restart_ms=500",
                Kind::Crash {
                    after_jobs: 2,
                    restart: Some(Duration::from_millis(500)),
                },
            ),
            ("slow:factor=2.5", Kind::Slow { factor: 2.5 }),
            ("lose-history", Kind::LoseHistory),
        ];
        for (spec, kind) in ok {
            let f = Fault::parse(spec).unwrap();
            assert_eq!(f.kind, kind, "{spec}");
            assert_eq!(f.when, When::Always);
        }
        assert_eq!(Fault::parse("oom:every=3").unwrap().when, When::Every(3));
        assert_eq!(
            Fault::parse("stall:at=50,p=0.25").unwrap().when,
            When::Probability(0.25)
        );
    }

    #[test]
    fn refuses_bad_specs_with_a_reason() {
        for (spec, needle) in [
            ("explode", "unknown fault"),
            ("stall", "stall needs at=PCT"),
            ("stall:at=150", "over 100"),
            ("stall:at=x", "not a non-negative number"),
            ("oom:p=0.5,every=2", "not both"),
            ("oom:p=2", "probability"),
            ("oom:every=0", "whole number"),
            ("oom:colour=red", "unknown parameter \"colour\""),
            ("error", "class=CLASS"),
            ("stall:at=10,chatty=yes", "flag"),
        ] {
            let e = Fault::parse(spec).unwrap_err();
            assert!(e.to_string().contains(needle), "{spec}: {e}");
            assert!(e.to_string().contains(spec), "{spec}: {e}");
        }
    }

    #[test]
    fn every_and_probability_pick_runs() {
        let mut set = FaultSet::new(vec![Fault::parse("oom:every=3").unwrap()], 7);
        let hits: Vec<bool> = (0..6).map(|_| !set.roll(|_| true).is_empty()).collect();
        assert_eq!(hits, [false, false, true, false, false, true]);

        let roll = |seed| {
            let mut set = FaultSet::new(vec![Fault::parse("oom:p=0.5").unwrap()], seed);
            (0..32)
                .map(|_| !set.roll(|_| true).is_empty())
                .collect::<Vec<_>>()
        };
        assert_eq!(roll(1), roll(1), "the same seed gives the same sequence");
        let n = roll(1).iter().filter(|h| **h).count();
        assert!((4..=28).contains(&n), "p=0.5 hit {n} of 32");
    }
}
