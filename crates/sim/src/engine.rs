//! The simulated ComfyUI process: its queue, history, socket table, output cache and the
//! worker that executes one prompt at a time, sending the real messages in the real order
//! (PROTOCOL.md sections 4 to 7; ComfyUI's main.py prompt_worker and execution.py).

use crate::faults::{FaultSet, Kind};
use crate::image::{next_file_name, Picture};
use crate::nodes::{cost, Catalog, Cost};
use bytes::Bytes;
use gantry_comfy::ws::{BinaryMessage, FORMAT_JPEG};
use indexmap::IndexMap;
use serde_json::{json, Map, Number, Value};
use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::{mpsc, Notify};

/// ComfyUI keeps at most this many history entries, oldest dropped first.
const MAX_HISTORY: usize = 10_000;
/// How often nodes look at the interrupt flag, as the Gantry test nodes do (0.1 s).
const POLL: Duration = Duration::from_millis(100);

/// What a socket task writes to its WebSocket.
#[derive(Debug, Clone)]
pub enum Out {
    Text(String),
    Binary(Bytes),
    /// Drop the connection without a close frame.
    Drop,
}

/// One entry of the socket table.
#[derive(Debug)]
pub struct Socket {
    pub conn: u64,
    pub tx: mpsc::UnboundedSender<Out>,
    pub preview_metadata: bool,
}

/// A queued prompt.
#[derive(Debug, Clone)]
pub struct Item {
    pub number: Number,
    pub prompt_id: String,
    pub prompt: Map<String, Value>,
    pub extra_data: Map<String, Value>,
    pub outputs: Vec<String>,
}

impl Item {
    fn sort_key(&self) -> f64 {
        self.number.as_f64().unwrap_or(0.0)
    }

    pub fn to_value(&self) -> Value {
        json!([
            self.number,
            self.prompt_id,
            self.prompt,
            self.extra_data,
            self.outputs
        ])
    }

    fn client_id(&self) -> Option<String> {
        self.extra_data
            .get("client_id")
            .and_then(Value::as_str)
            .map(str::to_string)
    }
}

/// A value flowing along a link.
#[derive(Debug, Clone, PartialEq)]
enum Data {
    Image(Picture),
    /// LoadAudio's file, passed on as bytes (the simulator does not decode audio).
    Audio(std::sync::Arc<Vec<u8>>),
    Latent {
        width: u32,
        height: u32,
        seed: u64,
    },
    Opaque(&'static str),
}

/// What the output cache keeps for one node signature.
#[derive(Debug, Clone)]
struct Cached {
    outputs: Vec<Data>,
    /// UI output and meta, for nodes that have them.
    ui: Option<(Value, Value)>,
}

/// Everything a ComfyUI process keeps in memory; a crash throws it away.
#[derive(Debug, Default)]
pub struct State {
    pub queue: Vec<Item>,
    pub running: Option<Item>,
    pub history: IndexMap<String, Value>,
    counter: i64,
    pub sockets: HashMap<String, Socket>,
    /// The node running now, for the late-join `executing` frame.
    pub last_node_id: Option<String>,
    /// The client_id of the prompt running now.
    pub client_id: Option<String>,
    cache: HashMap<String, Cached>,
    /// Model files the previous prompt loaded (warm weights).
    warm_models: HashSet<String>,
    /// Runs started since this life began (for `crash:after_jobs`).
    runs: u64,
    /// A `hang-before-start` fault has stuck the worker.
    pub hung: bool,
    /// Dequeued (and shown as running) but not yet picked up by the worker task.
    ready: Option<Item>,
    /// The running prompt's messages are not sent (`ws-silent`).
    silent: bool,
    /// When each prompt ran, for `/sim/runs` (benchmarks measure the idle gap with it).
    pub runs_log: std::collections::VecDeque<RunRecord>,
}

/// When one prompt ran, in microseconds of the wall clock (ComfyUI's own timestamps are
/// milliseconds, too coarse for the gap between two prompts).
#[derive(Debug, Clone, serde::Serialize)]
pub struct RunRecord {
    pub prompt_id: String,
    pub started_us: i64,
    pub finished_us: i64,
    pub status: String,
}

impl State {
    /// `queue_remaining`: pending plus running.
    pub fn remaining(&self) -> usize {
        self.queue.len() + usize::from(self.running.is_some())
    }

    pub fn next_number(&mut self, front: bool) -> Number {
        let n = self.counter;
        self.counter += 1;
        Number::from(if front { -n } else { n })
    }

    /// ComfyUI's send_sync: to one socket by sid, or to every socket when sid is None.
    pub fn send(&self, event: &str, data: Value, sid: Option<&str>) {
        let text = json!({"type": event, "data": data}).to_string();
        self.send_out(Out::Text(text), sid);
    }

    fn send_out(&self, out: Out, sid: Option<&str>) {
        match sid {
            None => {
                for s in self.sockets.values() {
                    let _ = s.tx.send(out.clone());
                }
            }
            Some(sid) => {
                if let Some(s) = self.sockets.get(sid) {
                    let _ = s.tx.send(out);
                }
            }
        }
    }

    /// The `status` broadcast sent whenever the queue changes.
    pub fn queue_updated(&self) {
        self.send("status", self.status_data(), None);
    }

    pub fn status_data(&self) -> Value {
        json!({"status": {"exec_info": {"queue_remaining": self.remaining()}}})
    }

    pub fn push(&mut self, item: Item) {
        let key = (item.sort_key(), item.prompt_id.clone());
        let at = self
            .queue
            .iter()
            .position(|q| (q.sort_key(), q.prompt_id.clone()) > key)
            .unwrap_or(self.queue.len());
        self.queue.insert(at, item);
        self.queue_updated();
    }

    /// `POST /queue {"delete"}` for one id: silent but for status frames (two when it
    /// empties the queue, as ComfyUI's wipe_queue then queue_updated do).
    pub fn delete_pending(&mut self, prompt_id: &str) {
        if let Some(i) = self.queue.iter().position(|q| q.prompt_id == prompt_id) {
            if self.queue.len() == 1 {
                self.wipe();
            } else {
                self.queue.remove(i);
            }
            self.queue_updated();
        }
    }

    pub fn wipe(&mut self) {
        self.queue.clear();
        self.queue_updated();
    }
}

/// Why a run stopped early.
enum Stop {
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

/// The shared simulator: state behind one lock, plus what the worker needs.
pub struct Sim {
    /// The node specs with the model files installed now; replaced whole when a model
    /// is installed (ComfyUI lists its model folders anew on every read).
    catalog: std::sync::RwLock<Arc<Catalog>>,
    /// The model files every loader lists.
    models: Mutex<Vec<String>>,
    pub speed: f64,
    pub output_dir: PathBuf,
    pub input_dir: PathBuf,
    pub temp_dir: PathBuf,
    /// Every loader's (cold, warm) cost, when set (`SimConfig::loader`).
    pub loader: Option<(Duration, Duration)>,
    state: Mutex<State>,
    pub faults: Mutex<FaultSet>,
    /// Wakes the worker: the queue or the faults changed.
    pub wake: Notify,
    /// ComfyUI's processing-interrupted flag.
    pub interrupt: AtomicBool,
    next_conn: AtomicU64,
    /// Asks the life owner to crash (and maybe restart after the duration).
    pub crash_tx: mpsc::UnboundedSender<Option<Duration>>,
}

/// The input folder's file a node's value names: `name`, or `name [input]`
/// (ComfyUI's `folder_paths.exists_annotated_filepath`).
pub fn input_name(value: &str) -> &str {
    value.strip_suffix(" [input]").unwrap_or(value)
}

impl Sim {
    /// Where the input file a node's value names lives.
    pub fn input_path(&self, value: &str) -> PathBuf {
        self.input_dir.join(input_name(value))
    }

    pub fn new(
        models: Vec<String>,
        speed: f64,
        data_dir: PathBuf,
        faults: FaultSet,
        crash_tx: mpsc::UnboundedSender<Option<Duration>>,
    ) -> Sim {
        Sim {
            catalog: std::sync::RwLock::new(Arc::new(Catalog::new(&models))),
            models: Mutex::new(models),
            speed,
            output_dir: data_dir.join("output"),
            input_dir: data_dir.join("input"),
            temp_dir: data_dir.join("temp"),
            loader: None,
            state: Mutex::new(State::default()),
            faults: Mutex::new(faults),
            wake: Notify::new(),
            interrupt: AtomicBool::new(false),
            next_conn: AtomicU64::new(1),
            crash_tx,
        }
    }

    /// The node specs as they are now.
    pub fn catalog(&self) -> Arc<Catalog> {
        self.catalog
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// A model file appears in the models folder: loaders list and accept it from now on.
    pub fn install_model(&self, file: &str) {
        let mut models = self.models.lock().unwrap_or_else(|p| p.into_inner());
        if !models.iter().any(|m| m == file) {
            models.push(file.to_owned());
        }
        let catalog = Arc::new(Catalog::new(&models));
        *self.catalog.write().unwrap_or_else(|p| p.into_inner()) = catalog;
    }

    /// The state lock. A panic while holding it is a simulator bug; the state is still
    /// usable, so a poisoned lock is taken over rather than propagated.
    pub fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn new_conn_id(&self) -> u64 {
        self.next_conn.fetch_add(1, Ordering::Relaxed)
    }

    /// Forgets everything a process keeps in memory, as a restart does.
    pub fn reset(&self) {
        let mut st = self.state();
        for s in st.sockets.values() {
            let _ = s.tx.send(Out::Drop);
        }
        *st = State::default();
        self.interrupt.store(false, Ordering::SeqCst);
    }

    /// Every file of the input folder as `sub/name` (or `name`): what LoadImage's and
    /// LoadAudio's own validation accepts (ComfyUI's exists_annotated_filepath).
    pub fn input_paths(&self) -> Vec<String> {
        fn walk(dir: &std::path::Path, prefix: &str, out: &mut Vec<String>) {
            let Ok(rd) = std::fs::read_dir(dir) else {
                return;
            };
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().to_string();
                let rel = if prefix.is_empty() {
                    name
                } else {
                    format!("{prefix}/{name}")
                };
                if e.path().is_dir() {
                    walk(&e.path(), &rel, out);
                } else if e.path().is_file() {
                    out.push(rel);
                }
            }
        }
        let mut out = Vec::new();
        walk(&self.input_dir, "", &mut out);
        out.sort();
        out
    }

    /// The files of the input folder itself, as LoadImage lists them in /object_info.
    pub fn input_files(&self) -> Vec<String> {
        let mut files: Vec<String> = std::fs::read_dir(&self.input_dir)
            .map(|rd| {
                rd.flatten()
                    .filter(|e| e.path().is_file())
                    .map(|e| e.file_name().to_string_lossy().to_string())
                    .collect()
            })
            .unwrap_or_default();
        files.sort();
        files
    }

    fn scaled(&self, d: Duration, slow: f64) -> Duration {
        d.mul_f64(slow / self.speed)
    }

    /// Sleeps, looking at the interrupt flag every POLL like the test nodes do.
    async fn sleep_interruptible(&self, d: Duration, slow: f64) -> Result<(), ()> {
        let mut left = self.scaled(d, slow);
        let poll = self.scaled(POLL, 1.0).max(Duration::from_millis(1));
        loop {
            self.check_interrupt()?;
            if left.is_zero() {
                return Ok(());
            }
            let step = left.min(poll);
            tokio::time::sleep(step).await;
            left -= step;
        }
    }

    /// `throw_exception_if_processing_interrupted`: reading the flag clears it.
    fn check_interrupt(&self) -> Result<(), ()> {
        if self.interrupt.swap(false, Ordering::SeqCst) {
            Err(())
        } else {
            Ok(())
        }
    }

    /// The worker: ComfyUI's prompt_worker loop. Runs until its life is cancelled.
    pub async fn worker(self: Arc<Self>) {
        loop {
            let item = loop {
                let notified = self.wake.notified();
                {
                    let mut st = self.state();
                    self.dequeue(&mut st);
                    if let Some(item) = st.ready.take() {
                        break item;
                    }
                }
                notified.await;
            };
            self.run(item).await;
        }
    }

    /// Replaces the faults in force and wakes the worker. Clearing hang-before-start lets a
    /// stuck worker take prompts again.
    pub fn replace_faults(&self, faults: Vec<crate::faults::Fault>) {
        let hang = faults.iter().any(|f| f.kind == Kind::HangBeforeStart);
        self.faults
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .replace(faults);
        if !hang {
            self.state().hung = false;
        }
        self.wake.notify_waiters();
    }

    /// Takes the head of the queue when nothing runs. Called with the lock held both by the
    /// worker and by `POST /prompt`: ComfyUI's idle worker dequeues before the next POST is
    /// answered, so the dequeue `status` must not wait for this task to be scheduled.
    pub fn dequeue(&self, st: &mut State) {
        if st.running.is_some() || st.hung || st.queue.is_empty() {
            return;
        }
        let hang = self
            .faults
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .roll(|k| matches!(k, Kind::HangBeforeStart));
        if !hang.is_empty() {
            st.hung = true;
            tracing::info!("hang-before-start: the worker stops taking prompts");
            return;
        }
        let item = st.queue.remove(0);
        st.running = Some(item.clone());
        st.ready = Some(item);
        st.queue_updated();
    }

    async fn run(&self, item: Item) {
        let faults = {
            let mut f = self.faults.lock().unwrap_or_else(|p| p.into_inner());
            let kinds = f.roll(|k| !matches!(k, Kind::HangBeforeStart | Kind::Crash { .. }));
            let runs = self.state().runs;
            let crash = match f.crash() {
                Some((after, restart, _)) if runs >= after => {
                    let hit = f.roll(|k| matches!(k, Kind::Crash { .. }));
                    (!hit.is_empty()).then_some(restart)
                }
                _ => None,
            };
            (kinds, crash)
        };
        let (kinds, crash) = faults;
        let slow: f64 = kinds
            .iter()
            .map(|k| match k {
                Kind::Slow { factor } => *factor,
                _ => 1.0,
            })
            .product();
        let lose_history = kinds.iter().any(|k| matches!(k, Kind::LoseHistory));
        if let Some(after) = kinds.iter().find_map(|k| match k {
            Kind::WsDrop { after } => Some(*after),
            _ => None,
        }) {
            let sim_drop = self.scaled(after, 1.0);
            let sockets: Vec<mpsc::UnboundedSender<Out>> = self
                .state()
                .sockets
                .values()
                .map(|s| s.tx.clone())
                .collect();
            tokio::spawn(async move {
                tokio::time::sleep(sim_drop).await;
                for tx in sockets {
                    let _ = tx.send(Out::Drop);
                }
            });
        }

        let prompt_id = item.prompt_id.clone();
        let client_id = item.client_id();
        let started_us = now_us();
        let mut messages: Vec<(String, Value)> = Vec::new();
        // execute_async: the flag is cleared when a prompt starts.
        self.interrupt.store(false, Ordering::SeqCst);
        {
            let mut st = self.state();
            st.runs += 1;
            st.client_id = client_id.clone();
            st.silent = kinds.iter().any(|k| matches!(k, Kind::WsSilent));
        }
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
        run.add_message(
            &mut messages,
            "execution_start",
            json!({"prompt_id": prompt_id}),
            false,
        );

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
struct Run<'a> {
    sim: &'a Sim,
    item: &'a Item,
    client_id: Option<String>,
    /// progress_state registry: (value, max, finished) per node, in start order.
    registry: IndexMap<String, (Number, Number, bool)>,
    slow: f64,
    kinds: Vec<Kind>,
    progress_nodes_seen: usize,
    first_node_done: bool,
    /// The stall fault has struck (a resumed stall does not strike again).
    stalled: bool,
    crash: Option<Option<Duration>>,
}

fn float(f: f64) -> Number {
    Number::from_f64(f).unwrap_or_else(|| Number::from(0))
}

impl Run<'_> {
    /// execution.py add_message: recorded for history; sent to the prompt's client, or
    /// broadcast when `broadcast` and the prompt has none.
    fn add_message(
        &self,
        messages: &mut Vec<(String, Value)>,
        event: &str,
        mut data: Value,
        broadcast: bool,
    ) {
        if let Some(m) = data.as_object_mut() {
            m.insert("timestamp".into(), Value::from(now_ms()));
        }
        messages.push((event.to_string(), data.clone()));
        if self.client_id.is_some() || broadcast {
            self.send(event, data);
        }
    }

    /// send_sync to the prompt's client (broadcast when it has none), unless ws-silent.
    fn send(&self, event: &str, data: Value) {
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

    fn send_progress_state(&self) {
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

    fn start_progress(&mut self, id: &str) {
        self.registry
            .insert(id.to_string(), (float(0.0), float(1.0), false));
        self.send_progress_state();
    }

    fn finish_progress(&mut self, id: &str) {
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
    async fn progress(
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
    async fn maybe_stall(&mut self, id: &str, value: u64, max: u64) -> Result<(), Stop> {
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

    /// Executes (or serves from cache) one node. Ok(true) when it really executed.
    async fn execute(
        &mut self,
        id: &str,
        sigs: &HashMap<String, String>,
        values: &mut HashMap<String, Vec<Data>>,
        loaded_models: &mut HashSet<String>,
    ) -> Result<bool, Stop> {
        let node = &self.item.prompt[id];
        let class = node["class_type"].as_str().unwrap_or_default().to_string();
        let inputs = node["inputs"].as_object().cloned().unwrap_or_default();
        let sig = sigs.get(id).cloned().unwrap_or_default();
        let cached = self.sim.state().cache.get(&sig).cloned();
        if let Some(c) = cached {
            if self.client_id.is_some() {
                let output =
                    c.ui.as_ref()
                        .map(|(ui, _)| ui.clone())
                        .unwrap_or(Value::Null);
                self.send("executed", json!({"node": id, "display_node": id, "output": output, "prompt_id": self.item.prompt_id}));
            }
            values.insert(id.to_string(), c.outputs);
            self.finish_progress(id);
            return Ok(false);
        }

        self.start_progress(id);
        {
            let mut st = self.sim.state();
            if self.client_id.is_some() {
                st.last_node_id = Some(id.to_string());
                if !st.silent {
                    st.send(
                        "executing",
                        json!({"node": id, "display_node": id, "prompt_id": self.item.prompt_id}),
                        self.client_id.as_deref(),
                    );
                }
            }
        }
        if let Some(restart) = self.crash.take() {
            tracing::info!("crash fault: the simulator dies mid-run");
            let _ = self.sim.crash_tx.send(restart);
            // The life owner aborts this task; never go on as if alive.
            std::future::pending::<()>().await;
        }
        // before_node_execution: an interrupt that arrived between nodes lands here.
        self.sim.check_interrupt().map_err(|()| Stop::Interrupted {
            node: id.to_string(),
        })?;

        let input = |name: &str| -> Option<Data> {
            let link = inputs.get(name)?.as_array()?;
            let from = link.first()?.as_str()?;
            let slot = link.get(1)?.as_u64()? as usize;
            values.get(from)?.get(slot).cloned()
        };
        let num =
            |name: &str, default: f64| inputs.get(name).and_then(Value::as_f64).unwrap_or(default);
        let boolean = |name: &str| inputs.get(name).and_then(Value::as_bool).unwrap_or(false);
        let image_in = |name: &str| match input(name) {
            Some(Data::Image(p)) => p,
            _ => Picture::from_color(64, 64, 0),
        };
        let fail = |message: String, kind: &str| Stop::Failed {
            node: id.to_string(),
            message,
            kind: kind.to_string(),
            inputs: current_inputs(&self.sim.catalog(), &class, &inputs),
        };

        let first_work = !self.first_node_done;
        self.first_node_done = true;
        if self
            .kinds
            .iter()
            .any(|k| matches!(k, Kind::Error { class: c } if *c == class))
        {
            return Err(fail(
                format!("gantry-sim: injected error in {class}\n"),
                "RuntimeError",
            ));
        }
        let has_progress = reports_progress(&self.item.prompt[id]);
        if has_progress {
            self.progress_nodes_seen += 1;
        }
        let oom = self.kinds.contains(&Kind::Oom);
        if oom && (has_progress || first_work && !self.item.prompt.values().any(reports_progress)) {
            return Err(fail(
                "Allocation on device \nThis error means you ran out of memory on your GPU.\n\nTIPS: If the workflow worked before you might have accidentally set the batch_size to a large number.".into(),
                "torch.OutOfMemoryError",
            ));
        }
        if self.progress_nodes_seen == 1 && has_progress {
            // A stall at 0% stops the node before its first step.
            if let Some(Kind::Stall { at_pct, .. }) =
                self.kinds.iter().find(|k| matches!(k, Kind::Stall { .. }))
            {
                if *at_pct <= 0.0 {
                    self.maybe_stall(id, 0, 1).await?;
                }
            }
        }
        let interrupted = || Stop::Interrupted {
            node: id.to_string(),
        };
        let slow = self.slow;
        let sim = self.sim;

        let mut ui: Option<Value> = None;
        let outputs: Vec<Data> = match class.as_str() {
            "GantrySleep" => {
                let steps = num("steps", 5.0).max(1.0) as u64;
                let per = Duration::from_secs_f64(num("seconds", 1.0).max(0.0) / steps as f64);
                let img = image_in("image");
                let preview = boolean("preview").then_some(img);
                for i in 0..steps {
                    sim.sleep_interruptible(per, slow)
                        .await
                        .map_err(|()| interrupted())?;
                    self.progress(id, i + 1, steps, preview).await?;
                }
                vec![Data::Image(img)]
            }
            "GantryStall" => {
                let before = num("steps_before_stall", 3.0) as u64;
                let total = (num("total_steps", 10.0) as u64).max(1).max(before);
                let step = Duration::from_secs_f64(num("step_seconds", 0.1).max(0.0));
                let stall = Duration::from_secs_f64(num("stall_seconds", 60.0).max(0.0));
                let mut done = 0;
                for _ in 0..before {
                    sim.sleep_interruptible(step, slow)
                        .await
                        .map_err(|()| interrupted())?;
                    done += 1;
                    self.progress(id, done, total, None).await?;
                }
                if inputs
                    .get("interruptible")
                    .and_then(Value::as_bool)
                    .unwrap_or(true)
                {
                    sim.sleep_interruptible(stall, slow)
                        .await
                        .map_err(|()| interrupted())?;
                } else {
                    tokio::time::sleep(sim.scaled(stall, slow)).await;
                }
                while done < total {
                    done += 1;
                    self.progress(id, done, total, None).await?;
                }
                vec![Data::Image(image_in("image"))]
            }
            "GantryFail" => {
                let n = num("steps_before_fail", 0.0) as u64;
                let step = Duration::from_secs_f64(num("step_seconds", 0.1).max(0.0));
                for i in 0..n {
                    sim.sleep_interruptible(step, slow)
                        .await
                        .map_err(|()| interrupted())?;
                    self.progress(id, i + 1, n + 1, None).await?;
                }
                let message = inputs
                    .get("message")
                    .and_then(Value::as_str)
                    .unwrap_or("gantry: deliberate failure");
                return Err(fail(format!("{message}\n"), "RuntimeError"));
            }
            other => {
                let c = cost(other, &inputs);
                match c {
                    Cost::Fixed(d) => tokio::time::sleep(sim.scaled(d, slow)).await,
                    Cost::Loader { cold, warm } => {
                        let (cold, warm) = sim.loader.unwrap_or((cold, warm));
                        let file = crate::nodes::model_inputs(other)
                            .first()
                            .and_then(|k| inputs.get(*k))
                            .and_then(Value::as_str)
                            .unwrap_or_default()
                            .to_string();
                        let is_warm = sim.state().warm_models.contains(&file);
                        loaded_models.insert(file);
                        tokio::time::sleep(sim.scaled(if is_warm { warm } else { cold }, slow))
                            .await;
                    }
                    Cost::Steps { steps, per_step } => {
                        for i in 0..steps {
                            tokio::time::sleep(sim.scaled(per_step, slow)).await;
                            self.progress(id, i + 1, steps, None).await?;
                        }
                    }
                }
                match other {
                    "EmptyImage" => vec![Data::Image(Picture::from_color(
                        num("width", 512.0) as u32,
                        num("height", 512.0) as u32,
                        num("color", 0.0) as u64,
                    ))],
                    "ImageInvert" => vec![Data::Image(image_in("image").inverted())],
                    "ImageBlur" => vec![Data::Image(image_in("image"))],
                    "ImageScale" => vec![Data::Image(Picture {
                        width: num("width", 512.0) as u32,
                        height: num("height", 512.0) as u32,
                        ..image_in("image")
                    })],
                    "LoadImage" => {
                        // Validation saw the file; a picture it cannot decode still loads
                        // as grey (the real node would raise, which no test needs).
                        let file = inputs.get("image").and_then(Value::as_str).unwrap_or("");
                        let path = sim.input_path(file);
                        let pic = std::fs::read(&path)
                            .ok()
                            .and_then(|b| Picture::from_png(&b))
                            .unwrap_or(Picture::from_color(64, 64, 0x808080));
                        vec![Data::Image(pic), Data::Opaque("MASK")]
                    }
                    "LoadAudio" => {
                        let file = inputs.get("audio").and_then(Value::as_str).unwrap_or("");
                        let path = sim.input_path(file);
                        match std::fs::read(&path) {
                            Ok(bytes) => vec![Data::Audio(std::sync::Arc::new(bytes))],
                            Err(e) => return Err(fail(format!("{e}\n"), "FileNotFoundError")),
                        }
                    }
                    "SaveAudio" => {
                        let Some(Data::Audio(bytes)) = input("audio") else {
                            return Err(fail("audio input is not AUDIO\n".into(), "TypeError"));
                        };
                        let prefix = inputs
                            .get("filename_prefix")
                            .and_then(Value::as_str)
                            .unwrap_or("audio/ComfyUI")
                            .to_string();
                        let (subfolder, base) = match prefix.rsplit_once('/') {
                            Some((s, b)) => (s.to_string(), b.to_string()),
                            None => (String::new(), prefix.clone()),
                        };
                        let dir = sim.output_dir.join(&subfolder);
                        // The real node re-encodes to FLAC; the simulator keeps the bytes.
                        let written = std::fs::create_dir_all(&dir)
                            .and_then(|()| {
                                let name = next_file_name(&dir, &base, "flac");
                                std::fs::write(dir.join(&name), bytes.as_slice())?;
                                Ok(name)
                            })
                            .map_err(|e| e.to_string());
                        match written {
                            Ok(name) => {
                                ui = Some(
                                    json!({"audio": [{"filename": name, "subfolder": subfolder, "type": "output"}]}),
                                );
                            }
                            Err(e) => return Err(fail(format!("{e}\n"), "OSError")),
                        }
                        vec![]
                    }
                    "LoadImageMask" => vec![Data::Opaque("MASK")],
                    "CheckpointLoaderSimple" => vec![
                        Data::Opaque("MODEL"),
                        Data::Opaque("CLIP"),
                        Data::Opaque("VAE"),
                    ],
                    "LoraLoader" => vec![Data::Opaque("MODEL"), Data::Opaque("CLIP")],
                    "CLIPTextEncode" => vec![Data::Opaque("CONDITIONING")],
                    "EmptyLatentImage" => vec![Data::Latent {
                        width: num("width", 512.0) as u32,
                        height: num("height", 512.0) as u32,
                        seed: 0,
                    }],
                    "KSampler" => {
                        let (width, height) = match input("latent_image") {
                            Some(Data::Latent { width, height, .. }) => (width, height),
                            _ => (512, 512),
                        };
                        vec![Data::Latent {
                            width,
                            height,
                            seed: inputs.get("seed").and_then(Value::as_u64).unwrap_or(0),
                        }]
                    }
                    "VAEDecode" => match input("samples") {
                        Some(Data::Latent {
                            width,
                            height,
                            seed,
                        }) => vec![Data::Image(Picture::from_color(
                            width,
                            height,
                            seed & 0xFF_FFFF,
                        ))],
                        _ => vec![Data::Image(Picture::from_color(512, 512, 0))],
                    },
                    "VAEEncode" => {
                        let p = image_in("pixels");
                        vec![Data::Latent {
                            width: p.width,
                            height: p.height,
                            seed: u64::from(p.rgb[0]),
                        }]
                    }
                    "SaveImage" | "PreviewImage" => {
                        let pic = image_in("images");
                        let (dir, kind, prefix) = if other == "SaveImage" {
                            let prefix = inputs
                                .get("filename_prefix")
                                .and_then(Value::as_str)
                                .unwrap_or("ComfyUI");
                            (sim.output_dir.clone(), "output", prefix.to_string())
                        } else {
                            (
                                sim.temp_dir.clone(),
                                "temp",
                                format!("ComfyUI_temp_{}", temp_suffix()),
                            )
                        };
                        let (subfolder, base) = match prefix.rsplit_once('/') {
                            Some((s, b)) => (s.to_string(), b.to_string()),
                            None => (String::new(), prefix.clone()),
                        };
                        let dir = dir.join(&subfolder);
                        let written = std::fs::create_dir_all(&dir)
                            .map_err(|e| e.to_string())
                            .and_then(|()| {
                                let name = next_file_name(&dir, &base, "png");
                                let bytes = pic.png().map_err(|e| e.to_string())?;
                                std::fs::write(dir.join(&name), bytes)
                                    .map_err(|e| e.to_string())?;
                                Ok(name)
                            });
                        match written {
                            Ok(name) => {
                                ui = Some(
                                    json!({"images": [{"filename": name, "subfolder": subfolder, "type": kind}]}),
                                );
                            }
                            Err(e) => return Err(fail(format!("{e}\n"), "OSError")),
                        }
                        vec![]
                    }
                    _ => vec![Data::Opaque("*")],
                }
            }
        };

        let ui_meta = ui.map(|u| {
            (
                u,
                json!({"node_id": id, "display_node": id, "parent_node": null, "real_node_id": id}),
            )
        });
        {
            let mut st = self.sim.state();
            let stored = if is_always_run(&self.item.prompt[id]) {
                // IS_CHANGED returned NaN: the output never compares equal, so it is not reused.
                None
            } else {
                Some(sig)
            };
            if let Some(sig) = stored {
                st.cache.insert(
                    sig,
                    Cached {
                        outputs: outputs.clone(),
                        ui: ui_meta.clone(),
                    },
                );
            } else if let Some((u, m)) = &ui_meta {
                // History still lists the UI output of a node that ran.
                st.cache.insert(
                    format!("nan:{}:{id}", self.item.prompt_id),
                    Cached {
                        outputs: outputs.clone(),
                        ui: Some((u.clone(), m.clone())),
                    },
                );
            }
        }
        if let Some((u, _)) = &ui_meta {
            if self.client_id.is_some() {
                self.send("executed", json!({"node": id, "display_node": id, "output": u, "prompt_id": self.item.prompt_id}));
            }
        }
        values.insert(id.to_string(), outputs);
        self.finish_progress(id);
        Ok(true)
    }
}

/// Nodes that send progress as they run (the stall and oom faults aim at them).
fn reports_progress(node: &Value) -> bool {
    match node["class_type"].as_str() {
        Some("KSampler" | "GantrySleep" | "GantryStall") => true,
        Some("GantryFail") => node
            .pointer("/inputs/steps_before_fail")
            .and_then(Value::as_f64)
            .is_some_and(|n| n > 0.0),
        _ => false,
    }
}

fn is_always_run(node: &Value) -> bool {
    node.pointer("/inputs/always_run")
        .and_then(Value::as_bool)
        .unwrap_or(false)
}

/// The reprs ComfyUI puts in `current_inputs`: each input's values as a list.
fn current_inputs(catalog: &Catalog, class: &str, inputs: &Map<String, Value>) -> Value {
    let mut out = Map::new();
    for (name, _) in catalog.inputs(class) {
        let Some(v) = inputs.get(&name) else { continue };
        let repr = match v {
            Value::Array(_) => Value::String("tensor([[[[0., 0., 0.]]]])".into()),
            other => other.clone(),
        };
        out.insert(name, Value::Array(vec![repr]));
    }
    Value::Object(out)
}

/// A node's cache signature: class, constant inputs and upstream signatures; a node
/// with `always_run` (IS_CHANGED = NaN) never matches, and neither does anything below it.
fn signature(
    prompt: &Map<String, Value>,
    id: &str,
    memo: &mut HashMap<String, String>,
    visiting: &mut HashSet<String>,
) -> String {
    if let Some(s) = memo.get(id) {
        return s.clone();
    }
    if !visiting.insert(id.to_string()) {
        return format!("cycle:{id}");
    }
    let node = &prompt[id];
    let mut parts = vec![node["class_type"].to_string()];
    let mut keys: Vec<(&String, &Value)> = node["inputs"]
        .as_object()
        .map(|m| m.iter().collect())
        .unwrap_or_default();
    keys.sort_by(|a, b| a.0.cmp(b.0));
    for (k, v) in keys {
        let part = match v.as_array() {
            Some(link)
                if link.len() == 2 && link[0].as_str().is_some_and(|f| prompt.contains_key(f)) =>
            {
                let from = link[0].as_str().unwrap_or_default();
                format!(
                    "{k}=<{}>[{}]",
                    signature(prompt, from, memo, visiting),
                    link[1]
                )
            }
            _ => format!("{k}={v}"),
        };
        parts.push(part);
    }
    if is_always_run(node) {
        parts.push(format!("nan:{}", uuid::Uuid::new_v4()));
    }
    let s = parts.join(";");
    visiting.remove(id);
    memo.insert(id.to_string(), s.clone());
    s
}

/// The order nodes execute in: depth first from each output, dependencies first, skipping
/// cached nodes' upstream (a cached node needs nothing below it).
fn execution_order(
    prompt: &Map<String, Value>,
    outputs: &[String],
    sigs: &HashMap<String, String>,
    cache: &HashMap<String, Cached>,
) -> Vec<String> {
    fn visit(
        prompt: &Map<String, Value>,
        outputs: &[String],
        id: &str,
        sigs: &HashMap<String, String>,
        cache: &HashMap<String, Cached>,
        seen: &mut HashSet<String>,
        order: &mut Vec<String>,
    ) {
        if !seen.insert(id.to_string()) {
            return;
        }
        let is_cached = sigs.get(id).is_some_and(|s| cache.contains_key(s));
        // ExecutionList never stages a cached dependency; only outputs are always staged
        // (a cached output still sends `executed` with its cached UI output).
        if is_cached && !outputs.contains(&id.to_string()) {
            return;
        }
        if !is_cached {
            if let Some(inputs) = prompt[id]["inputs"].as_object() {
                for v in inputs.values() {
                    if let Some(from) = v.as_array().and_then(|l| l.first()).and_then(Value::as_str)
                    {
                        if prompt.contains_key(from) {
                            visit(prompt, outputs, from, sigs, cache, seen, order);
                        }
                    }
                }
            }
        }
        order.push(id.to_string());
    }
    let mut seen = HashSet::new();
    let mut order = Vec::new();
    let mut outs: Vec<&String> = outputs.iter().collect();
    // ComfyUI stages outputs from a set; take them in prompt order for a stable run.
    outs.sort_by_key(|o| prompt.keys().position(|k| k == *o));
    for o in outs {
        visit(prompt, outputs, o, sigs, cache, &mut seen, &mut order);
    }
    order
}

fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// PreviewImage's random 5-letter suffix.
fn temp_suffix() -> String {
    use rand::Rng;
    let mut rng = rand::rng();
    (0..5)
        .map(|_| (b'a' + rng.random_range(0..26)) as char)
        .collect()
}
