//! Where a model's tensors come from: memory-mapped safetensors (one file or shards) or a GGUF file.
//! Models ask for tensors by their Hugging Face names; GGUF names are mapped. Quantized GGUF weights
//! stay quantized behind [`Linear`].

use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::quantized::{gguf_file, GgmlDType, QMatMul, QTensor};
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Module, Tensor};

use infer_kernels::{HalfKind, HalfWeight, Isa, QType, QWeight};

use crate::error::{Error, Result};

/// A linear layer `y = x Wᵀ (+ b)` over dense or quantized weights.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: LinearWeight,
    bias: Option<Tensor>,
}

#[derive(Debug, Clone)]
enum LinearWeight {
    /// Dense weights, or quantized formats our kernels do not cover (candle's matmul).
    Candle(QMatMul),
    /// GGUF block weights on the CPU, multiplied by infer-kernels' quantized matmul.
    Cpu(Arc<QWeight>),
    /// GGUF F16/BF16 weights on the CPU, kept in 16 bits by infer-kernels' half matmul.
    Half(Arc<HalfWeight>),
}

/// The elements of a contiguous f32 tensor in host memory, borrowed (no copy) while the guard lives.
pub(crate) struct HostF32<G> {
    storage: G,
    range: std::ops::Range<usize>,
}

impl<G: std::ops::Deref<Target = candle_core::Storage>> HostF32<G> {
    pub(crate) fn get(&self) -> &[f32] {
        match &*self.storage {
            candle_core::Storage::Cpu(candle_core::CpuStorage::F32(v)) => &v[self.range.clone()],
            _ => unreachable!("checked by host_f32"),
        }
    }
    pub(crate) fn len(&self) -> usize {
        self.range.len()
    }
}

/// [`HostF32`] of `x`, or `None` for other tensors (other devices or dtypes, strided views), which
/// take candle's ops.
pub(crate) fn host_f32(x: &Tensor) -> Option<HostF32<impl std::ops::Deref<Target = candle_core::Storage> + '_>> {
    if x.dtype() != DType::F32 || !x.device().is_cpu() || !x.is_contiguous() {
        return None;
    }
    let (storage, layout) = x.storage_and_layout();
    if !matches!(&*storage, candle_core::Storage::Cpu(candle_core::CpuStorage::F32(_))) {
        return None;
    }
    let start = layout.start_offset();
    Some(HostF32 { storage, range: start..start + x.elem_count() })
}

/// `x [..., cols] → [..., rows]` through a CPU kernel `f(x, m, out)`.
fn cpu_matmul(x: &Tensor, rows: usize, cols: usize, f: impl Fn(&[f32], usize, &mut [f32]) -> Result<()>) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let k = *dims.last().unwrap_or(&0);
    if k != cols {
        return Err(Error::Model(format!("linear layer expects {cols} inputs, got shape {dims:?}")));
    }
    let m = x.elem_count() / k.max(1);
    let x32 = x.to_dtype(DType::F32)?.contiguous()?;
    let xv = host_f32(&x32).ok_or_else(|| Error::Model("infer's CPU matmul needs its input in host memory".into()))?;
    let mut out = vec![0f32; m * rows];
    f(xv.get(), m, &mut out)?;
    let mut odims = dims;
    *odims.last_mut().expect("at least one dim") = rows;
    Ok(Tensor::from_vec(out, odims, x.device())?.to_dtype(x.dtype())?)
}

impl From<Quantize> for QType {
    fn from(q: Quantize) -> Self {
        match q {
            Quantize::Q8_0 => QType::Q8_0,
            Quantize::Q4_0 => QType::Q4_0,
            Quantize::Q4K => QType::Q4K,
            Quantize::Q5K => QType::Q5K,
            Quantize::Q6K => QType::Q6K,
        }
    }
}

/// The infer-kernels block format of a GGUF tensor type, if it has a kernel.
fn kernel_qtype(t: GgmlDType) -> Option<QType> {
    match t {
        GgmlDType::Q4_0 => Some(QType::Q4_0),
        GgmlDType::Q4_1 => Some(QType::Q4_1),
        GgmlDType::Q8_0 => Some(QType::Q8_0),
        GgmlDType::Q2K => Some(QType::Q2K),
        GgmlDType::Q3K => Some(QType::Q3K),
        GgmlDType::Q4K => Some(QType::Q4K),
        GgmlDType::Q5K => Some(QType::Q5K),
        GgmlDType::Q6K => Some(QType::Q6K),
        GgmlDType::Q5_0 => Some(QType::Q5_0),
        GgmlDType::Q5_1 => Some(QType::Q5_1),
        _ => None,
    }
}

/// The best CPU kernel path this machine has (`amx`, `avx512`, `avx2-vnni`, `avx2`, `neon-dotprod`,
/// `neon` or `scalar`); a model may be capped below it ([`KernelChoice::max_isa`]).
pub fn cpu_kernels() -> &'static str {
    Isa::detect().name()
}

/// Which kernels a model runs on: a field of [`LoadOptions`](crate::LoadOptions), for comparisons
/// and tests (the CLI maps `INFER_ISA`, `INFER_TENSOR_PATH`, `INFER_CANDLE_QMATMUL`,
/// `INFER_CUDA_UNFUSED`, `INFER_CUDA_GRAPH` and `INFER_CUDA_PDL` onto it).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KernelChoice {
    /// The most capable CPU instruction set the kernels may use (`None`: the best this CPU has):
    /// the weights are packed for it and the matmuls and the host path's attention run it.
    pub max_isa: Option<Isa>,
    /// Run the tensor path (candle ops) even where the host path (CPU) or the CUDA decode step could.
    pub tensor_path: bool,
    /// Keep candle's quantized matmul for GGUF weights instead of infer's kernels.
    pub candle_qmatmul: bool,
    /// CUDA decode step: keep separate RMSNorm, q|k|v and RoPE kernels at every row count (the norms
    /// are otherwise folded into the matmuls of 1-2 row steps).
    pub cuda_unfused: bool,
    /// CUDA decode step: launch kernel by kernel instead of replaying a captured CUDA graph.
    pub cuda_no_graph: bool,
    /// CUDA decode step: plain launches instead of programmatic dependent launches (Hopper).
    pub cuda_no_pdl: bool,
}

impl KernelChoice {
    /// The instruction set the CPU kernels use: the best this CPU has, up to [`max_isa`](Self::max_isa).
    pub fn isa(&self) -> Isa {
        self.max_isa.map_or_else(Isa::detect, Isa::best_up_to)
    }
}

impl Linear {
    pub fn new(weight: QMatMul, bias: Option<Tensor>) -> Self {
        Self { weight: LinearWeight::Candle(weight), bias }
    }

    /// A linear layer over quantized weights run by infer-kernels on the CPU.
    pub fn from_kernel_weight(weight: QWeight, bias: Option<Tensor>) -> Self {
        Self { weight: LinearWeight::Cpu(Arc::new(weight)), bias }
    }

    /// `x`: `[..., in]` → `[..., out]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if let (true, Some((rows, cols))) = (self.on_infer_kernels(), self.host_dims()) {
            return cpu_matmul(x, rows, cols, |xv, m, out| self.forward_host(xv, m, out));
        }
        let y = match &self.weight {
            LinearWeight::Candle(w) => w.forward(x)?,
            LinearWeight::Cpu(w) => cpu_matmul(x, w.rows(), w.cols(), |xv, m, out| {
                w.matmul(xv, m, out);
                Ok(())
            })?,
            LinearWeight::Half(w) => cpu_matmul(x, w.rows(), w.cols(), |xv, m, out| {
                w.matmul(xv, m, out);
                Ok(())
            })?,
        };
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }
}

impl Linear {
    /// Several layers over the same input (a layer's q, k and v, or gate and up): when all run on
    /// infer's CPU kernels, [`forward_many_host`](Self::forward_many_host); otherwise one after another.
    pub fn forward_many<const N: usize>(layers: [&Linear; N], x: &Tensor) -> Result<[Tensor; N]> {
        if !layers.iter().all(|l| l.on_infer_kernels()) || x.dims().last().copied() != layers[0].host_dims().map(|d| d.1) {
            return Ok(layers.map(|l| l.forward(x)).into_iter().collect::<Result<Vec<_>>>()?.try_into().expect("N results"));
        }
        let dims = x.dims().to_vec();
        let m = x.elem_count() / dims.last().copied().unwrap_or(1).max(1);
        let x32 = x.to_dtype(DType::F32)?.contiguous()?;
        let xv = host_f32(&x32).ok_or_else(|| Error::Model("infer's CPU matmul needs its input in host memory".into()))?;
        let rows = layers.map(|l| l.host_dims().map_or(0, |d| d.0));
        let mut outs: [Vec<f32>; N] = rows.map(|r| vec![0f32; m * r]);
        Linear::forward_many_host(layers, xv.get(), m, outs.each_mut().map(|o| o.as_mut_slice()))?;
        let mut res = Vec::with_capacity(N);
        for (out, r) in outs.into_iter().zip(rows) {
            let mut odims = dims.clone();
            *odims.last_mut().expect("at least one dim") = r;
            res.push(Tensor::from_vec(out, odims, x.device())?.to_dtype(x.dtype())?);
        }
        Ok(res.try_into().expect("N results"))
    }

    /// The plain weight tensor `[out, in]` and the bias, when candle multiplies by a dense tensor
    /// (what the CUDA decode step reads directly).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(crate) fn dense(&self) -> Option<(&Tensor, Option<&Tensor>)> {
        match &self.weight {
            LinearWeight::Candle(QMatMul::Tensor(t) | QMatMul::TensorF16(t)) => Some((t, self.bias.as_ref())),
            _ => None,
        }
    }

    /// Whether the layer runs on infer's CPU kernels (quantized or 16-bit host weights, a host f32
    /// bias if any), so [`forward_host`](Self::forward_host) can run it.
    pub(crate) fn on_infer_kernels(&self) -> bool {
        matches!(self.weight, LinearWeight::Cpu(_) | LinearWeight::Half(_)) && self.bias.as_ref().is_none_or(|b| host_f32(b).is_some())
    }

    /// `(rows, cols)` of a layer on infer's CPU kernels.
    fn host_dims(&self) -> Option<(usize, usize)> {
        match &self.weight {
            LinearWeight::Cpu(w) => Some((w.rows(), w.cols())),
            LinearWeight::Half(w) => Some((w.rows(), w.cols())),
            LinearWeight::Candle(_) => None,
        }
    }

    /// `out[m, rows] = x[m, cols] · Wᵀ (+ b)` on host slices, for a layer that [`on_infer_kernels`](Self::on_infer_kernels).
    /// Allocates nothing (the kernels reuse their buffers).
    pub(crate) fn forward_host(&self, x: &[f32], m: usize, out: &mut [f32]) -> Result<()> {
        Linear::forward_many_host([self], x, m, [out])
    }

    /// [`forward_host`](Self::forward_host) of several layers over the same input: when all are
    /// quantized, one grouped call (the activations quantized once, one parallel region).
    pub(crate) fn forward_many_host<const N: usize>(layers: [&Linear; N], x: &[f32], m: usize, mut outs: [&mut [f32]; N]) -> Result<()> {
        for (l, o) in layers.iter().zip(&outs) {
            let Some((rows, cols)) = l.host_dims() else {
                return Err(Error::Model("this linear layer is not on infer's CPU kernels".into()));
            };
            if x.len() != m * cols || o.len() != m * rows {
                return Err(Error::Model(format!(
                    "linear layer [{rows}, {cols}] got {} inputs and {} outputs for {m} rows",
                    x.len(),
                    o.len()
                )));
            }
        }
        let quantized = layers.map(|l| match &l.weight {
            LinearWeight::Cpu(w) => Some(w.as_ref()),
            _ => None,
        });
        if quantized.iter().all(Option::is_some) {
            infer_kernels::matmul_many(&quantized.map(|w| w.expect("checked")), x, m, &mut outs);
        } else {
            for (l, o) in layers.iter().zip(outs.iter_mut()) {
                match &l.weight {
                    LinearWeight::Cpu(w) => w.matmul(x, m, o),
                    LinearWeight::Half(w) => w.matmul(x, m, o),
                    LinearWeight::Candle(_) => unreachable!("checked by host_dims"),
                }
            }
        }
        for (l, o) in layers.iter().zip(outs.iter_mut()) {
            if let Some(b) = l.bias.as_ref().and_then(host_f32) {
                for row in o.chunks_exact_mut(b.len()) {
                    row.iter_mut().zip(b.get()).for_each(|(y, b)| *y += b);
                }
            }
        }
        Ok(())
    }
}

/// In-situ quantization of dense (safetensors) linear weights at load, for the CPU kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quantize {
    Q8_0,
    Q4_0,
    Q4K,
    Q5K,
    Q6K,
}

impl Quantize {
    fn ggml(self) -> GgmlDType {
        match self {
            Quantize::Q8_0 => GgmlDType::Q8_0,
            Quantize::Q4_0 => GgmlDType::Q4_0,
            Quantize::Q4K => GgmlDType::Q4K,
            Quantize::Q5K => GgmlDType::Q5K,
            Quantize::Q6K => GgmlDType::Q6K,
        }
    }
}

impl std::str::FromStr for Quantize {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "q8_0" => Ok(Quantize::Q8_0),
            "q4_0" => Ok(Quantize::Q4_0),
            "q4_k" | "q4k" => Ok(Quantize::Q4K),
            "q5_k" | "q5k" => Ok(Quantize::Q5K),
            "q6_k" | "q6k" => Ok(Quantize::Q6K),
            _ => Err(Error::param("quantize", format!("`{s}` is not one of q8_0, q4_0, q4_k, q5_k, q6_k"))),
        }
    }
}

/// Quantizes a `[rows, cols]` weight (any float dtype, on the host) to `dtype` blocks, row-major, with
/// row chunks spread over the threads. `cols` must be a multiple of the block size, so every block lies
/// in one row and the bytes equal those of quantizing the whole tensor at once (candle does that on
/// one thread: minutes for an 8B model's Q4_K).
pub(crate) fn quantize_rows(t: &Tensor, dtype: GgmlDType, rows: usize, cols: usize) -> Result<Vec<u8>> {
    use rayon::prelude::*;
    if t.dims() != [rows, cols] || !cols.is_multiple_of(dtype.block_size()) {
        return Err(Error::Model(format!("quantizing a {:?} tensor as [{rows}, {cols}] rows of {dtype:?}", t.dims())));
    }
    // Read in place (an 8B model's output head is 2.1 GB in f32: no second copy of it).
    let t = t.to_dtype(DType::F32)?.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else {
        return Err(Error::Model("quantizing: the weight is not in host memory".into()));
    };
    let start = layout.start_offset();
    let values = cpu.as_slice::<f32>()?.get(start..start + rows * cols).ok_or_else(|| Error::Model("quantizing: short weight".into()))?;
    let row_bytes = cols / dtype.block_size() * dtype.type_size();
    // Chunks of at least 64k values, about 4 per thread.
    let chunk_rows = rows.div_ceil(4 * rayon::current_num_threads()).max(65_536usize.div_ceil(cols)).max(1);
    let parts: Vec<Result<Vec<u8>>> = values
        .par_chunks(chunk_rows * cols)
        .map(|c| {
            let part = Tensor::from_slice(c, (c.len() / cols, cols), &Device::Cpu)?;
            Ok(QTensor::quantize(&part, dtype)?.data()?.into_owned())
        })
        .collect();
    let mut out = Vec::with_capacity(rows * row_bytes);
    for p in parts {
        out.extend_from_slice(&p?);
    }
    Ok(out)
}

/// A source of named tensors.
pub enum WeightSource {
    /// Safetensors files, memory-mapped; tensors are converted to `dtype` as they are loaded, and
    /// linear weights quantized when `quantize` is set.
    Safetensors {
        st: MmapedSafetensors,
        files: Vec<PathBuf>,
        dtype: DType,
        device: Device,
        quantize: Option<Quantize>,
        kernels: KernelChoice,
    },
    /// A GGUF file: quantized tensors stay quantized.
    Gguf { content: gguf_file::Content, reader: Mutex<BufReader<File>>, path: PathBuf, device: Device, kernels: KernelChoice },
}

/// Most metadata array elements (over all arrays) a GGUF file may hold: read into memory they take
/// 32-64 bytes each, so this bounds the header's cost to about 1 GiB. Real files hold a few
/// million at most (a 256k vocabulary with its scores, types and merges).
pub const MAX_GGUF_METADATA_ELEMENTS: u64 = 1 << 24;

/// Counts the array elements in a GGUF file's metadata without keeping any of them (strings and
/// fixed-size values are skipped by seeking); stops early once over the limit. Reads from the
/// reader's start; stops with an error at anything malformed (candle's reader then says what).
pub fn gguf_metadata_elements<R: Read + Seek>(r: &mut R) -> std::io::Result<u64> {
    fn u32_of<R: Read>(r: &mut R) -> std::io::Result<u32> {
        let mut b = [0u8; 4];
        r.read_exact(&mut b)?;
        Ok(u32::from_le_bytes(b))
    }
    fn len_of<R: Read>(r: &mut R, wide: bool) -> std::io::Result<u64> {
        if wide {
            let mut b = [0u8; 8];
            r.read_exact(&mut b)?;
            Ok(u64::from_le_bytes(b))
        } else {
            u32_of(r).map(u64::from)
        }
    }
    fn bad(what: &str) -> std::io::Error {
        std::io::Error::new(std::io::ErrorKind::InvalidData, format!("malformed GGUF {what}"))
    }
    fn skip_bytes<R: Seek>(r: &mut R, n: u64) -> std::io::Result<()> {
        r.seek(SeekFrom::Current(i64::try_from(n).map_err(|_| bad("length"))?)).map(|_| ())
    }
    /// Bytes of one value of a fixed-size type; `None` for strings and arrays.
    fn fixed_size(ty: u32) -> std::io::Result<Option<u64>> {
        Ok(match ty {
            0 | 1 | 7 => Some(1),
            2 | 3 => Some(2),
            4..=6 => Some(4),
            10..=12 => Some(8),
            8 | 9 => None,
            _ => return Err(bad("value type")),
        })
    }
    /// Skips one value of type `ty`, adding the elements of arrays to `count`.
    fn skip<R: Read + Seek>(r: &mut R, ty: u32, wide: bool, depth: usize, end: u64, count: &mut u64) -> std::io::Result<()> {
        if let Some(n) = fixed_size(ty)? {
            return skip_bytes(r, n);
        }
        if ty == 8 {
            let n = len_of(r, wide)?;
            return skip_bytes(r, n);
        }
        if depth > 64 {
            return Err(bad("nesting"));
        }
        let elem = u32_of(r)?;
        let n = len_of(r, wide)?;
        *count = count.saturating_add(n);
        if *count > MAX_GGUF_METADATA_ELEMENTS {
            return Ok(());
        }
        match fixed_size(elem)? {
            Some(size) => skip_bytes(r, n.saturating_mul(size)),
            None => {
                // Strings or arrays one by one; each takes at least 4 bytes, so the loop stops
                // at the end of the file.
                for _ in 0..n {
                    skip(r, elem, wide, depth + 1, end, count)?;
                    if r.stream_position()? > end || *count > MAX_GGUF_METADATA_ELEMENTS {
                        break;
                    }
                }
                Ok(())
            }
        }
    }
    let end = r.seek(SeekFrom::End(0))?;
    r.seek(SeekFrom::Start(0))?;
    let mut magic = [0u8; 4];
    r.read_exact(&mut magic)?;
    if &magic != b"GGUF" {
        return Err(bad("magic"));
    }
    let wide = u32_of(r)? >= 2;
    let _tensors = len_of(r, wide)?;
    let kvs = len_of(r, wide)?;
    let mut count = 0u64;
    for _ in 0..kvs {
        let key = len_of(r, wide)?;
        skip_bytes(r, key)?;
        let ty = u32_of(r)?;
        skip(r, ty, wide, 0, end, &mut count)?;
        if r.stream_position()? > end || count > MAX_GGUF_METADATA_ELEMENTS {
            break;
        }
    }
    Ok(count)
}

/// The GGUF name of a Hugging Face tensor name of the Llama family.
pub fn gguf_name(hf: &str) -> String {
    match hf {
        "model.embed_tokens.weight" => return "token_embd.weight".into(),
        "model.norm.weight" => return "output_norm.weight".into(),
        "lm_head.weight" => return "output.weight".into(),
        _ => {}
    }
    if let Some(rest) = hf.strip_prefix("model.layers.") {
        if let Some((layer, tail)) = rest.split_once('.') {
            let mapped = match tail {
                "self_attn.q_proj.weight" => "attn_q.weight",
                "self_attn.k_proj.weight" => "attn_k.weight",
                "self_attn.v_proj.weight" => "attn_v.weight",
                "self_attn.q_proj.bias" => "attn_q.bias",
                "self_attn.k_proj.bias" => "attn_k.bias",
                "self_attn.v_proj.bias" => "attn_v.bias",
                "self_attn.o_proj.weight" => "attn_output.weight",
                "self_attn.qkv_proj.weight" => "attn_qkv.weight",
                "mlp.gate_up_proj.weight" => "ffn_up.weight",
                "self_attn.q_norm.weight" => "attn_q_norm.weight",
                "self_attn.k_norm.weight" => "attn_k_norm.weight",
                "mlp.gate_proj.weight" => "ffn_gate.weight",
                "mlp.up_proj.weight" => "ffn_up.weight",
                "mlp.down_proj.weight" => "ffn_down.weight",
                "input_layernorm.weight" => "attn_norm.weight",
                "post_attention_layernorm.weight" => "ffn_norm.weight",
                other => return format!("blk.{layer}.{other}"),
            };
            return format!("blk.{layer}.{mapped}");
        }
    }
    hf.to_string()
}

impl WeightSource {
    /// Memory-maps safetensors files (all shards of one model).
    pub fn safetensors(files: Vec<PathBuf>, dtype: DType, device: Device) -> Result<Self> {
        for f in &files {
            if !f.exists() {
                return Err(Error::bad_file(
                    f,
                    "file not found (a shard listed in model.safetensors.index.json is missing; download it again)",
                ));
            }
        }
        // SAFETY: the files are mapped read-only; like every mmap-based loader we rely on them not being
        // modified while the model loads.
        let st = unsafe { MmapedSafetensors::multi(&files) }.map_err(|e| {
            let which = files.iter().find(|f| unsafe { MmapedSafetensors::new(f) }.is_err()).unwrap_or(&files[0]);
            Error::bad_file(
                which,
                format!("not a valid safetensors file ({}); it may be truncated or corrupt — download it again", root_cause(&e)),
            )
        })?;
        Ok(Self::Safetensors { st, files, dtype, device, quantize: None, kernels: KernelChoice::default() })
    }

    /// Quantizes dense linear weights as they load (rows whose length is not a multiple of the
    /// format's block stay dense): for infer's kernels on the CPU, for candle's quantized kernels on
    /// CUDA.
    pub fn with_quantize(mut self, q: Option<Quantize>) -> Result<Self> {
        if let Self::Safetensors { quantize, device, .. } = &mut self {
            if q.is_some() && device.is_metal() {
                return Err(Error::param("quantize", "in-situ quantization is not supported on Metal; drop --quantize"));
            }
            *quantize = q;
        }
        Ok(self)
    }

    /// Runs the weights on the given kernels.
    pub fn with_kernels(mut self, k: KernelChoice) -> Self {
        match &mut self {
            Self::Safetensors { kernels, .. } | Self::Gguf { kernels, .. } => *kernels = k,
        }
        self
    }

    /// The kernels the weights run on.
    pub fn kernels(&self) -> KernelChoice {
        match self {
            Self::Safetensors { kernels, .. } | Self::Gguf { kernels, .. } => *kernels,
        }
    }

    /// Opens a GGUF file and checks that it holds every byte its header promises.
    pub fn gguf(path: &Path, device: Device) -> Result<Self> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        let mut reader = BufReader::new(file);
        // candle keeps each metadata array element as a 32-byte value: count them first.
        if let Ok(n) = gguf_metadata_elements(&mut reader) {
            if n > MAX_GGUF_METADATA_ELEMENTS {
                return Err(Error::bad_file(
                    path,
                    format!(
                        "its metadata holds {n} array elements (at most {MAX_GGUF_METADATA_ELEMENTS}: the largest vocabularies have a few million); refusing to read them into memory"
                    ),
                ));
            }
        }
        reader.seek(SeekFrom::Start(0)).map_err(|e| Error::io(path, e))?;
        // candle's reader panics on some malformed headers (an alignment of 0): caught, as an error.
        let read = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| gguf_file::Content::read(&mut reader)));
        let content = match read {
            Ok(r) => r.map_err(|e| {
                Error::bad_file(
                    path,
                    format!("not a valid GGUF file ({}); it may be truncated or corrupt — download it again", root_cause(&e)),
                )
            })?,
            Err(_) => return Err(Error::bad_file(path, "not a valid GGUF file (its header is malformed, e.g. an alignment of 0)")),
        };
        for (name, info) in &content.tensor_infos {
            let dims = info.shape.dims();
            let elems = dims.iter().try_fold(1usize, |n, &d| n.checked_mul(d)).filter(|&n| n <= 1 << 40);
            let Some(elems) = elems.filter(|_| !dims.is_empty()) else {
                return Err(Error::bad_file(path, format!("tensor `{name}` has impossible dimensions {dims:?}")));
            };
            let block = info.ggml_dtype.block_size();
            if elems % block != 0 {
                return Err(Error::bad_file(
                    path,
                    format!("tensor `{name}` has {elems} elements, not a multiple of its type's block size {block}"),
                ));
            }
            let end = (elems / block)
                .checked_mul(info.ggml_dtype.type_size())
                .and_then(|b| content.tensor_data_offset.checked_add(info.offset)?.checked_add(b as u64));
            let Some(end) = end else {
                return Err(Error::bad_file(path, format!("tensor `{name}` has impossible dimensions {dims:?}")));
            };
            if end > len {
                return Err(Error::bad_file(
                    path,
                    format!("truncated: tensor `{name}` ends at byte {end} but the file has {len} bytes; download it again"),
                ));
            }
        }
        Ok(Self::Gguf { content, reader: Mutex::new(reader), path: path.to_path_buf(), device, kernels: KernelChoice::default() })
    }

    /// Whether the tensors come from a GGUF file.
    pub fn is_gguf(&self) -> bool {
        matches!(self, Self::Gguf { .. })
    }

    pub fn device(&self) -> &Device {
        match self {
            Self::Safetensors { device, .. } | Self::Gguf { device, .. } => device,
        }
    }

    /// The activation dtype models built from this source compute in.
    pub fn dtype(&self) -> DType {
        match self {
            Self::Safetensors { dtype, .. } => *dtype,
            Self::Gguf { .. } => DType::F32,
        }
    }

    /// GGUF metadata, for GGUF sources.
    pub fn gguf_content(&self) -> Option<(&gguf_file::Content, &Path)> {
        match self {
            Self::Gguf { content, path, .. } => Some((content, path)),
            _ => None,
        }
    }

    /// Does the tensor (HF name) exist?
    pub fn contains(&self, name: &str) -> bool {
        match self {
            Self::Safetensors { st, .. } => st.get(name).is_ok(),
            Self::Gguf { content, .. } => content.tensor_infos.contains_key(&gguf_name(name)),
        }
    }

    fn where_(&self) -> String {
        match self {
            Self::Safetensors { files, .. } if files.len() == 1 => files[0].display().to_string(),
            Self::Safetensors { files, .. } => format!("{} (and {} more shards)", files[0].display(), files.len() - 1),
            Self::Gguf { path, .. } => path.display().to_string(),
        }
    }

    fn missing(&self, name: &str) -> Error {
        let shown = match self {
            Self::Gguf { .. } => gguf_name(name),
            _ => name.to_string(),
        };
        Error::Model(format!("{}: tensor `{shown}` is missing; the weights do not match the model's config", self.where_()))
    }

    fn check_shape(&self, name: &str, got: &[usize], want: &[usize]) -> Result<()> {
        if got != want {
            return Err(Error::Model(format!(
                "{}: tensor `{name}` has shape {got:?}, expected {want:?} from the config; the weights do not match the config",
                self.where_()
            )));
        }
        Ok(())
    }

    fn qtensor(&self, name: &str) -> Result<QTensor> {
        let Self::Gguf { content, reader, path, device, .. } = self else { unreachable!("qtensor on a non-GGUF source") };
        let gname = gguf_name(name);
        if !content.tensor_infos.contains_key(&gname) {
            return Err(self.missing(name));
        }
        let mut r = reader.lock().unwrap_or_else(|p| p.into_inner());
        content
            .tensor(&mut *r, &gname, device)
            .map_err(|e| Error::bad_file(path, format!("cannot read tensor `{gname}`: {}", root_cause(&e))))
    }

    /// A dense tensor of the given shape in the compute dtype (norm weights, embeddings, biases).
    pub fn tensor(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        match self {
            Self::Safetensors { dtype, device, .. } => Ok(self.safetensor_on(name, shape, device)?.to_dtype(*dtype)?),
            Self::Gguf { device, .. } => {
                let q = self.qtensor(name)?;
                // GGUF lists dimensions innermost first; candle reverses them into row-major order.
                self.check_shape(&gguf_name(name), q.shape().dims(), shape)?;
                Ok(q.dequantize(device)?)
            }
        }
    }

    /// A safetensors tensor of shape `shape` on `device`, in the file's dtype.
    fn safetensor_on(&self, name: &str, shape: &[usize], device: &Device) -> Result<Tensor> {
        let Self::Safetensors { st, .. } = self else { unreachable!("safetensor_on on a GGUF source") };
        let view = st.get(name).map_err(|_| self.missing(name))?;
        self.check_shape(name, view.shape(), shape)?;
        st.load(name, device).map_err(|e| Error::Model(format!("{}: tensor `{name}`: {}", self.where_(), root_cause(&e))))
    }

    /// A GGUF tensor of shape `shape` (row-major) as its raw blocks, when it is block-quantized and
    /// the model runs on the CPU in f32 (`None` otherwise: load it with [`tensor`](Self::tensor)).
    pub(crate) fn cpu_blocks(&self, name: &str, shape: &[usize]) -> Result<Option<(candle_core::quantized::GgmlDType, Vec<u8>)>> {
        let Self::Gguf { device, .. } = self else { return Ok(None) };
        if !device.is_cpu() || self.dtype() != DType::F32 {
            return Ok(None);
        }
        let q = self.qtensor(name)?;
        self.check_shape(&gguf_name(name), q.shape().dims(), shape)?;
        if q.dtype().block_size() == 1 {
            return Ok(None);
        }
        let data = q.data()?.into_owned();
        Ok(Some((q.dtype(), data)))
    }

    /// A linear layer with weight `[out, in]` and, if `bias`, a bias `[out]`.
    pub fn linear(&self, prefix: &str, out_dim: usize, in_dim: usize, bias: bool) -> Result<Linear> {
        let wname = format!("{prefix}.weight");
        let b = if bias { Some(self.tensor(&format!("{prefix}.bias"), &[out_dim])?) } else { None };
        let w = match self {
            Self::Safetensors { quantize: Some(q), device, .. } if in_dim.is_multiple_of(QType::from(*q).block_values()) => {
                // On the host whatever the device: rows quantize in parallel there, and the blocks go to
                // the GPU once (not f32 there and back).
                let t = self.safetensor_on(&wname, &[out_dim, in_dim], &Device::Cpu)?;
                let data = quantize_rows(&t, q.ggml(), out_dim, in_dim)?;
                if !device.is_cpu() {
                    // `from_data` zeroes the row padding the GPU kernels read past the last block.
                    let storage = candle_core::quantized::QStorage::from_data(std::borrow::Cow::Owned(data), device, q.ggml())?;
                    return Ok(Linear::new(QMatMul::from_qtensor(QTensor::new(storage, (out_dim, in_dim))?)?, b));
                }
                let kw = QWeight::new_for(self.kernels().isa(), QType::from(*q), out_dim, in_dim, data)
                    .map_err(|e| Error::Model(format!("quantizing `{wname}`: {e}")))?;
                return Ok(Linear::from_kernel_weight(kw, b));
            }
            Self::Safetensors { .. } => QMatMul::Tensor(self.tensor(&wname, &[out_dim, in_dim])?),
            Self::Gguf { .. } => {
                let q = self.qtensor(&wname)?;
                self.check_shape(&gguf_name(&wname), q.shape().dims(), &[out_dim, in_dim])?;
                if self.device().is_cpu() && !self.kernels().candle_qmatmul {
                    return self.gguf_linear(&wname, q.dtype(), out_dim, in_dim, q.data()?.into_owned(), b);
                }
                QMatMul::from_arc(Arc::new(q))?
            }
        };
        Ok(Linear::new(w, b))
    }

    /// A linear layer over one GGUF weight's bytes: infer's CPU kernels where they cover the type,
    /// else candle's quantized matmul.
    fn gguf_linear(&self, name: &str, dtype: GgmlDType, rows: usize, cols: usize, data: Vec<u8>, b: Option<Tensor>) -> Result<Linear> {
        let Self::Gguf { path, device, kernels, .. } = self else { unreachable!("gguf_linear on a non-GGUF source") };
        let bad = |e: String| Error::bad_file(path, format!("tensor `{}`: {e}", gguf_name(name)));
        if device.is_cpu() && !kernels.candle_qmatmul {
            let isa = kernels.isa();
            let half = match dtype {
                GgmlDType::F16 => Some(HalfKind::F16),
                GgmlDType::BF16 => Some(HalfKind::Bf16),
                _ => None,
            };
            if let Some(kind) = half {
                let hw = HalfWeight::new_for(isa, kind, rows, cols, &data).map_err(bad)?;
                return Ok(Linear { weight: LinearWeight::Half(Arc::new(hw)), bias: b });
            }
            if let Some(qt) = kernel_qtype(dtype) {
                return Ok(Linear::from_kernel_weight(QWeight::new_for(isa, qt, rows, cols, data).map_err(bad)?, b));
            }
        }
        let storage = candle_core::quantized::QStorage::from_data(std::borrow::Cow::Owned(data), device, dtype)?;
        Ok(Linear::new(QMatMul::from_qtensor(QTensor::new(storage, (rows, cols))?)?, b))
    }

    /// The `n` experts `[n, rows, cols]` of a mixture-of-experts layer, one linear layer each: from
    /// one stacked GGUF tensor (`gguf_name`, e.g. `blk.0.ffn_up_exps.weight`), or from the per-expert
    /// safetensors `"{hf_prefix}.{e}.{hf_suffix}"`.
    pub fn expert_linears(&self, gguf: &str, hf_prefix: &str, hf_suffix: &str, n: usize, rows: usize, cols: usize) -> Result<Vec<Linear>> {
        match self {
            Self::Safetensors { .. } => (0..n).map(|e| self.linear(&format!("{hf_prefix}.{e}.{hf_suffix}"), rows, cols, false)).collect(),
            Self::Gguf { .. } => {
                let q = self.qtensor(gguf)?;
                self.check_shape(gguf, q.shape().dims(), &[n, rows, cols])?;
                let data = q.data()?;
                let per = data.len() / n;
                (0..n).map(|e| self.gguf_linear(gguf, q.dtype(), rows, cols, data[e * per..(e + 1) * per].to_vec(), None)).collect()
            }
        }
    }

    /// Names of all tensors, for progress reporting.
    pub fn num_tensors(&self) -> usize {
        match self {
            Self::Safetensors { st, .. } => st.tensors().len(),
            Self::Gguf { content, .. } => content.tensor_infos.len(),
        }
    }
}

/// The innermost message of a candle error (its context wrappers add nothing for users).
pub(crate) fn root_cause(e: &candle_core::Error) -> String {
    match e {
        candle_core::Error::WithBacktrace { inner, .. } => root_cause(inner),
        candle_core::Error::Context { inner, .. } => root_cause(inner),
        candle_core::Error::WithPath { inner, .. } => root_cause(inner),
        other => other.to_string().replace('\n', "; "),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_quantized_in_parallel_equal_the_whole_tensor_quantized() {
        // 512 rows of 256: chunks of 256 rows (64k values), so at least two chunks whatever the threads.
        let (rows, cols) = (512, 256);
        let v: Vec<f32> = (0..rows * cols).map(|i| ((i * 7919 % 1009) as f32 - 504.0) / 97.0).collect();
        let t = Tensor::from_vec(v, (rows, cols), &Device::Cpu).unwrap();
        for dtype in [GgmlDType::Q8_0, GgmlDType::Q4_0, GgmlDType::Q4K, GgmlDType::Q6K] {
            let whole = QTensor::quantize(&t, dtype).unwrap().data().unwrap().into_owned();
            assert_eq!(quantize_rows(&t, dtype, rows, cols).unwrap(), whole, "{dtype:?}");
            let bf16 = t.to_dtype(DType::BF16).unwrap();
            let want = QTensor::quantize(&bf16.to_dtype(DType::F32).unwrap(), dtype).unwrap().data().unwrap().into_owned();
            assert_eq!(quantize_rows(&bf16, dtype, rows, cols).unwrap(), want, "{dtype:?} from bf16");
        }
        // A view into a larger tensor (rows 3.. of it) reads from its own start.
        let big = Tensor::cat(&[&Tensor::ones((3, cols), DType::F32, &Device::Cpu).unwrap(), &t], 0).unwrap();
        let view = big.narrow(0, 3, rows).unwrap();
        let whole = QTensor::quantize(&t, GgmlDType::Q8_0).unwrap().data().unwrap().into_owned();
        assert_eq!(quantize_rows(&view, GgmlDType::Q8_0, rows, cols).unwrap(), whole, "a view");
        assert!(quantize_rows(&t, GgmlDType::Q8_0, cols, rows).is_err(), "wrong shape");
        let odd = Tensor::zeros((2, 48), DType::F32, &Device::Cpu).unwrap();
        assert!(quantize_rows(&odd, GgmlDType::Q8_0, 2, 48).is_err(), "rows not whole blocks");
    }
}
