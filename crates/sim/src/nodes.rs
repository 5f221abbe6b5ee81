//! The node classes the simulator knows: their `/object_info` specs (as ComfyUI 0.3.64
//! serves them) and what executing each one costs and produces.

use indexmap::IndexMap;
use serde_json::{Map, Value};
use std::time::Duration;

/// `/object_info` of every supported class, made by running ComfyUI's own `node_info` on
/// its node definitions; file lists are empty and filled per simulator.
const OBJECT_INFO: &str = include_str!("object_info.json");

/// The class table of one simulator.
#[derive(Debug, Clone)]
pub struct Catalog {
    info: IndexMap<String, Value>,
}

/// One declared input of a class.
#[derive(Debug, Clone)]
pub struct InputSpec {
    /// `INT`, `FLOAT`, `STRING`, `BOOLEAN`, a link type such as `IMAGE`, or a combo list.
    pub kind: Value,
    pub options: Map<String, Value>,
    pub required: bool,
}

impl Catalog {
    /// The catalog with `models` as the files every model loader lists.
    pub fn new(models: &[String]) -> Catalog {
        // The file is part of the binary and checked by the tests; a bad edit fails every test.
        let mut info: IndexMap<String, Value> =
            serde_json::from_str(OBJECT_INFO).expect("object_info.json is valid JSON");
        let models: Vec<Value> = models.iter().cloned().map(Value::String).collect();
        for (class, input) in [
            ("CheckpointLoaderSimple", "ckpt_name"),
            ("LoraLoader", "lora_name"),
        ] {
            if let Some(slot) = info
                .get_mut(class)
                .and_then(|c| c.pointer_mut(&format!("/input/required/{input}/0")))
            {
                *slot = Value::Array(models.clone());
            }
        }
        Catalog { info }
    }

    /// `GET /object_info`, with `input_files` as the LoadImage and LoadAudio lists.
    pub fn object_info(&self, input_files: &[String]) -> IndexMap<String, Value> {
        let files: Vec<Value> = input_files.iter().cloned().map(Value::String).collect();
        let mut info = self.info.clone();
        for (class, input) in [
            ("LoadImage", "image"),
            ("LoadImageMask", "image"),
            ("LoadAudio", "audio"),
        ] {
            if let Some(slot) = info
                .get_mut(class)
                .and_then(|c| c.pointer_mut(&format!("/input/required/{input}/0")))
            {
                *slot = Value::Array(files.clone());
            }
        }
        info
    }

    pub fn has(&self, class: &str) -> bool {
        self.info.contains_key(class)
    }

    pub fn is_output_node(&self, class: &str) -> bool {
        self.info
            .get(class)
            .and_then(|c| c.get("output_node"))
            .and_then(Value::as_bool)
            .unwrap_or(false)
    }

    /// `RETURN_TYPES` of a class.
    pub fn return_types(&self, class: &str) -> Vec<String> {
        self.info
            .get(class)
            .and_then(|c| c.get("output"))
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .map(|t| t.as_str().unwrap_or("*").to_string())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Declared inputs (required, then optional) in declaration order, with their specs.
    pub fn inputs(&self, class: &str) -> Vec<(String, InputSpec)> {
        let mut out = Vec::new();
        let Some(c) = self.info.get(class) else {
            return out;
        };
        for (category, required) in [("required", true), ("optional", false)] {
            let Some(section) = c
                .pointer(&format!("/input/{category}"))
                .and_then(Value::as_object)
            else {
                continue;
            };
            for (name, spec) in section {
                let arr = spec.as_array().cloned().unwrap_or_default();
                out.push((
                    name.clone(),
                    InputSpec {
                        kind: arr.first().cloned().unwrap_or(Value::Null),
                        options: arr
                            .get(1)
                            .and_then(Value::as_object)
                            .cloned()
                            .unwrap_or_default(),
                        required,
                    },
                ));
            }
        }
        out
    }

    /// The wire form of an input's config: `[type, options]` as the class declares it.
    pub fn input_config(&self, class: &str, input: &str) -> Value {
        self.info
            .get(class)
            .and_then(|c| {
                c.pointer(&format!("/input/required/{input}"))
                    .or_else(|| c.pointer(&format!("/input/optional/{input}")))
            })
            .cloned()
            .unwrap_or(Value::Null)
    }

    /// Classes whose own VALIDATE_INPUTS checks these inputs (the generic range and list
    /// checks are then skipped, as in ComfyUI): the input, and the kind of file its
    /// message names ("Invalid image file: NAME").
    pub fn custom_validated_inputs(class: &str) -> &'static [(&'static str, &'static str)] {
        match class {
            "LoadImage" | "LoadImageMask" => &[("image", "image")],
            "LoadAudio" => &[("audio", "audio")],
            _ => &[],
        }
    }
}

/// The model-file inputs of loader classes: the values a backend may lack.
pub fn model_inputs(class: &str) -> &'static [&'static str] {
    match class {
        "CheckpointLoaderSimple" => &["ckpt_name"],
        "LoraLoader" => &["lora_name"],
        _ => &[],
    }
}

/// What a class costs, at speed 1, when it executes.
#[derive(Debug, Clone, PartialEq)]
pub enum Cost {
    /// Finishes after this long with no progress.
    Fixed(Duration),
    /// A model loader: slow unless the previous prompt loaded the same file.
    Loader { cold: Duration, warm: Duration },
    /// One progress message per step, `per_step` apart.
    Steps { steps: u64, per_step: Duration },
}

/// Cost of a plain class from its inputs; the Gantry test nodes are run by the executor.
pub fn cost(class: &str, inputs: &Map<String, Value>) -> Cost {
    let ms = Duration::from_millis;
    match class {
        "CheckpointLoaderSimple" => Cost::Loader {
            cold: ms(2000),
            warm: ms(40),
        },
        "LoraLoader" => Cost::Loader {
            cold: ms(300),
            warm: ms(10),
        },
        "KSampler" => {
            let steps = inputs
                .get("steps")
                .and_then(Value::as_u64)
                .unwrap_or(20)
                .max(1);
            Cost::Steps {
                steps,
                per_step: ms(50),
            }
        }
        "CLIPTextEncode" => Cost::Fixed(ms(15)),
        "VAEDecode" | "VAEEncode" => Cost::Fixed(ms(60)),
        "SaveImage" => Cost::Fixed(ms(5)),
        "PreviewImage" => Cost::Fixed(ms(3)),
        "ImageBlur" | "ImageScale" => Cost::Fixed(ms(2)),
        _ => Cost::Fixed(ms(1)),
    }
}
