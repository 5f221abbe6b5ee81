//! A ComfyUI simulator that a ComfyUI client cannot tell from the real server.
//!
//! It executes API-format graphs of the node classes it knows, with a timing model per
//! class, ComfyUI's classic output cache, its queue, history and WebSocket scoping rules,
//! and injectable faults. It is the test double of every gantry test and benchmark.

mod engine;
pub mod faults;
mod http;
pub mod image;
pub mod nodes;
pub mod validate;

use engine::Sim;
use faults::{Fault, FaultSet};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// How to start a simulator.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Address to bind; port 0 picks a free one.
    pub listen: SocketAddr,
    /// Time divisor: 100 runs every timed phase 100x faster.
    pub speed: f64,
    /// Fault specs as given to `--fault` (see `faults`).
    pub faults: Vec<String>,
    /// Seed of the random generator behind `p=` faults.
    pub seed: u64,
    /// Model files that loaders list and accept.
    pub models: Vec<String>,
    /// Where SaveImage writes and /view reads; a fresh temporary folder when None.
    pub data_dir: Option<PathBuf>,
    /// What every model loader costs (cold, warm) at speed 1, instead of each class's own.
    pub loader: Option<(std::time::Duration, std::time::Duration)>,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            speed: 1.0,
            faults: Vec::new(),
            seed: 0,
            models: default_models(),
            data_dir: None,
            loader: None,
        }
    }
}

/// The model files a simulator has unless told otherwise: the one the sample txt2img
/// workflow loads, and a second checkpoint and a LoRA for routing tests.
pub fn default_models() -> Vec<String> {
    [
        "v1-5-pruned-emaonly.safetensors",
        "sd_xl_base_1.0.safetensors",
        "detail-tweaker.safetensors",
    ]
    .map(String::from)
    .to_vec()
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Fault(#[from] faults::ParseError),
    #[error("data dir {path}: {source}")]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("--speed must be a number above 0, not {0}")]
    Speed(f64),
}

/// One life of the server: cancelled by a crash, replaced by a restart.
struct Life {
    token: CancellationToken,
    tasks: JoinSet<()>,
}

struct Inner {
    sim: Arc<Sim>,
    addr: SocketAddr,
    life: tokio::sync::Mutex<Option<Life>>,
    /// Keeps the temporary data dir alive as long as the simulator.
    _tmp: Option<TempDir>,
    stop: CancellationToken,
    supervisor: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

/// A running simulator. Dropping it leaves it running until the runtime ends; call
/// `shutdown` to stop it.
pub struct SimHandle {
    pub addr: SocketAddr,
    inner: Arc<Inner>,
}

/// Starts a simulator; it serves until `SimHandle::shutdown`.
pub async fn spawn(config: SimConfig) -> Result<SimHandle, Error> {
    if !(config.speed > 0.0 && config.speed.is_finite()) {
        return Err(Error::Speed(config.speed));
    }
    let faults = config
        .faults
        .iter()
        .map(|s| Fault::parse(s))
        .collect::<Result<Vec<_>, _>>()?;
    let (tmp, dir) = match &config.data_dir {
        Some(d) => (None, d.clone()),
        None => {
            let t = TempDir::new().map_err(|source| Error::DataDir {
                path: std::env::temp_dir(),
                source,
            })?;
            let p = t.0.clone();
            (Some(t), p)
        }
    };
    for sub in ["output", "input", "temp"] {
        let p = dir.join(sub);
        std::fs::create_dir_all(&p).map_err(|source| Error::DataDir { path: p, source })?;
    }
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|source| Error::Bind {
            addr: config.listen,
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| Error::Bind {
        addr: config.listen,
        source,
    })?;
    let (crash_tx, mut crash_rx) = mpsc::unbounded_channel();
    let mut sim = Sim::new(
        config.models.clone(),
        config.speed,
        dir,
        FaultSet::new(faults, config.seed),
        crash_tx,
    );
    sim.loader = config.loader;
    let sim = Arc::new(sim);
    let inner = Arc::new(Inner {
        sim: sim.clone(),
        addr,
        life: tokio::sync::Mutex::new(Some(start_life(sim, listener))),
        _tmp: tmp,
        stop: CancellationToken::new(),
        supervisor: Mutex::new(None),
    });
    // Crash faults are carried out here, outside the worker that asks for them.
    let sup = inner.clone();
    let supervisor = tokio::spawn(async move {
        loop {
            let restart = tokio::select! {
                _ = sup.stop.cancelled() => return,
                r = crash_rx.recv() => match r { Some(r) => r, None => return },
            };
            kill(&sup).await;
            if let Some(after) = restart {
                let wait = after.div_f64(sup.sim.speed);
                tokio::select! {
                    _ = sup.stop.cancelled() => return,
                    _ = tokio::time::sleep(wait) => {}
                }
                if let Err(e) = revive(&sup).await {
                    tracing::error!(error = %e, "simulator could not come back after a crash");
                }
            }
        }
    });
    *inner.supervisor.lock().unwrap_or_else(|p| p.into_inner()) = Some(supervisor);
    tracing::info!(%addr, speed = config.speed, faults = ?config.faults, "gantry sim listening");
    Ok(SimHandle { addr, inner })
}

fn start_life(sim: Arc<Sim>, listener: TcpListener) -> Life {
    let token = CancellationToken::new();
    let mut tasks = JoinSet::new();
    let app = http::App {
        sim: sim.clone(),
        life: token.clone(),
    };
    let router = http::router(app);
    let t = token.clone();
    tasks.spawn(async move {
        let mut conns = JoinSet::new();
        loop {
            tokio::select! {
                _ = t.cancelled() => break,
                accepted = listener.accept() => {
                    let Ok((stream, _)) = accepted else { continue };
                    let service = TowerToHyperService::new(router.clone());
                    conns.spawn(async move {
                        let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                            .serve_connection_with_upgrades(TokioIo::new(stream), service)
                            .await;
                    });
                }
                Some(_) = conns.join_next(), if !conns.is_empty() => {}
            }
        }
        // Dropping the listener and every connection task: HTTP is refused, as when the
        // process is gone.
    });
    tasks.spawn(sim.worker());
    Life { token, tasks }
}

async fn kill(inner: &Inner) {
    let mut life = inner.life.lock().await;
    if let Some(mut l) = life.take() {
        l.token.cancel();
        l.tasks.abort_all();
        while l.tasks.join_next().await.is_some() {}
    }
    inner.sim.reset();
}

async fn revive(inner: &Inner) -> Result<(), Error> {
    let mut life = inner.life.lock().await;
    if life.is_some() {
        return Ok(());
    }
    let listener = TcpListener::bind(inner.addr)
        .await
        .map_err(|source| Error::Bind {
            addr: inner.addr,
            source,
        })?;
    *life = Some(start_life(inner.sim.clone(), listener));
    Ok(())
}

impl SimHandle {
    /// `http://ADDR`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Dies like a killed process: the listener closes, every WebSocket drops without a
    /// close frame (the client sees 1006), queue and history are gone.
    pub async fn crash(&self) {
        kill(&self.inner).await;
    }

    /// Comes back on the same address after `crash`, empty, like a restarted ComfyUI.
    pub async fn restart(&self) -> Result<(), Error> {
        revive(&self.inner).await
    }

    /// Replaces the faults in force, as `POST /sim/faults` does.
    pub fn set_faults(&self, specs: &[&str]) -> Result<(), Error> {
        let faults = specs
            .iter()
            .map(|s| Fault::parse(s))
            .collect::<Result<Vec<_>, _>>()?;
        self.inner.sim.replace_faults(faults);
        Ok(())
    }

    /// Puts a model file in the models folder: every loader lists and accepts it from
    /// now on, as a real ComfyUI does once the file is there.
    pub fn install_model(&self, file: &str) {
        self.inner.sim.install_model(file);
    }

    /// Where SaveImage writes.
    pub fn output_dir(&self) -> PathBuf {
        self.inner.sim.output_dir.clone()
    }

    /// Stops serving and waits for every task to end.
    pub async fn shutdown(self) {
        self.inner.stop.cancel();
        kill(&self.inner).await;
        let sup = self
            .inner
            .supervisor
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(s) = sup {
            let _ = s.await;
        }
    }
}

/// A temporary directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> std::io::Result<TempDir> {
        let p = std::env::temp_dir().join(format!("gantry-sim-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&p)?;
        Ok(TempDir(p))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
