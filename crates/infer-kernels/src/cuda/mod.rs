//! CUDA launchers for infer's kernels (`kernels/*.cu`), as candle custom ops on CUDA tensors.
//!
//! The PTX is built for sm_80 (any Ampere-or-newer GPU, JIT-compiled by the driver) and sm_90a
//! (Hopper, used on compute capability 9.0). Each function takes and returns candle tensors on a CUDA
//! device, in f32, f16 or bf16; they are the GPU side of what `crate::cpu` does on the host, with the
//! same cache layout and block tables.

use candle_core::backend::BackendStorage;
use std::sync::Arc;

use candle_core::cuda_backend::cudarc::driver::{CudaFunction, CudaSlice, CudaStream, DeviceRepr, LaunchArgs, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaStorageSlice, WrapErr};
use candle_core::{
    bail, CudaDevice, CudaStorage, CustomOp1, CustomOp2, CustomOp3, DType, InplaceOp2, Layout, Result, Shape, Storage, Tensor,
};
use half::{bf16, f16};

mod ptx {
    include!(concat!(env!("OUT_DIR"), "/cuda_ptx.rs"));
}

pub mod decode;

/// A loaded kernel and the device's stream it launches on.
struct Kernel {
    func: CudaFunction,
    stream: Arc<CudaStream>,
}

impl Kernel {
    fn builder(&self) -> LaunchArgs<'_> {
        self.stream.launch_builder(&self.func)
    }
}

/// Loads `kernel` from one of our PTX modules, for this device's architecture.
fn func(dev: &CudaDevice, module: (&'static str, &'static str), name: &str, kernel: &str) -> Result<Kernel> {
    let (major, minor) = dev.cuda_stream().context().compute_capability().w()?;
    if major < 8 {
        bail!("infer's CUDA kernels need a GPU of compute capability 8.0 or newer (Ampere, Ada, Hopper); this one is {major}.{minor}")
    }
    let (ptx, arch) = if (major, minor) == (9, 0) { (module.1, "sm90a") } else { (module.0, "sm80") };
    let func = dev.get_or_load_custom_func(kernel, &format!("infer_{name}_{arch}"), ptx)?.into_cuda_function();
    Ok(Kernel { func, stream: dev.cuda_stream() })
}

fn cuda_storage<'a>(s: &'a Storage, what: &str) -> Result<&'a CudaStorage> {
    match s {
        Storage::Cuda(c) => Ok(c),
        _ => bail!("{what} must be on the CUDA device"),
    }
}

fn contiguous<'a, T: DeviceRepr>(
    s: &'a CudaSlice<T>,
    l: &Layout,
    what: &str,
) -> Result<candle_core::cuda_backend::cudarc::driver::CudaView<'a, T>> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(s.slice(a..b)),
        None => bail!("{what} must be contiguous"),
    }
}

/// Grid for a grid-stride loop over `n` elements.
fn grid_for(n: usize, block: u32) -> LaunchConfig {
    let blocks = n.div_ceil(block as usize).clamp(1, 65_535 * 8) as u32;
    LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (block, 1, 1), shared_mem_bytes: 0 }
}

/// Calls `$body` with `$T` bound to the storage's element type (f32, f16, bf16).
macro_rules! with_float {
    ($dtype:expr, $T:ident => $body:expr) => {
        match $dtype {
            DType::F32 => {
                type $T = f32;
                $body
            }
            DType::F16 => {
                type $T = f16;
                $body
            }
            DType::BF16 => {
                type $T = bf16;
                $body
            }
            other => bail!("CUDA kernel: unsupported dtype {other:?} (f32, f16 or bf16)"),
        }
    };
}

/// The `cpu_fwd` of a custom op that only runs on CUDA (candle's traits require one): an error
/// naming the op.
macro_rules! cuda_only_cpu_fwd {
    (1) => {
        fn cpu_fwd(&self, _: &candle_core::CpuStorage, _: &Layout) -> Result<(candle_core::CpuStorage, Shape)> {
            bail!("{} is a CUDA op", <Self as CustomOp1>::name(self))
        }
    };
    (2) => {
        fn cpu_fwd(
            &self,
            _: &candle_core::CpuStorage,
            _: &Layout,
            _: &candle_core::CpuStorage,
            _: &Layout,
        ) -> Result<(candle_core::CpuStorage, Shape)> {
            bail!("{} is a CUDA op", <Self as CustomOp2>::name(self))
        }
    };
    (3) => {
        fn cpu_fwd(
            &self,
            _: &candle_core::CpuStorage,
            _: &Layout,
            _: &candle_core::CpuStorage,
            _: &Layout,
            _: &candle_core::CpuStorage,
            _: &Layout,
        ) -> Result<(candle_core::CpuStorage, Shape)> {
            bail!("{} is a CUDA op", <Self as CustomOp3>::name(self))
        }
    };
}

fn kname(root: &str, dtype: DType) -> String {
    format!("{root}_{}", dtype.as_str())
}

// ---------------------------------------------------------------------------------------------
// RMSNorm

struct RmsNorm {
    eps: f32,
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "infer-rmsnorm"
    }
    cuda_only_cpu_fwd!(2);
    fn cuda_fwd(&self, x: &CudaStorage, xl: &Layout, w: &CudaStorage, wl: &Layout) -> Result<(CudaStorage, Shape)> {
        let dev = x.device().clone();
        let n = xl.dims().last().copied().unwrap_or(1);
        let rows = xl.shape().elem_count() / n.max(1);
        if wl.shape().elem_count() != n {
            bail!("rms_norm: weight has {} values for rows of {n}", wl.shape().elem_count())
        }
        let block = if n >= 1024 { 1024 } else { n.next_multiple_of(32).max(32) as u32 };
        let cfg = LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (block, 1, 1), shared_mem_bytes: 0 };
        let f = func(&dev, ptx::NORM, "norm", &kname("rmsnorm", x.dtype()))?;
        let slice = with_float!(x.dtype(), T => {
            let xs = contiguous(x.as_cuda_slice::<T>()?, xl, "rms_norm input")?;
            let ws = contiguous(w.as_cuda_slice::<T>()?, wl, "rms_norm weight")?;
            // SAFETY: every element is written by the kernel.
            let out = unsafe { dev.alloc::<T>(rows * n)? };
            let mut b = f.builder();
            b.arg(&xs).arg(&ws).arg(&out);
            let (n_i, eps) = (n as i32, self.eps);
            b.arg(&n_i).arg(&eps);
            // SAFETY: argument types match the kernel's signature.
            unsafe { b.launch(cfg) }.w()?;
            CudaStorage::wrap_cuda_slice(out, dev.clone())
        });
        Ok((slice, xl.shape().clone()))
    }
}

/// RMSNorm over the last dimension: `x / sqrt(mean(x²) + eps) · w`.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f32) -> Result<Tensor> {
    x.apply_op2_no_bwd(w, &RmsNorm { eps })
}

struct AddRmsNorm {
    eps: f32,
    residual: Tensor,
}

impl CustomOp2 for AddRmsNorm {
    fn name(&self) -> &'static str {
        "infer-add-rmsnorm"
    }
    cuda_only_cpu_fwd!(2);
    fn cuda_fwd(&self, x: &CudaStorage, xl: &Layout, w: &CudaStorage, wl: &Layout) -> Result<(CudaStorage, Shape)> {
        let dev = x.device().clone();
        let n = xl.dims().last().copied().unwrap_or(1);
        let rows = xl.shape().elem_count() / n.max(1);
        let (rs, rl) = self.residual.storage_and_layout();
        let r = cuda_storage(&rs, "the residual")?;
        if rl.shape() != xl.shape() || wl.shape().elem_count() != n {
            bail!("add_rms_norm: shapes {:?} + {:?} with weight {:?}", xl.shape(), rl.shape(), wl.shape())
        }
        let block = if n >= 1024 { 1024 } else { n.next_multiple_of(32).max(32) as u32 };
        let cfg = LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (block, 1, 1), shared_mem_bytes: 0 };
        let f = func(&dev, ptx::NORM, "norm", &kname("add_rmsnorm", x.dtype()))?;
        let slice = with_float!(x.dtype(), T => {
            let xs = contiguous(x.as_cuda_slice::<T>()?, xl, "add_rms_norm input")?;
            let res = contiguous(r.as_cuda_slice::<T>()?, rl, "add_rms_norm residual")?;
            let ws = contiguous(w.as_cuda_slice::<T>()?, wl, "add_rms_norm weight")?;
            // Output [2, ...]: the sum, then the normalized sum. SAFETY: the kernel writes all of it.
            let out = unsafe { dev.alloc::<T>(2 * rows * n)? };
            let (sum, y) = (out.slice(..rows * n), out.slice(rows * n..));
            let mut b = f.builder();
            b.arg(&xs).arg(&res).arg(&sum).arg(&ws).arg(&y);
            let (n_i, eps) = (n as i32, self.eps);
            b.arg(&n_i).arg(&eps);
            // SAFETY: argument types match the kernel's signature.
            unsafe { b.launch(cfg) }.w()?;
            CudaStorage::wrap_cuda_slice(out, dev.clone())
        });
        let mut dims = vec![2];
        dims.extend_from_slice(xl.dims());
        Ok((slice, Shape::from(dims)))
    }
}

/// Residual add fused with the RMSNorm that follows it: returns `(x + r, rms_norm(x + r) · w)`.
pub fn add_rms_norm(x: &Tensor, r: &Tensor, w: &Tensor, eps: f32) -> Result<(Tensor, Tensor)> {
    let both = x.apply_op2_no_bwd(w, &AddRmsNorm { eps, residual: r.contiguous()? })?;
    Ok((both.get(0)?, both.get(1)?))
}

// ---------------------------------------------------------------------------------------------
// SiLU · mul

struct SiluMul {
    /// Fused `[rows, 2n]` input (gate then up) instead of two tensors.
    fused: bool,
}

impl SiluMul {
    fn launch(
        &self,
        dev: &CudaDevice,
        dtype: DType,
        gate: &CudaStorage,
        gl: &Layout,
        up: Option<(&CudaStorage, &Layout)>,
    ) -> Result<(CudaStorage, Shape)> {
        let last = gl.dims().last().copied().unwrap_or(1);
        let n = if self.fused { last / 2 } else { last };
        let rows = gl.shape().elem_count() / last.max(1);
        let f = func(dev, ptx::ACT, "act", &kname("silu_mul", dtype))?;
        let slice = with_float!(dtype, T => {
            let g = contiguous(gate.as_cuda_slice::<T>()?, gl, "silu_mul gate")?;
            // SAFETY: every element is written by the kernel.
            let out = unsafe { dev.alloc::<T>(rows * n)? };
            let cfg = grid_for(rows * n, 256);
            let (rows_i, n_i) = (rows as i32, n as i32);
            match up {
                Some((u, ul)) => {
                    let u = contiguous(u.as_cuda_slice::<T>()?, ul, "silu_mul up")?;
                    let mut b = f.builder();
                    b.arg(&g).arg(&u).arg(&out).arg(&rows_i).arg(&n_i).arg(&n_i).arg(&n_i);
                    // SAFETY: argument types match the kernel's signature.
                    unsafe { b.launch(cfg) }.w()?;
                }
                None => {
                    let u = g.slice(n..);
                    let stride = 2 * n_i;
                    let mut b = f.builder();
                    b.arg(&g).arg(&u).arg(&out).arg(&rows_i).arg(&n_i).arg(&stride).arg(&stride);
                    // SAFETY: as above; `up` rows start n values into each fused row.
                    unsafe { b.launch(cfg) }.w()?;
                }
            }
            CudaStorage::wrap_cuda_slice(out, dev.clone())
        });
        let mut dims = gl.dims().to_vec();
        *dims.last_mut().expect("at least one dim") = n;
        Ok((slice, Shape::from(dims)))
    }
}

impl CustomOp2 for SiluMul {
    fn name(&self) -> &'static str {
        "infer-silu-mul"
    }
    cuda_only_cpu_fwd!(2);
    fn cuda_fwd(&self, g: &CudaStorage, gl: &Layout, u: &CudaStorage, ul: &Layout) -> Result<(CudaStorage, Shape)> {
        if gl.shape() != ul.shape() {
            bail!("silu_mul: gate {:?} and up {:?} differ", gl.shape(), ul.shape())
        }
        self.launch(&g.device().clone(), g.dtype(), g, gl, Some((u, ul)))
    }
}

impl CustomOp1 for SiluMul {
    fn name(&self) -> &'static str {
        "infer-silu-mul-fused"
    }
    cuda_only_cpu_fwd!(1);
    fn cuda_fwd(&self, g: &CudaStorage, gl: &Layout) -> Result<(CudaStorage, Shape)> {
        self.launch(&g.device().clone(), g.dtype(), g, gl, None)
    }
}

/// `silu(gate) · up`, elementwise.
pub fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    gate.apply_op2_no_bwd(up, &SiluMul { fused: false })
}

/// `silu(gate) · up` where `gate_up` is `[..., 2n]`, gate first (fused projections, e.g. Phi-3).
pub fn silu_mul_fused(gate_up: &Tensor) -> Result<Tensor> {
    if gate_up.dims().last().is_none_or(|d| d % 2 != 0) {
        bail!("silu_mul_fused: the last dimension of {:?} must be even", gate_up.shape())
    }
    gate_up.apply_op1_no_bwd(&SiluMul { fused: true })
}

// ---------------------------------------------------------------------------------------------
// RoPE

struct Rope {
    interleaved: bool,
    rot_dim: usize,
}

impl CustomOp3 for Rope {
    fn name(&self) -> &'static str {
        "infer-rope"
    }
    cuda_only_cpu_fwd!(3);
    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        xl: &Layout,
        pos: &CudaStorage,
        pl: &Layout,
        inv: &CudaStorage,
        il: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let dev = x.device().clone();
        let (tokens, heads, head_dim) = xl.shape().dims3()?;
        if pl.shape().elem_count() != tokens || il.shape().elem_count() != self.rot_dim / 2 || self.rot_dim > head_dim {
            bail!("rope: x {:?}, positions {:?}, inv_freq {:?}, rot_dim {}", xl.shape(), pl.shape(), il.shape(), self.rot_dim)
        }
        let f = func(&dev, ptx::ROPE, "rope", &kname("rope", x.dtype()))?;
        let p = contiguous(pos.as_cuda_slice::<u32>()?, pl, "rope positions")?;
        let fr = contiguous(inv.as_cuda_slice::<f32>()?, il, "rope inv_freq")?;
        let slice = with_float!(x.dtype(), T => {
            let xs = contiguous(x.as_cuda_slice::<T>()?, xl, "rope input")?;
            // Dimensions past rot_dim are copied through, so start from a copy of x.
            let mut out = unsafe { dev.alloc::<T>(tokens * heads * head_dim)? };
            dev.memcpy_dtod(&xs, &mut out)?;
            let mut b = f.builder();
            let (t_i, h_i, d_i, r_i, il_i) = (tokens as i32, heads as i32, head_dim as i32, self.rot_dim as i32, self.interleaved as i32);
            b.arg(&xs).arg(&out).arg(&p).arg(&fr).arg(&t_i).arg(&h_i).arg(&d_i).arg(&r_i).arg(&il_i);
            // SAFETY: argument types match the kernel's signature.
            unsafe { b.launch(grid_for(tokens * heads * self.rot_dim / 2, 256)) }.w()?;
            CudaStorage::wrap_cuda_slice(out, dev.clone())
        });
        Ok((slice, xl.shape().clone()))
    }
}

/// Rotary embedding of `x = [tokens, heads, head_dim]` at `positions` (u32, one per token) with the
/// layer's inverse frequencies (f32, `rot_dim / 2` of them, scaling already applied); pairs are
/// `(i, i + rot_dim/2)` or, `interleaved`, `(2i, 2i + 1)`.
pub fn rope(x: &Tensor, positions: &Tensor, inv_freq: &Tensor, interleaved: bool) -> Result<Tensor> {
    let rot_dim = 2 * inv_freq.elem_count();
    x.apply_op3_no_bwd(positions, inv_freq, &Rope { interleaved, rot_dim })
}

// ---------------------------------------------------------------------------------------------
// Paged KV cache and attention

struct WriteCache {
    slots: Tensor,
}

impl InplaceOp2 for WriteCache {
    fn name(&self) -> &'static str {
        "infer-write-cache"
    }
    fn cpu_fwd(&self, _: &mut candle_core::CpuStorage, _: &Layout, _: &candle_core::CpuStorage, _: &Layout) -> Result<()> {
        bail!("infer-write-cache is a CUDA op")
    }
    fn cuda_fwd(&self, cache: &mut CudaStorage, cl: &Layout, src: &CudaStorage, sl: &Layout) -> Result<()> {
        let dev = src.device().clone();
        let tokens = self.slots.elem_count();
        let row = sl.shape().elem_count() / tokens.max(1);
        if cl.start_offset() != 0 || !cl.is_contiguous() || !cl.shape().elem_count().is_multiple_of(row.max(1)) {
            bail!("write_cache: the cache must be a whole contiguous tensor of rows of {row}")
        }
        let (ss, slt) = self.slots.storage_and_layout();
        let slots = contiguous(cuda_storage(&ss, "the slots")?.as_cuda_slice::<u32>()?, slt, "slots")?;
        let f = func(&dev, ptx::ATTENTION, "attention", &kname("write_cache", src.dtype()))?;
        with_float!(src.dtype(), T => {
            let s = contiguous(src.as_cuda_slice::<T>()?, sl, "new keys/values")?;
            let c = cache.as_cuda_slice_mut::<T>()?;
            let mut b = f.builder();
            let (t_i, r_i) = (tokens as i32, row as i32);
            b.arg(&s).arg(&slots).arg(c).arg(&t_i).arg(&r_i);
            // SAFETY: argument types match the kernel's signature; slots are checked by the caller.
            unsafe { b.launch(grid_for(tokens * row, 256)) }.w()?;
        });
        Ok(())
    }
}

/// Writes the rows of `src` (`[tokens, num_kv_heads, head_dim]`) into `cache` at `slots` (u32, one
/// flat slot `block · block_size + offset` per token), in place.
pub fn write_cache(cache: &Tensor, src: &Tensor, slots: &Tensor) -> Result<()> {
    cache.inplace_op2(&src.contiguous()?, &WriteCache { slots: slots.contiguous()? })
}

/// Where each query row of a ragged batch looks in the paged cache, uploaded once per forward pass
/// and shared by every layer.
#[derive(Debug, Clone)]
pub struct AttentionMeta {
    /// All sequences' block tables, one after another (u32).
    pub tables: Tensor,
    /// Per query row: where its sequence's table starts in `tables` (u32).
    pub row_table: Tensor,
    /// Per query row: how many keys it sees (its position + 1) (u32).
    pub row_len: Tensor,
    /// The longest `row_len`, which sets the number of partitions.
    pub max_len: usize,
}

impl AttentionMeta {
    /// Builds the row metadata from the sequences of a batch (same fields as the CPU kernel's).
    pub fn new(seqs: &[crate::SeqAttention<'_>], device: &candle_core::Device) -> Result<Self> {
        let (mut tables, mut row_table, mut row_len) = (Vec::new(), Vec::new(), Vec::new());
        crate::row_metadata(seqs.iter().copied(), &mut tables, &mut row_table, &mut row_len);
        let max_len = row_len.iter().copied().max().unwrap_or(0) as usize;
        if tables.is_empty() {
            tables.push(0);
        }
        Ok(Self {
            tables: Tensor::new(tables, device)?,
            row_table: Tensor::new(row_table, device)?,
            row_len: Tensor::new(row_len, device)?,
            max_len,
        })
    }
}

/// Keys per partition (the kernel's `PART`).
const PART: usize = 256;

struct PagedAttention {
    meta: AttentionMeta,
    shape: crate::AttentionShape,
}

impl CustomOp3 for PagedAttention {
    fn name(&self) -> &'static str {
        "infer-paged-attention"
    }
    cuda_only_cpu_fwd!(3);
    fn cuda_fwd(
        &self,
        q: &CudaStorage,
        ql: &Layout,
        k: &CudaStorage,
        kl: &Layout,
        v: &CudaStorage,
        vl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let dev = q.device().clone();
        let sh = &self.shape;
        let (rows, heads, hd) = ql.shape().dims3()?;
        if heads != sh.num_heads || hd != sh.head_dim || hd > 256 || sh.num_kv_heads == 0 || heads % sh.num_kv_heads != 0 {
            bail!(
                "paged_attention: queries {:?} do not fit {} heads of {} (≤ 256) over {} KV heads",
                ql.shape(),
                sh.num_heads,
                sh.head_dim,
                sh.num_kv_heads
            )
        }
        if self.meta.row_len.elem_count() != rows {
            bail!("paged_attention: {} query rows but metadata for {}", rows, self.meta.row_len.elem_count())
        }
        let parts = self.meta.max_len.div_ceil(PART).max(1);
        let (ts, tl) = self.meta.tables.storage_and_layout();
        let (rts, rtl) = self.meta.row_table.storage_and_layout();
        let (rls, rll) = self.meta.row_len.storage_and_layout();
        let tables = contiguous(cuda_storage(&ts, "block tables")?.as_cuda_slice::<u32>()?, tl, "block tables")?;
        let row_table = contiguous(cuda_storage(&rts, "row tables")?.as_cuda_slice::<u32>()?, rtl, "row tables")?;
        let row_len = contiguous(cuda_storage(&rls, "row lengths")?.as_cuda_slice::<u32>()?, rll, "row lengths")?;
        let n_parts = rows * heads * parts;
        let part_m = dev.alloc_zeros::<f32>(n_parts)?;
        let part_l = dev.alloc_zeros::<f32>(n_parts)?;
        let part_acc = dev.alloc_zeros::<f32>(n_parts * hd)?;
        let partial = func(&dev, ptx::ATTENTION, "attention", &kname("attention_partial", q.dtype()))?;
        let combine = func(&dev, ptx::ATTENTION, "attention", &kname("attention_combine", q.dtype()))?;
        let (h_i, kvh_i, hd_i, bs_i, parts_i) = (heads as i32, sh.num_kv_heads as i32, hd as i32, sh.block_size as i32, parts as i32);
        let window = sh.sliding_window.map_or(0, |w| w as i32);
        let (scale, softcap) = (sh.scale, sh.softcap.unwrap_or(0.0));
        let slice = with_float!(q.dtype(), T => {
            let qs = contiguous(q.as_cuda_slice::<T>()?, ql, "queries")?;
            let kc = contiguous(k.as_cuda_slice::<T>()?, kl, "key cache")?;
            let vc = contiguous(v.as_cuda_slice::<T>()?, vl, "value cache")?;
            let mut b = partial.builder();
            b.arg(&qs).arg(&kc).arg(&vc).arg(&tables).arg(&row_table).arg(&row_len);
            b.arg(&part_m).arg(&part_l).arg(&part_acc);
            b.arg(&h_i).arg(&kvh_i).arg(&hd_i).arg(&bs_i).arg(&scale).arg(&softcap).arg(&window).arg(&parts_i);
            let no_direct_out = 0u64; // null `o`: always through the combine pass here
            b.arg(&no_direct_out);
            let cfg = LaunchConfig { grid_dim: (rows as u32, heads as u32, parts as u32), block_dim: (128, 1, 1), shared_mem_bytes: 0 };
            // SAFETY: argument types match the kernel's signature; the tables index the caches.
            unsafe { b.launch(cfg) }.w()?;
            // SAFETY: every element is written by the combine kernel.
            let out = unsafe { dev.alloc::<T>(rows * heads * hd)? };
            let mut b = combine.builder();
            b.arg(&part_m).arg(&part_l).arg(&part_acc).arg(&out).arg(&h_i).arg(&hd_i).arg(&parts_i);
            let block = (hd.next_multiple_of(32)) as u32;
            let cfg = LaunchConfig { grid_dim: (rows as u32, heads as u32, 1), block_dim: (block, 1, 1), shared_mem_bytes: 0 };
            // SAFETY: as above.
            unsafe { b.launch(cfg) }.w()?;
            CudaStorage::wrap_cuda_slice(out, dev.clone())
        });
        Ok((slice, ql.shape().clone()))
    }
}

/// Causal attention of `q = [rows, num_heads, head_dim]` over the paged caches (which already hold
/// the new rows' keys and values, see [`write_cache`]); returns `[rows, num_heads, head_dim]`.
pub fn paged_attention(
    q: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    meta: &AttentionMeta,
    shape: &crate::AttentionShape,
) -> Result<Tensor> {
    q.contiguous()?.apply_op3_no_bwd(k_cache, v_cache, &PagedAttention { meta: meta.clone(), shape: *shape })
}

// ---------------------------------------------------------------------------------------------
// Quantized GEMV

/// Most tokens one GEMV call handles (the kernel's `MAX_M`).
pub const GEMV_MAX_M: usize = 8;

struct QGemv {
    qtype: crate::QType,
    rows: usize,
    cols: usize,
}

impl CustomOp2 for QGemv {
    fn name(&self) -> &'static str {
        "infer-qgemv"
    }
    cuda_only_cpu_fwd!(2);
    fn cuda_fwd(&self, x: &CudaStorage, xl: &Layout, w: &CudaStorage, wl: &Layout) -> Result<(CudaStorage, Shape)> {
        let dev = x.device().clone();
        let (m, cols) = xl.shape().dims2()?;
        let (rows, qt) = (self.rows, self.qtype);
        let kernel = match qt {
            crate::QType::Q8_0 => "gemv_q8_0",
            crate::QType::Q4_0 => "gemv_q4_0",
            other => bail!("CUDA GEMV: {other:?} weights are not supported yet (Q8_0, Q4_0)"),
        };
        if cols != self.cols || cols % 32 != 0 || m > GEMV_MAX_M || wl.shape().elem_count() != rows * cols / 32 * qt.block_bytes() {
            bail!(
                "qgemv: x {:?} against a {qt:?} weight [{rows}, {}] ({} bytes), at most {GEMV_MAX_M} tokens",
                xl.shape(),
                self.cols,
                wl.shape().elem_count()
            )
        }
        let blocks = m * cols / 32;
        let xq = dev.alloc_zeros::<i8>(m * cols)?;
        let xd = dev.alloc_zeros::<f32>(blocks)?;
        let xs = dev.alloc_zeros::<f32>(blocks)?;
        let quant = func(&dev, ptx::QMATMUL, "qmatmul", &kname("quantize_q8", x.dtype()))?;
        let gemv = func(&dev, ptx::QMATMUL, "qmatmul", &kname(kernel, x.dtype()))?;
        let ws = match &w.slice {
            CudaStorageSlice::U8(s) => contiguous(s, wl, "quantized weight")?,
            _ => bail!("qgemv: the weight must be raw GGUF bytes (u8)"),
        };
        let slice = with_float!(x.dtype(), T => {
            let xv = contiguous(x.as_cuda_slice::<T>()?, xl, "activations")?;
            let mut b = quant.builder();
            let nblocks = blocks;
            b.arg(&xv).arg(&xq).arg(&xd).arg(&xs).arg(&nblocks);
            // SAFETY: argument types match the kernel's signature (size_t count).
            unsafe { b.launch(grid_for(blocks * 32, 256)) }.w()?;
            // SAFETY: every element is written by the GEMV kernel.
            let out = unsafe { dev.alloc::<T>(m * rows)? };
            let mut b = gemv.builder();
            let (r_i, c_i, m_i) = (rows as i32, cols as i32, m as i32);
            b.arg(&ws).arg(&xq).arg(&xd).arg(&xs).arg(&out).arg(&r_i).arg(&c_i).arg(&m_i);
            let cfg = LaunchConfig { grid_dim: (rows.div_ceil(4) as u32, 1, 1), block_dim: (128, 1, 1), shared_mem_bytes: 0 };
            // SAFETY: as above.
            unsafe { b.launch(cfg) }.w()?;
            CudaStorage::wrap_cuda_slice(out, dev.clone())
        });
        Ok((slice, Shape::from((m, rows))))
    }
}

/// `x [m ≤ 8, cols] · Wᵀ` for a GGUF-block weight `[rows, cols]` kept as its raw bytes (a u8 tensor
/// on the device): Q8_0 or Q4_0.
pub fn qgemv(x: &Tensor, w_bytes: &Tensor, qtype: crate::QType, rows: usize, cols: usize) -> Result<Tensor> {
    x.contiguous()?.apply_op2_no_bwd(w_bytes, &QGemv { qtype, rows, cols })
}

/// `(free, total)` bytes of memory on a CUDA device.
pub fn memory_info(device: &candle_core::Device) -> Result<(usize, usize)> {
    match device {
        candle_core::Device::Cuda(d) => d.cuda_stream().context().mem_get_info().w(),
        other => bail!("memory_info: {other:?} is not a CUDA device"),
    }
}
