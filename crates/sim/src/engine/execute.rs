//! What each node class does when it runs: its cost on the clock, its progress steps, the
//! faults aimed at it (error, out of memory, stall at 0%), the files it reads and writes,
//! and the values it passes along its links; a node found in the cache only replays it.

use super::cache::{is_always_run, Cached, Data};
use super::run::{Run, Stop};
use crate::faults::Kind;
use crate::image::{next_file_name, Picture};
use crate::nodes::{cost, Catalog, Cost};
use serde_json::{json, Map, Value};
use std::collections::{HashMap, HashSet};
use std::time::Duration;

impl Run<'_> {
    /// Executes (or serves from cache) one node. Ok(true) when it really executed.
    pub(super) async fn execute(
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

/// PreviewImage's random 5-letter suffix.
fn temp_suffix() -> String {
    use rand::Rng;
    let mut rng = rand::rng();
    (0..5)
        .map(|_| (b'a' + rng.random_range(0..26)) as char)
        .collect()
}
