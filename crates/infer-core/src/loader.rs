//! Loading a model from where it lives: a local HF folder, a `.gguf` file, or a Hub id. Produces a
//! [`LoadedModel`]: the decoder, its tokenizer, chat template and end-of-sequence ids.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device};

use crate::chat::ChatTemplate;
use crate::config::{GenerationConfig, GgufMeta, GgufTensors, ModelConfig};
use crate::error::{Error, Result};
use crate::hub::{HubFetcher, HubId};
use crate::models::CausalLm;
use crate::tokenizer::Tokenizer;
use crate::weights::WeightSource;

/// Compute dtype choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DTypeChoice {
    /// f32 on CPU; the checkpoint's dtype (bf16/f16) on GPUs.
    #[default]
    Auto,
    F32,
    F16,
    BF16,
}

impl std::str::FromStr for DTypeChoice {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "auto" => Self::Auto,
            "f32" | "float32" => Self::F32,
            "f16" | "float16" | "half" => Self::F16,
            "bf16" | "bfloat16" => Self::BF16,
            other => return Err(Error::param("dtype", format!("`{other}` is not one of auto, f32, f16, bf16"))),
        })
    }
}

/// How to load a model.
pub struct LoadOptions {
    pub device: Device,
    pub dtype: DTypeChoice,
    /// Which `.gguf` file of a Hub repo to use.
    pub gguf_file: Option<String>,
    /// Show download progress bars.
    pub download_progress: bool,
    /// Called as weights load with (done, total) steps.
    pub progress: Option<Box<dyn FnMut(usize, usize) + Send>>,
    /// Quantize dense (safetensors) linear weights at load for the CPU kernels.
    pub quantize: Option<crate::weights::Quantize>,
    /// Which kernels the model runs on (defaults: infer's best for this CPU, the host path).
    pub kernels: crate::weights::KernelChoice,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            device: Device::Cpu,
            dtype: DTypeChoice::Auto,
            gguf_file: None,
            download_progress: false,
            progress: None,
            quantize: None,
            kernels: Default::default(),
        }
    }
}

/// Where a model's files are, once resolved.
#[derive(Debug, Clone)]
pub enum ModelFiles {
    /// HF layout.
    Hf {
        config: PathBuf,
        weights: Vec<PathBuf>,
        tokenizer: PathBuf,
        tokenizer_config: Option<PathBuf>,
        generation_config: Option<PathBuf>,
        chat_template: Option<PathBuf>,
    },
    /// One GGUF file with everything inside.
    Gguf(PathBuf),
}

/// A model ready to generate with.
pub struct LoadedModel {
    /// A short display name.
    pub name: String,
    pub model: Arc<dyn CausalLm>,
    pub tokenizer: Tokenizer,
    pub chat_template: Option<ChatTemplate>,
    /// Token ids that end generation.
    pub eos_token_ids: Vec<u32>,
    pub generation_config: GenerationConfig,
    pub device: Device,
}

impl std::fmt::Debug for LoadedModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedModel").field("name", &self.name).field("config", self.model.config()).finish_non_exhaustive()
    }
}

impl LoadedModel {
    pub fn config(&self) -> &ModelConfig {
        self.model.config()
    }
}

/// Finds the files of `spec`: a folder, a `.gguf` file, or a Hub id `org/name[@revision]`.
pub fn resolve(spec: &str, opts: &LoadOptions) -> Result<ModelFiles> {
    let path = Path::new(spec);
    if path.is_dir() {
        return resolve_dir(path);
    }
    if path.is_file() {
        return if is_gguf(path) {
            Ok(ModelFiles::Gguf(path.to_path_buf()))
        } else if path.file_name().is_some_and(|n| n == "config.json") {
            resolve_dir(path.parent().unwrap_or(Path::new(".")))
        } else {
            Err(Error::bad_file(path, "not a model: give a .gguf file, a folder with config.json and *.safetensors, or a Hub id org/name"))
        };
    }
    if let Some(id) = HubId::parse(spec) {
        return resolve_hub(id, opts);
    }
    Err(Error::Model(format!("{spec}: no such file or folder, and not a Hub id (org/name[@revision])")))
}

fn is_gguf(path: &Path) -> bool {
    use std::io::Read;
    let mut magic = [0u8; 4];
    let has_magic = std::fs::File::open(path).and_then(|mut f| f.read_exact(&mut magic)).is_ok() && &magic == b"GGUF";
    has_magic || path.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
}

fn resolve_dir(dir: &Path) -> Result<ModelFiles> {
    let config = dir.join("config.json");
    if !config.exists() {
        let ggufs = list_ext(dir, "gguf");
        return Err(match ggufs.as_slice() {
            [] => Error::Model(format!(
                "{}: no config.json here; a model folder needs config.json, *.safetensors and tokenizer.json",
                dir.display()
            )),
            many => Error::Model(format!(
                "{}: no config.json, but GGUF files are here; pass one of them: {}",
                dir.display(),
                many.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
            )),
        });
    }
    let index = dir.join("model.safetensors.index.json");
    let weights = if index.exists() {
        shards_from_index(&index)?.into_iter().map(|f| dir.join(f)).collect()
    } else if dir.join("model.safetensors").exists() {
        vec![dir.join("model.safetensors")]
    } else {
        let all = list_ext(dir, "safetensors");
        if all.is_empty() {
            let hint =
                if list_ext(dir, "bin").is_empty() { "" } else { " (PyTorch .bin weights are not supported: convert them to safetensors)" };
            return Err(Error::Model(format!("{}: no *.safetensors weights found{hint}", dir.display())));
        }
        all
    };
    let tokenizer = dir.join("tokenizer.json");
    if !tokenizer.exists() {
        return Err(Error::Model(format!("{}: tokenizer.json is missing; copy it from the model's original repo", dir.display())));
    }
    let opt = |name: &str| Some(dir.join(name)).filter(|p| p.exists());
    Ok(ModelFiles::Hf {
        config,
        weights,
        tokenizer,
        tokenizer_config: opt("tokenizer_config.json"),
        generation_config: opt("generation_config.json"),
        chat_template: opt("chat_template.jinja"),
    })
}

fn list_ext(dir: &Path, ext: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| rd.flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|e| e == ext)).collect())
        .unwrap_or_default();
    v.sort();
    v
}

fn shards_from_index(index: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(index).map_err(|e| Error::io(index, e))?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::bad_file(index, format!("not valid JSON: {e}")))?;
    let map = v.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| Error::bad_file(index, "no `weight_map` object"))?;
    let files: BTreeSet<String> = map
        .values()
        .map(|f| f.as_str().map(str::to_string).ok_or_else(|| Error::bad_file(index, "`weight_map` values must be file names")))
        .collect::<Result<_>>()?;
    if files.iter().any(|f| f.contains("..") || f.starts_with('/')) {
        return Err(Error::bad_file(index, "`weight_map` names a file outside the model folder"));
    }
    Ok(files.into_iter().collect())
}

fn resolve_hub(id: HubId, opts: &LoadOptions) -> Result<ModelFiles> {
    let hub = HubFetcher::new(id, opts.download_progress)?;
    if let Some(g) = &opts.gguf_file {
        if hub.listing().is_some() && !hub.has(g) {
            return Err(Error::Hub(format!("{}: the repo has no file `{g}`; GGUF files there: {}", hub.id(), gguf_names(&hub).join(", "))));
        }
        return Ok(ModelFiles::Gguf(hub.get(g)?));
    }
    if !hub.has("config.json") {
        let ggufs = gguf_names(&hub);
        if ggufs.is_empty() && hub.listing().is_none() {
            // Offline and nothing cached: say so (and what to do).
            hub.get("config.json")?;
        }
        return Err(Error::Hub(match ggufs.len() {
            0 => format!("{}: no config.json in the repo (or in the cache); it is not a transformers model", hub.id()),
            _ => format!("{}: the repo holds GGUF files; pick one with --gguf-file: {}", hub.id(), ggufs.join(", ")),
        }));
    }
    let config = hub.get("config.json")?;
    let weights = if hub.has("model.safetensors.index.json") {
        let index = hub.get("model.safetensors.index.json")?;
        shards_from_index(&index)?.iter().map(|f| hub.get(f)).collect::<Result<Vec<_>>>()?
    } else {
        vec![hub.get("model.safetensors")?]
    };
    let tokenizer = hub.get("tokenizer.json")?;
    let opt = |f: &str| if hub.has(f) { hub.get(f).map(Some) } else { Ok(None) };
    Ok(ModelFiles::Hf {
        config,
        weights,
        tokenizer,
        tokenizer_config: opt("tokenizer_config.json")?,
        generation_config: opt("generation_config.json")?,
        chat_template: opt("chat_template.jinja")?,
    })
}

fn gguf_names(hub: &HubFetcher) -> Vec<String> {
    match hub.listing() {
        Some(l) => l.iter().filter(|f| f.ends_with(".gguf")).cloned().collect(),
        None => hub.cached_files().into_iter().filter(|f| f.ends_with(".gguf")).collect(),
    }
}

/// Resolves and loads `spec`.
pub fn load(spec: &str, mut opts: LoadOptions) -> Result<LoadedModel> {
    let files = resolve(spec, &opts)?;
    let name = display_name(spec);
    load_files(&files, &name, &mut opts)
}

fn display_name(spec: &str) -> String {
    let p = Path::new(spec);
    if p.exists() {
        let p = if p.file_name().is_some_and(|n| n == "config.json") { p.parent().unwrap_or(p) } else { p };
        p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| spec.to_string())
    } else {
        spec.to_string()
    }
}

/// Loads already-resolved files.
pub fn load_files(files: &ModelFiles, name: &str, opts: &mut LoadOptions) -> Result<LoadedModel> {
    let mut noop = |_: usize, _: usize| {};
    match files {
        ModelFiles::Gguf(path) => {
            if opts.quantize.is_some() {
                return Err(Error::param(
                    "quantize",
                    format!("{} is a GGUF file, already quantized; --quantize applies to safetensors weights", path.display()),
                ));
            }
            let w = WeightSource::gguf(path, opts.device.clone())?.with_kernels(opts.kernels);
            let (content, _) = w.gguf_content().expect("gguf source");
            let md = GgufMeta { md: &content.metadata, path };
            let vector = |name: &str| -> Result<Option<Vec<f32>>> {
                match content.tensor_infos.get(name) {
                    Some(info) => Ok(Some(w.tensor(name, &[info.shape.elem_count()])?.to_dtype(DType::F32)?.to_vec1::<f32>()?)),
                    None => Ok(None),
                }
            };
            let rope_factors = match (vector("rope_factors_long.weight")?, vector("rope_factors_short.weight")?) {
                (Some(l), Some(s)) => Some((l, s)),
                _ => None,
            };
            let tensors = GgufTensors {
                has_output: w.contains("output.weight"),
                has_qkv_bias: w.contains("model.layers.0.self_attn.q_proj.bias"),
                rope_freqs: vector("rope_freqs.weight")?,
                rope_factors,
                embedding_rows: content.tensor_infos.get("token_embd.weight").and_then(|i| i.shape.dims().first().copied()),
            };
            let cfg = ModelConfig::from_gguf(&md, path, tensors)?;
            let tokenizer = Tokenizer::from_gguf(&md)?;
            let tokens = md.string_array("tokenizer.ggml.tokens")?.unwrap_or_default();
            let tok_str = |id: Option<u32>| id.and_then(|i| tokens.get(i as usize).cloned()).unwrap_or_default();
            let bos = tok_str(cfg.bos_token_id);
            let eos = tok_str(cfg.eos_token_ids.first().copied());
            let chat_template = md.string_opt("tokenizer.chat_template")?.map(|t| ChatTemplate::new(&t, bos, eos)).transpose()?;
            let mut eos_ids: BTreeSet<u32> = cfg.eos_token_ids.iter().copied().collect();
            for key in ["tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"] {
                eos_ids.extend(md.u32_opt(key)?);
            }
            // As llama.cpp does: well-known end-of-turn tokens end generation too.
            for t in ["<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>", "<EOT>", "<|eom_id|>"] {
                if let Some(id) = tokenizer.token_to_id(t) {
                    eos_ids.insert(id);
                }
            }
            let progress = opts.progress.as_deref_mut().unwrap_or(&mut noop);
            let model = crate::models::load(cfg, &w, progress)?;
            Ok(LoadedModel {
                name: name.to_string(),
                model,
                tokenizer,
                chat_template,
                eos_token_ids: eos_ids.into_iter().collect(),
                generation_config: GenerationConfig::default(),
                device: opts.device.clone(),
            })
        }
        ModelFiles::Hf { config, weights, tokenizer, tokenizer_config, generation_config, chat_template } => {
            let cfg = ModelConfig::from_hf_file(config)?;
            let raw_dtype = checkpoint_dtype(config);
            let dtype = match (opts.dtype, &opts.device) {
                (DTypeChoice::F32, _) => DType::F32,
                (DTypeChoice::F16, _) => DType::F16,
                (DTypeChoice::BF16, _) => DType::BF16,
                (DTypeChoice::Auto, Device::Cpu) => DType::F32,
                (DTypeChoice::Auto, _) => raw_dtype.unwrap_or(DType::BF16),
            };
            let tok = Tokenizer::from_file(tokenizer)?;
            let tc = tokenizer_config.as_deref().map(TokenizerConfig::read).transpose()?.unwrap_or_default();
            let gen = generation_config.as_deref().map(GenerationConfig::from_file).transpose()?.unwrap_or_default();
            let template_src = match chat_template {
                Some(p) => Some(std::fs::read_to_string(p).map_err(|e| Error::io(p, e))?),
                None => tc.chat_template.clone(),
            };
            let chat_template = template_src
                .map(|t| ChatTemplate::new(&t, tc.bos_token.clone().unwrap_or_default(), tc.eos_token.clone().unwrap_or_default()))
                .transpose()?;
            let mut eos_ids: BTreeSet<u32> = gen.eos_token_id.iter().chain(&cfg.eos_token_ids).copied().collect();
            if let Some(id) = tc.eos_token.as_deref().and_then(|t| tok.token_to_id(t)) {
                eos_ids.insert(id);
            }
            let w = WeightSource::safetensors(weights.clone(), dtype, opts.device.clone())?
                .with_quantize(opts.quantize)?
                .with_kernels(opts.kernels);
            let progress = opts.progress.as_deref_mut().unwrap_or(&mut noop);
            let model = crate::models::load(cfg, &w, progress)?;
            Ok(LoadedModel {
                name: name.to_string(),
                model,
                tokenizer: tok,
                chat_template,
                eos_token_ids: eos_ids.into_iter().collect(),
                generation_config: gen,
                device: opts.device.clone(),
            })
        }
    }
}

fn checkpoint_dtype(config: &Path) -> Option<DType> {
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(config).ok()?).ok()?;
    let s = v.get("torch_dtype").or_else(|| v.get("dtype"))?.as_str()?;
    match s {
        "bfloat16" => Some(DType::BF16),
        "float16" => Some(DType::F16),
        "float32" => Some(DType::F32),
        _ => None,
    }
}

/// The parts of `tokenizer_config.json` infer uses.
#[derive(Debug, Default)]
struct TokenizerConfig {
    chat_template: Option<String>,
    bos_token: Option<String>,
    eos_token: Option<String>,
}

impl TokenizerConfig {
    fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::bad_file(path, format!("not valid JSON: {e}")))?;
        // A token is a string or an AddedToken object {"content": ...}.
        let token = |k: &str| match v.get(k) {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            Some(serde_json::Value::Object(o)) => o.get("content").and_then(|c| c.as_str()).map(str::to_string),
            _ => None,
        };
        let chat_template = match v.get("chat_template") {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            // A list of named templates: take "default".
            Some(serde_json::Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                .or_else(|| list.first())
                .and_then(|t| t.get("template"))
                .and_then(|t| t.as_str())
                .map(str::to_string),
            _ => None,
        };
        Ok(Self { chat_template, bos_token: token("bos_token"), eos_token: token("eos_token") })
    }
}
