//! One prompt's run, from `execution_start` to its history entry and end marker, and the
//! messages a run sends on the way (`add_message`, `progress_state`, `progress`, previews),
//! with the stall fault that freezes them. What each node does is in `execute`.
//!
//! A run begins in `Sim::start`, in the worker's critical section that takes the prompt,
//! and goes on in `Sim::run`.

use super::cache::{execution_order, signature, Data};
use super::{Item, Out, RunRecord, Sim, State, MAX_HISTORY, POLL};
use crate::faults::Kind;
use crate::image::Picture;
use bytes::Bytes;
use gantry_comfy::ws::{BinaryMessage, FORMAT_JPEG};
use indexmap::IndexMap;
use serde_json::{json, Map, Number, Value};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::sync::mpsc;

/// Why a run stopped early.
pub(super) enum Stop {
    Interrupted {
        node: String,
    },
    Failed {
        node: String,
        message: String,
        kind: String,
        inputs: Value,
    },
}

/// A prompt the worker took whose `execution_start` is sent: the rest of its run.
#[derive(Debug)]
pub(super) struct Started {
    item: Item,
    /// The faults that hit this run.
    kinds: Vec<Kind>,
    /// `crash`: die at the first node, then restart after the duration (or stay down).
    crash: Option<Option<Duration>>,
    started_us: i64,
    /// `execution_start`, for the history entry.
    messages: Vec<(String, Value)>,
}

impl State {
    /// execution.py add_message: recorded for history; sent to the prompt's client, or
    /// broadcast when `broadcast` and the prompt has none; never sent while ws-silent.
    fn add_message(
        &self,
        messages: &mut Vec<(String, Value)>,
        client_id: Option<&str>,
        event: &str,
        mut data: Value,
        broadcast: bool,
    ) {
        if let Some(m) = data.as_object_mut() {
            m.insert("timestamp".into(), Value::from(now_ms()));
        }
        messages.push((event.to_string(), data.clone()));
        if (client_id.is_some() || broadcast) && !self.silent {
            self.send(event, data, client_id);
        }
    }
}

impl Sim {
    /// The start of a run, up to `execution_start`: which faults hit it, and the flags
    /// ComfyUI's execute_async sets first. Called by the worker with the lock held as it
    /// takes the dequeued prompt, so nothing but that prompt's own frames can follow the
    /// dequeue `status` (`Sim::enqueue` waits for this).
    pub(super) fn start(&self, st: &mut State, item: Item) -> Started {
        let (kinds, crash) = {
            let mut f = self.faults.lock().unwrap_or_else(|p| p.into_inner());
            let kinds = f.roll(|k| !matches!(k, Kind::HangBeforeStart | Kind::Crash { .. }));
            let crash = match f.crash() {
                Some((after, restart, _)) if st.runs >= after => {
                    let hit = f.roll(|k| matches!(k, Kind::Crash { .. }));
                    (!hit.is_empty()).then_some(restart)
                }
                _ => None,
            };
            (kinds, crash)
        };
        if let Some(after) = kinds.iter().find_map(|k| match k {
            Kind::WsDrop { after } => Some(*after),
            _ => None,
        }) {
            let sim_drop = self.scaled(after, 1.0);
            let sockets: Vec<mpsc::UnboundedSender<Out>> =
                st.sockets.values().map(|s| s.tx.clone()).collect();
            tokio::spawn(async move {
                tokio::time::sleep(sim_drop).await;
                for tx in sockets {
                    let _ = tx.send(Out::Drop);
                }
            });
        }
        let client_id = item.client_id();
        let started_us = now_us();
        // execute_async: the flag is cleared when a prompt starts.
        self.interrupt.store(false, Ordering::SeqCst);
        st.runs += 1;
        st.client_id = client_id.clone();
        st.silent = kinds.iter().any(|k| matches!(k, Kind::WsSilent));
        let mut messages = Vec::new();
        st.add_message(
            &mut messages,
            client_id.as_deref(),
            "execution_start",
            json!({"prompt_id": item.prompt_id}),
            false,
        );
        Started {
            item,
            kinds,
            crash,
            started_us,
            messages,
        }
    }

    /// The rest of a run, on the worker task: the cache, every node, the history entry and
    /// the end marker.
    pub(super) async fn run(&self, started: Started) {
        let Started {
            item,
            kinds,
            crash,
            started_us,
            mut messages,
        } = started;
        let slow: f64 = kinds
            .iter()
            .map(|k| match k {
                Kind::Slow { factor } => *factor,
                _ => 1.0,
            })
            .product();
        let lose_history = kinds.iter().any(|k| matches!(k, Kind::LoseHistory));
        let prompt_id = item.prompt_id.clone();
        let client_id = item.client_id();
        let mut run = Run {
            sim: self,
            item: &item,
            client_id: client_id.clone(),
            registry: IndexMap::new(),
            slow,
            kinds,
            progress_nodes_seen: 0,
            first_node_done: false,
            stalled: false,
            crash,
        };
        // Signatures of every node; the cache keeps only what this prompt uses.
        let mut sigs: HashMap<String, String> = HashMap::new();
        for id in item.prompt.keys() {
            signature(&item.prompt, id, &mut sigs, &mut HashSet::new());
        }
        let cached_nodes: Vec<String> = {
            let mut st = self.state();
            let keep: HashSet<&String> = sigs.values().collect();
            st.cache.retain(|k, _| keep.contains(k));
            item.prompt
                .keys()
                .filter(|id| sigs.get(*id).is_some_and(|s| st.cache.contains_key(s)))
                .cloned()
                .collect()
        };
        run.add_message(
            &mut messages,
            "execution_cached",
            json!({"nodes": cached_nodes, "prompt_id": prompt_id}),
            false,
        );

        let order = execution_order(&item.prompt, &item.outputs, &sigs, &self.state().cache);
        let mut executed: Vec<String> = Vec::new();
        let mut values: HashMap<String, Vec<Data>> = HashMap::new();
        let mut loaded_models = HashSet::new();
        let mut stop = None;
        for id in &order {
            match run
                .execute(id, &sigs, &mut values, &mut loaded_models)
                .await
            {
                Ok(true) => executed.push(id.clone()),
                Ok(false) => {}
                Err(s) => {
                    stop = Some(s);
                    break;
                }
            }
        }

        // A loader served from cache still has its weights in memory.
        for id in &cached_nodes {
            let class = item.prompt[id]["class_type"].as_str().unwrap_or_default();
            for key in crate::nodes::model_inputs(class) {
                if let Some(file) = item.prompt[id]["inputs"][*key].as_str() {
                    loaded_models.insert(file.to_string());
                }
            }
        }

        let node_type = |node: &str| item.prompt[node]["class_type"].clone();
        let status_str = match stop {
            None => {
                run.add_message(
                    &mut messages,
                    "execution_success",
                    json!({"prompt_id": prompt_id}),
                    false,
                );
                "success"
            }
            Some(Stop::Interrupted { node }) => {
                let data = json!({"prompt_id": prompt_id, "node_id": node, "node_type": node_type(&node), "executed": executed});
                run.add_message(&mut messages, "execution_interrupted", data, true);
                "error"
            }
            Some(Stop::Failed {
                node,
                message,
                kind,
                inputs,
            }) => {
                let traceback = vec![
                    "  File \"/opt/ComfyUI/execution.py\", line 496, in execute\n    output_data, output_ui, has_subgraph, has_pending_tasks = await get_output_data(prompt_id, unique_id, obj, input_data_all, execution_block_cb=execution_block_cb, pre_execute_cb=pre_execute_cb, hidden_inputs=hidden_inputs)\n".to_string(),
                    format!("  File \"gantry-sim\", in {}\n    raise {kind}(message)\n", node_type(&node).as_str().unwrap_or_default()),
                ];
                let data = json!({
                    "prompt_id": prompt_id, "node_id": node, "node_type": node_type(&node),
                    "executed": executed, "exception_message": message, "exception_type": kind,
                    "traceback": traceback, "current_inputs": inputs,
                    "current_outputs": item.prompt.keys().collect::<Vec<_>>(),
                });
                run.add_message(&mut messages, "execution_error", data, false);
                "error"
            }
        };

        // task_done: history is written before the status frame and the end marker.
        let mut st = self.state();
        st.warm_models = loaded_models;
        let mut outputs = Map::new();
        let mut meta = Map::new();
        for id in item.prompt.keys() {
            if let Some((ui, m)) = sigs
                .get(id)
                .and_then(|s| st.cache.get(s))
                .and_then(|c| c.ui.clone())
            {
                outputs.insert(id.clone(), ui);
                meta.insert(id.clone(), m);
            }
        }
        st.running = None;
        st.last_node_id = None;
        if !lose_history {
            if st.history.len() > MAX_HISTORY {
                st.history.shift_remove_index(0);
            }
            let entry = json!({
                "prompt": item.to_value(),
                "outputs": outputs,
                "status": {"status_str": status_str, "completed": status_str == "success", "messages": messages},
                "meta": meta,
            });
            st.history.insert(prompt_id.clone(), entry);
        }
        if st.runs_log.len() >= MAX_HISTORY {
            st.runs_log.pop_front();
        }
        st.runs_log.push_back(RunRecord {
            prompt_id: prompt_id.clone(),
            started_us,
            finished_us: now_us(),
            status: status_str.to_owned(),
        });
        st.queue_updated();
        if let Some(cid) = &client_id {
            if !st.silent {
                st.send(
                    "executing",
                    json!({"node": null, "prompt_id": prompt_id}),
                    Some(cid),
                );
            }
        }
        st.silent = false;
        st.client_id = None;
    }
}

/// One prompt being executed.
pub(super) struct Run<'a> {
    pub(super) sim: &'a Sim,
    pub(super) item: &'a Item,
    pub(super) client_id: Option<String>,
    /// progress_state registry: (value, max, finished) per node, in start order.
    pub(super) registry: IndexMap<String, (Number, Number, bool)>,
    pub(super) slow: f64,
    pub(super) kinds: Vec<Kind>,
    pub(super) progress_nodes_seen: usize,
    pub(super) first_node_done: bool,
    /// The stall fault has struck (a resumed stall does not strike again).
    pub(super) stalled: bool,
    pub(super) crash: Option<Option<Duration>>,
}

fn float(f: f64) -> Number {
    Number::from_f64(f).unwrap_or_else(|| Number::from(0))
}

impl Run<'_> {
    /// `State::add_message` for this run's client.
    fn add_message(
        &self,
        messages: &mut Vec<(String, Value)>,
        event: &str,
        data: Value,
        broadcast: bool,
    ) {
        self.sim
            .state()
            .add_message(messages, self.client_id.as_deref(), event, data, broadcast);
    }

    /// send_sync to the prompt's client (broadcast when it has none), unless ws-silent.
    pub(super) fn send(&self, event: &str, data: Value) {
        let st = self.sim.state();
        if !st.silent {
            st.send(event, data, self.client_id.as_deref());
        }
    }

    fn send_binary(&self, m: BinaryMessage) {
        let st = self.sim.state();
        if !st.silent {
            st.send_out(Out::Binary(m.encode()), self.client_id.as_deref());
        }
    }

    fn wants_metadata(&self) -> bool {
        let st = self.sim.state();
        self.client_id
            .as_ref()
            .and_then(|c| st.sockets.get(c))
            .is_some_and(|s| s.preview_metadata)
    }

    pub(super) fn send_progress_state(&self) {
        let pid = &self.item.prompt_id;
        let nodes: Map<String, Value> = self
            .registry
            .iter()
            .map(|(id, (value, max, finished))| {
                (
                    id.clone(),
                    json!({
                        "value": value, "max": max,
                        "state": if *finished { "finished" } else { "running" },
                        "node_id": id, "prompt_id": pid, "display_node_id": id,
                        "parent_node_id": null, "real_node_id": id,
                    }),
                )
            })
            .collect();
        self.send("progress_state", json!({"prompt_id": pid, "nodes": nodes}));
    }

    pub(super) fn start_progress(&mut self, id: &str) {
        self.registry
            .insert(id.to_string(), (float(0.0), float(1.0), false));
        self.send_progress_state();
    }

    pub(super) fn finish_progress(&mut self, id: &str) {
        let entry = self.registry.entry(id.to_string()).or_insert((
            Number::from(0),
            Number::from(1),
            false,
        ));
        entry.0 = entry.1.clone();
        entry.2 = true;
        self.send_progress_state();
    }

    /// The progress hook: interrupt check, progress_state, previews, progress.
    pub(super) async fn progress(
        &mut self,
        id: &str,
        value: u64,
        max: u64,
        preview: Option<Picture>,
    ) -> Result<(), Stop> {
        let interrupted = || Stop::Interrupted {
            node: id.to_string(),
        };
        self.sim.check_interrupt().map_err(|()| interrupted())?;
        self.registry.insert(
            id.to_string(),
            (Number::from(value), Number::from(max), false),
        );
        self.send_progress_state();
        let meta = preview.is_some() && self.wants_metadata();
        if let (Some(p), true) = (preview, meta) {
            self.send_binary(BinaryMessage::PreviewImageWithMetadata {
                metadata: json!({"node_id": id, "prompt_id": self.item.prompt_id, "display_node_id": id,
                    "parent_node_id": null, "real_node_id": id, "image_type": "image/jpeg"}),
                image: Bytes::from(p.preview()),
            });
        }
        self.send(
            "progress",
            json!({"value": value, "max": max, "prompt_id": self.item.prompt_id, "node": id}),
        );
        if let (Some(p), false) = (preview, meta) {
            self.send_binary(BinaryMessage::PreviewImage {
                format: FORMAT_JPEG,
                image: Bytes::from(p.preview()),
            });
        }
        self.maybe_stall(id, value, max).await
    }

    /// The `stall` fault: the first progress node stops at PCT% and the server goes silent
    /// (or, `chatty`, keeps repeating itself); with `resume_ms` the node goes on after that
    /// long, and an interrupt it ignored lands at the next check, as in capture d3.
    pub(super) async fn maybe_stall(&mut self, id: &str, value: u64, max: u64) -> Result<(), Stop> {
        let Some((at, chatty, uninterruptible, resume_after)) =
            self.kinds.iter().find_map(|k| match k {
                Kind::Stall {
                    at_pct,
                    chatty,
                    uninterruptible,
                    resume_after,
                } => Some((*at_pct, *chatty, *uninterruptible, *resume_after)),
                _ => None,
            })
        else {
            return Ok(());
        };
        if self.stalled
            || self.progress_nodes_seen > 1
            || (value as f64) * 100.0 < at * (max as f64)
        {
            return Ok(());
        }
        self.stalled = true;
        tracing::info!(
            node = id,
            value,
            max,
            "stall fault: the node stops making progress"
        );
        let tick = Duration::from_millis(100);
        let resume_at = resume_after.map(|d| tokio::time::Instant::now() + self.sim.scaled(d, 1.0));
        loop {
            tokio::time::sleep(tick.min(self.sim.scaled(POLL, 1.0).max(Duration::from_millis(1))))
                .await;
            if !uninterruptible && self.sim.check_interrupt().is_err() {
                return Err(Stop::Interrupted {
                    node: id.to_string(),
                });
            }
            if resume_at.is_some_and(|at| tokio::time::Instant::now() >= at) {
                tracing::info!(node = id, "stall fault: the node goes on");
                return Ok(());
            }
            if chatty {
                self.send_progress_state();
                self.send("progress", json!({"value": value, "max": max, "prompt_id": self.item.prompt_id, "node": id}));
                let st = self.sim.state();
                st.send("status", st.status_data(), None);
            }
        }
    }
}

// The simulated server's own wall clock, read as a real ComfyUI reads its host's: the
// timestamps it sends are the server's, not the test's.
#[allow(clippy::disallowed_methods)]
fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

#[allow(clippy::disallowed_methods)] // As `now_us`.
fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
