//! The progress shown while a job is followed: bars on a terminal, one line per event
//! elsewhere, a command's output as its program wrote it.

use gantry_client::Event;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use serde_json::Value;
use std::collections::HashSet;
use std::io::IsTerminal;

/// Progress on stderr: bars on a terminal, one line per event elsewhere.
pub(super) struct Ui {
    show: bool,
    /// A command's output goes to stdout and stderr as its program wrote it (`exec`),
    /// not as prefixed progress lines.
    raw_logs: bool,
    bars: Option<(MultiProgress, ProgressBar, ProgressBar)>,
    started: HashSet<String>,
    backend: String,
}

impl Ui {
    pub(super) fn new(show: bool, nodes: usize, raw_logs: bool) -> Ui {
        let bars = (show && !raw_logs && std::io::stderr().is_terminal()).then(|| {
            let multi = MultiProgress::new();
            let overall = multi.add(ProgressBar::new(nodes as u64));
            // The templates are constants, known to parse: the default bar is never used.
            overall.set_style(
                ProgressStyle::with_template("{prefix:>8} [{bar:30}] {pos}/{len} nodes {msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            overall.set_prefix("job");
            let node = multi.add(ProgressBar::new(0));
            node.set_style(
                ProgressStyle::with_template("{prefix:>8} [{bar:30}] {pos}/{len} {msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            node.set_prefix("node");
            (multi, overall, node)
        });
        Ui {
            show,
            raw_logs,
            bars,
            started: HashSet::new(),
            backend: String::new(),
        }
    }

    pub(super) fn line(&self, text: &str) {
        match &self.bars {
            Some((multi, ..)) => {
                // Only fails when stderr cannot be written: nowhere left to say anything.
                let _ = multi.println(text);
            }
            None if self.show => eprintln!("{text}"),
            None => {}
        }
    }

    pub(super) fn on(&mut self, e: &Event) {
        let d = &e.data;
        let s = |k: &str| d[k].as_str().unwrap_or_default().to_owned();
        match e.name.as_str() {
            "queued" => self.line("queued"),
            "dispatched" => {
                self.backend = s("backend");
                self.line(&format!(
                    "attempt {} dispatched to {}",
                    d["attempt"], self.backend
                ));
            }
            "started" => self.line(&format!("started on {}", self.backend)),
            "node_started" => {
                self.started.insert(s("node"));
                let text = format!(
                    "node {} ({}) on {}",
                    s("node"),
                    s("class_type"),
                    s("backend")
                );
                match &self.bars {
                    Some((_, overall, node)) => {
                        overall.set_position(self.started.len().saturating_sub(1) as u64);
                        node.reset();
                        node.set_length(0);
                        node.set_message(text);
                    }
                    None => self.line(&text),
                }
            }
            "progress" => {
                let (value, max) = (
                    d["value"].as_f64().unwrap_or(0.0),
                    d["max"].as_f64().unwrap_or(0.0),
                );
                match &self.bars {
                    Some((_, _, node)) => {
                        node.set_length(max as u64);
                        node.set_position(value as u64);
                    }
                    None => self.line(&format!("  node {} step {value}/{max}", s("node"))),
                }
            }
            "node_finished" if self.bars.is_none() => {
                let took = d["duration_ms"]
                    .as_u64()
                    .map(|ms| format!(" in {ms} ms"))
                    .unwrap_or_default();
                self.line(&format!(
                    "node {} ({}) {}{took}",
                    s("node"),
                    s("class_type"),
                    s("status")
                ));
            }
            "nodes_cached" => {
                let nodes: Vec<&str> = d["nodes"]
                    .as_array()
                    .map(|a| a.iter().filter_map(Value::as_str).collect())
                    .unwrap_or_default();
                for n in &nodes {
                    self.started.insert((*n).to_owned());
                }
                match &self.bars {
                    Some((_, overall, _)) => overall.set_position(self.started.len() as u64),
                    None => self.line(&format!("cached: node {}", nodes.join(", "))),
                }
            }
            "attempt_failed" => {
                let will_retry = d["will_retry"].as_bool().unwrap_or(false);
                self.line(&format!(
                    "attempt {} failed on {}: {}{}",
                    d["attempt"],
                    s("backend"),
                    d["error"]["message"].as_str().unwrap_or_default(),
                    if will_retry { "; retrying" } else { "" }
                ));
            }
            "job_retrying" => match d["waiting_for"]["message"].as_str() {
                Some(why) => self.line(&format!(
                    "next attempt in at least {} ms: {why}",
                    d["delay_ms"]
                )),
                None => self.line(&format!("next attempt in {} ms", d["delay_ms"])),
            },
            "backend_blocked" => self.line(&format!(
                "{} blocked for this workflow until {}",
                s("backend"),
                s("until")
            )),
            "cancel_requested" => self.line("cancel requested"),
            // A command job's output, as its program wrote it.
            "log" if self.raw_logs => match d["stream"].as_str() {
                Some("stderr") => eprintln!("{}", s("line")),
                _ => println!("{}", s("line")),
            },
            "log" => self.line(&format!("[{}] {}", s("stream"), s("line"))),
            _ => {}
        }
    }

    pub(super) fn finish(&mut self) {
        if let Some((multi, overall, node)) = self.bars.take() {
            overall.finish_and_clear();
            node.finish_and_clear();
            // As in `line`: only fails when stderr cannot be written.
            let _ = multi.clear();
        }
    }
}
