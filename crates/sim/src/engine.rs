//! The simulated ComfyUI process: its queue, history, socket table, output cache and the
//! worker that executes one prompt at a time, sending the real messages in the real order
//! (PROTOCOL.md sections 4 to 7; ComfyUI's main.py prompt_worker and execution.py).
//!
//! This file holds the process: `State` and `Sim`, the worker loop and the dequeue. A
//! prompt's run is in `run`, each node's behaviour in `execute`, the output cache's
//! signatures and execution order in `cache`.

mod cache;
mod execute;
mod run;

use crate::faults::{FaultSet, Kind};
use crate::nodes::Catalog;
use bytes::Bytes;
use indexmap::IndexMap;
use serde_json::{json, Map, Number, Value};
use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::{mpsc, Notify};

use cache::Cached;

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
    /// Dequeued (and shown as running) but not yet started by the worker task; no prompt
    /// is enqueued meanwhile (`Sim::enqueue`).
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
    /// Wakes `POST /prompt`s held back by a dequeued prompt: it has started.
    started: Notify,
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
            started: Notify::new(),
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
        self.started.notify_waiters();
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
            let started = loop {
                let notified = self.wake.notified();
                {
                    let mut st = self.state();
                    self.dequeue(&mut st);
                    if let Some(item) = st.ready.take() {
                        break self.start(&mut st, item);
                    }
                }
                notified.await;
            };
            self.started.notify_waiters();
            self.run(started).await;
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

    /// `POST /prompt`'s enqueue: the prompt joins the queue, and is dequeued at once when
    /// nothing runs. While a dequeued prompt waits for the worker task to start it, the
    /// enqueue waits too: ComfyUI's worker thread sends `execution_start` right after the
    /// dequeue `status` while the server's loop is still validating the next POST, so no
    /// enqueue `status` ever comes between the two.
    pub async fn enqueue(&self, item: Item) {
        loop {
            let started = self.started.notified();
            {
                let mut st = self.state();
                if st.ready.is_none() {
                    st.push(item);
                    self.dequeue(&mut st);
                    break;
                }
            }
            started.await;
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
}
