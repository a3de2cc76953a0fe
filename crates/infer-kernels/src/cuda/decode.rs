//! Launchers for the decode path's kernels (`kernels/decode.cu`, plus the paged attention of
//! `kernels/attention.cu`) on raw device addresses: no tensor is created and nothing is allocated
//! per launch, so a whole decode step costs one launch per kernel (candle's ops allocate their
//! output, and its matmul goes through cuBLAS, several host microseconds each; at 16-32 layers of
//! ~15 ops that host time, not the GPU, set the speed of a small model).
//!
//! The caller (infer-core's CUDA step) owns every buffer: weights and caches as candle tensors
//! ([`tensor_ptr`]), scratch as [`DeviceBuf`]s, and passes their addresses. The launchers are
//! `unsafe`: they check the shapes they are given against each other, not that the addresses hold
//! buffers of those shapes.

use std::sync::Arc;

use candle_core::cuda_backend::cudarc::driver::{result as cu, sys, CudaGraph, CudaSlice, CudaStream, DevicePtr};
use candle_core::cuda_backend::{CudaStorageSlice, WrapErr};
use candle_core::{bail, DType, Result, Tensor};

use super::{cuda_storage, func, kname, ptx, Kernel};
use crate::AttentionShape;

/// Most token rows one step handles (the GEMV kernels' largest `M`).
pub const MAX_ROWS: usize = 8;
/// Most token rows of the kernels with the RMSNorm folded in (`*_norm`).
pub const NORM_ROWS: usize = 2;
/// Warps per GEMV thread block (the kernel's `GEMV_WARPS`).
const GEMV_WARPS: usize = 4;
/// Keys per attention partition: attention.cu's kernel (`PART`), and decode.cu's (chosen here).
const PART: usize = 256;
const DECODE_PART: usize = 128;
/// Query heads per KV head decode.cu's attention serves in one block (its `ATT_MAX_G`).
const DECODE_MAX_GROUP: usize = 8;
/// Keys up to which attention.cu's kernel is the quicker one (see `grouped_attention`).
const SHORT_CONTEXT: usize = 128;

/// A device address (of a buffer the caller keeps alive while the kernels that read it run).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DevPtr(pub u64);

impl DevPtr {
    /// The kernels' "absent" (bias, norm weight, row list).
    pub const NULL: DevPtr = DevPtr(0);
    /// `bytes` further on.
    pub fn offset(self, bytes: usize) -> DevPtr {
        DevPtr(self.0 + bytes as u64)
    }
}

/// The address of the first element of a contiguous tensor on a CUDA device.
pub fn tensor_ptr(t: &Tensor) -> Result<DevPtr> {
    let (storage, layout) = t.storage_and_layout();
    let c = cuda_storage(&storage, "a decode-step tensor")?;
    let Some((start, _)) = layout.contiguous_offsets() else { bail!("a decode-step tensor must be contiguous") };
    let stream = c.device.cuda_stream();
    fn base<T>(s: &CudaSlice<T>, stream: &Arc<CudaStream>) -> u64 {
        s.device_ptr(stream).0
    }
    let addr = match &c.slice {
        CudaStorageSlice::U8(s) => base(s, &stream),
        CudaStorageSlice::U32(s) => base(s, &stream),
        CudaStorageSlice::BF16(s) => base(s, &stream),
        CudaStorageSlice::F16(s) => base(s, &stream),
        CudaStorageSlice::F32(s) => base(s, &stream),
        _ => bail!("a decode-step tensor must be u8, u32, f16, bf16 or f32, not {:?}", t.dtype()),
    };
    Ok(DevPtr(addr + (start * t.dtype().size_in_bytes()) as u64))
}

/// A scratch buffer on the device, zeroed when made.
pub struct DeviceBuf {
    slice: CudaSlice<u8>,
    stream: Arc<CudaStream>,
}

impl DeviceBuf {
    pub fn new(device: &candle_core::Device, bytes: usize) -> Result<Self> {
        let candle_core::Device::Cuda(dev) = device else { bail!("DeviceBuf: {device:?} is not a CUDA device") };
        let stream = dev.cuda_stream();
        Ok(Self { slice: stream.alloc_zeros::<u8>(bytes.max(1)).w()?, stream })
    }

    pub fn ptr(&self) -> DevPtr {
        DevPtr(self.slice.device_ptr(&self.stream).0)
    }

    pub fn bytes(&self) -> usize {
        self.slice.len()
    }

    /// Copies `data` to the start of the buffer (ordered after the work already on the stream).
    pub fn upload_u32(&mut self, data: &[u32]) -> Result<()> {
        let bytes = std::mem::size_of_val(data);
        if bytes > self.slice.len() {
            bail!("DeviceBuf::upload_u32: {bytes} bytes into a buffer of {}", self.slice.len())
        }
        // SAFETY: u32 has no padding; the view covers exactly the bytes of `data`.
        let src = unsafe { std::slice::from_raw_parts(data.as_ptr().cast::<u8>(), bytes) };
        self.stream.memcpy_htod(src, &mut self.slice.slice_mut(..bytes)).w()
    }

    /// Copies the first `out.len()` f32 values of the buffer into `out`, once the stream's work is done.
    pub fn download_f32(&self, out: &mut [f32]) -> Result<()> {
        let bytes = std::mem::size_of_val(out);
        if bytes > self.slice.len() {
            bail!("DeviceBuf::download_f32: {bytes} bytes from a buffer of {}", self.slice.len())
        }
        // SAFETY: every bit pattern is a valid f32; the view covers exactly the bytes of `out`.
        let dst = unsafe { std::slice::from_raw_parts_mut(out.as_mut_ptr().cast::<u8>(), bytes) };
        self.stream.memcpy_dtoh(&self.slice.slice(..bytes), dst).w()?;
        self.stream.synchronize().w()
    }
}

/// A captured sequence of launches (a CUDA graph), replayed with one call: a decode step's ~80-250
/// kernels cost one host launch and run without gaps between them.
pub struct StepGraph(CudaGraph);

// SAFETY: a CUDA graph may be used from any thread as long as calls on it are serialized (CUDA's
// graph thread-safety rules); the owner keeps it behind a mutex.
unsafe impl Send for StepGraph {}

impl StepGraph {
    /// Captures the launches `f` makes on the device's stream (nothing runs until
    /// [`launch`](Self::launch)); `f` must only launch kernels (no copies, allocations or syncs).
    pub fn capture<E: From<candle_core::Error>>(
        device: &candle_core::Device,
        f: impl FnOnce() -> std::result::Result<(), E>,
    ) -> std::result::Result<Self, E> {
        let candle_core::Device::Cuda(dev) = device else {
            return Err(candle_core::Error::Msg(format!("StepGraph: {device:?} is not a CUDA device")).into());
        };
        let stream = dev.cuda_stream();
        stream.begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED).w()?;
        let launched = f();
        // The capture always ends, whatever `f` did, so the stream leaves capture mode.
        let graph = stream.end_capture(sys::CUgraphInstantiate_flags(0));
        launched?;
        match graph.w()? {
            Some(g) => Ok(Self(g)),
            None => Err(candle_core::Error::Msg("StepGraph: the capture made no graph".into()).into()),
        }
    }

    /// Runs the captured launches on the stream they were captured on.
    pub fn launch(&self) -> Result<()> {
        self.0.launch().w()
    }
}

/// One block of rows of a (possibly stacked) GEMV weight: `rows` rows of `k` values of the step's
/// dtype, row-major, and an optional bias of `rows` values.
#[derive(Debug, Clone, Copy)]
pub struct Segment {
    pub weight: DevPtr,
    pub bias: DevPtr,
    pub rows: usize,
}

/// Up to three segments as the kernels take them (absent ones empty), and their total rows.
fn stacked(segs: &[Segment]) -> ([Segment; 3], usize) {
    let seg = |i: usize| segs.get(i).copied().unwrap_or(Segment { weight: DevPtr::NULL, bias: DevPtr::NULL, rows: 0 });
    let s = [seg(0), seg(1), seg(2)];
    (s, s.iter().map(|x| x.rows).sum())
}

/// Where a step's attention reads and writes.
#[derive(Debug, Clone, Copy)]
pub struct AttentionArgs {
    /// Queries `[rows, num_heads, head_dim]`.
    pub q: DevPtr,
    /// The layer's caches, `[slots, num_kv_heads, head_dim]` each.
    pub k_cache: DevPtr,
    pub v_cache: DevPtr,
    /// u32: all sequences' block tables, each row's table start, each row's key count.
    pub tables: DevPtr,
    pub row_table: DevPtr,
    pub row_len: DevPtr,
    /// f32 scratch of [`DecodeKernels::attention_scratch`] values.
    pub scratch: DevPtr,
    /// Output `[rows, num_heads, head_dim]`.
    pub out: DevPtr,
    pub rows: usize,
    /// The largest row_len.
    pub max_len: usize,
}

/// The decode kernels of one device and dtype, loaded once.
pub struct DecodeKernels {
    dtype: DType,
    gemv: [Kernel; 4],
    glu: [Kernel; 4],
    gemv_norm: [Kernel; 2],
    glu_norm: [Kernel; 2],
    qkv_rope_norm: [Kernel; 2],
    embed: Kernel,
    rmsnorm: Kernel,
    rope_qkv: Kernel,
    partial: Kernel,
    combine: Kernel,
    att_decode: Kernel,
    /// Programmatic dependent launches (asked for, and compute capability 9.0+).
    pdl: bool,
}

/// One launch's arguments (device addresses, i32, f32), each in an 8-byte slot the driver reads
/// its parameter's size from (little-endian: an i32 or f32 sits in the slot's first 4 bytes).
struct Args(Vec<u64>);

impl Args {
    fn new() -> Self {
        Self(Vec::with_capacity(24))
    }
    fn p(&mut self, v: DevPtr) -> &mut Self {
        self.0.push(v.0);
        self
    }
    fn i(&mut self, v: usize) -> &mut Self {
        self.0.push(v as i32 as u32 as u64);
        self
    }
    fn f(&mut self, v: f32) -> &mut Self {
        self.0.push(v.to_bits() as u64);
        self
    }
}

impl DecodeKernels {
    /// Launches `k` on a `grid` of `block`-thread blocks with `args` (which must match its
    /// signature). With `pdl` (if these kernels were made with it, on a Hopper GPU) it is a programmatic
    /// dependent launch: the kernel may start while the previous one finishes, running up to its
    /// `griddepcontrol.wait` (its weight loads) early; kernels/decode.cu's kernels wait before they
    /// touch anything an earlier kernel writes, and each calls the wait on every path, so the order of
    /// their effects is the stream's.
    unsafe fn run(&self, k: &Kernel, grid: (u32, u32, u32), block: u32, args: &mut Args, pdl: bool) -> Result<()> {
        let mut params: Vec<*mut std::ffi::c_void> = args.0.iter_mut().map(|a| (a as *mut u64).cast()).collect();
        let stream = &k.stream;
        stream.context().bind_to_thread().w()?;
        if !(pdl && self.pdl) {
            return unsafe { cu::launch_kernel(k.func.cu_function(), grid, (block, 1, 1), 0, stream.cu_stream(), &mut params) }.w();
        }
        // SAFETY: a zeroed attribute is a valid value of the C struct; id and value set below.
        let mut attr: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
        attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
        attr.value.programmaticStreamSerializationAllowed = 1;
        let config = sys::CUlaunchConfig {
            gridDimX: grid.0,
            gridDimY: grid.1,
            gridDimZ: grid.2,
            blockDimX: block,
            blockDimY: 1,
            blockDimZ: 1,
            sharedMemBytes: 0,
            hStream: stream.cu_stream(),
            attrs: &mut attr,
            numAttrs: 1,
        };
        unsafe { sys::cuLaunchKernelEx(&config, k.func.cu_function(), params.as_mut_ptr(), std::ptr::null_mut()) }.result().w()
    }
}

/// Warps per output row for a GEMV of `n` rows: enough to keep about 8192 warps in flight (2-4 warps
/// share the K of each row of a matrix with few rows; 1 from 8192 rows on).
fn split_for(n: usize) -> usize {
    match 8192usize.div_ceil(n.max(1)) {
        0..=1 => 1,
        2..=3 => 2,
        _ => 4,
    }
}

/// Thread blocks for `n` rows at `split` warps per row.
fn gemv_grid(n: usize, split: usize) -> (u32, u32, u32) {
    (n.div_ceil(GEMV_WARPS / split) as u32, 1, 1)
}

/// Warps per gate (and per up) row of a GLU of `n` rows (1 or 2: a block holds both rows of an output).
fn glu_split(n: usize) -> usize {
    split_for(n).min(2)
}

/// Index of the GEMV variant for `m` rows (M = 1, 2, 4, 8).
fn variant(m: usize) -> Result<usize> {
    Ok(match m {
        1 => 0,
        2 => 1,
        3..=4 => 2,
        5..=MAX_ROWS => 3,
        _ => bail!("decode GEMV: {m} rows (1 to {MAX_ROWS})"),
    })
}

impl DecodeKernels {
    /// Loads the kernels for `dtype` (f32, f16 or bf16) on a CUDA `device`; `pdl`: programmatic
    /// dependent launches where the GPU has them (compute capability 9.0+).
    pub fn new(device: &candle_core::Device, dtype: DType, pdl: bool) -> Result<Self> {
        let candle_core::Device::Cuda(dev) = device else { bail!("DecodeKernels: {device:?} is not a CUDA device") };
        if !matches!(dtype, DType::F32 | DType::F16 | DType::BF16) {
            bail!("DecodeKernels: {dtype:?} (f32, f16 or bf16)")
        }
        let d = |name: &str| func(dev, ptx::DECODE, "decode", &kname(name, dtype));
        let a = |name: &str| func(dev, ptx::ATTENTION, "attention", &kname(name, dtype));
        Ok(Self {
            dtype,
            gemv: [d("gemv_m1")?, d("gemv_m2")?, d("gemv_m4")?, d("gemv_m8")?],
            glu: [d("glu_m1")?, d("glu_m2")?, d("glu_m4")?, d("glu_m8")?],
            gemv_norm: [d("gemv_norm_m1")?, d("gemv_norm_m2")?],
            glu_norm: [d("glu_norm_m1")?, d("glu_norm_m2")?],
            qkv_rope_norm: [d("qkv_rope_norm_m1")?, d("qkv_rope_norm_m2")?],
            embed: d("embed")?,
            rmsnorm: d("rmsnorm_in")?,
            rope_qkv: d("rope_qkv")?,
            partial: a("attention_partial")?,
            combine: a("attention_combine")?,
            att_decode: d("attention_decode")?,
            pdl: pdl && dev.cuda_stream().context().compute_capability().w()?.0 >= 9,
        })
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Whether a GEMV over rows of `k` values can use these kernels (16-byte loads).
    pub fn gemv_fits(k: usize) -> bool {
        k > 0 && k.is_multiple_of(8)
    }

    /// `x[r] = table[ids[r]]` in f32, `rows` rows of `n`.
    ///
    /// # Safety
    /// `table` holds the ids' rows (T), `ids` `rows` u32 (each checked against the table's rows by
    /// the caller), `x` `rows · n` f32.
    pub unsafe fn embed(&self, table: DevPtr, ids: DevPtr, x: DevPtr, rows: usize, n: usize) -> Result<()> {
        let mut a = Args::new();
        a.p(table).p(ids).p(x).i(n);
        unsafe { self.run(&self.embed, (rows as u32, 1, 1), 256, &mut a, true) }
    }

    /// `y[r] = rmsnorm(x[row_list ? row_list[r] : r]) · w` (x f32, w and y T), `rows` rows of `n`.
    ///
    /// # Safety
    /// `x` holds every listed row (f32), `row_list` is NULL or `rows` u32, `w` `n` values, `y`
    /// `rows · n` values.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn rmsnorm(&self, x: DevPtr, row_list: DevPtr, w: DevPtr, y: DevPtr, rows: usize, n: usize, eps: f32) -> Result<()> {
        let mut a = Args::new();
        a.p(x).p(row_list).p(w).p(y).i(n).f(eps);
        let block = n.next_multiple_of(32).clamp(32, 1024) as u32;
        unsafe { self.run(&self.rmsnorm, (rows as u32, 1, 1), block, &mut a, true) }
    }

    /// `out[i] (=|+=) x[i] · [W0; W1; W2]ᵀ (+ bias)` for `m` rows of `k` values: `out` is f32
    /// `[m, Σ rows]`, stored (`add` false) or added to (the residual stream).
    ///
    /// # Safety
    /// The segments' weights hold `rows · k` values (T) at 16-byte aligned addresses, their biases
    /// (unless NULL) `rows`; `x` `m · k` values (T, 16-byte aligned); `out` `m · Σ rows` f32.
    pub unsafe fn gemv(&self, segs: &[Segment], k: usize, x: DevPtr, m: usize, out: DevPtr, add: bool) -> Result<()> {
        if segs.is_empty() || segs.len() > 3 || !Self::gemv_fits(k) {
            bail!("decode GEMV: {} segments of rows of {k} (1-3 segments, k a multiple of 8)", segs.len())
        }
        let ([s0, s1, s2], n) = stacked(segs);
        let split = split_for(n);
        let mut a = Args::new();
        a.p(s0.weight).p(s1.weight).p(s2.weight).p(s0.bias).p(s1.bias).p(s2.bias);
        a.i(s0.rows).i(s1.rows).i(n).i(k).p(x).i(m).p(out).i(add as usize).i(split);
        unsafe { self.run(&self.gemv[variant(m)?], gemv_grid(n, split), (GEMV_WARPS * 32) as u32, &mut a, true) }
    }

    /// `act[i] = silu(x[i] · Wgᵀ) · (x[i] · Wuᵀ)` (T, `[m, n]`) for gate and up weights `[n, k]`.
    ///
    /// # Safety
    /// `wg`, `wu` hold `n · k` values (T, 16-byte aligned), `x` `m · k`, `act` `m · n`.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn glu(&self, wg: DevPtr, wu: DevPtr, n: usize, k: usize, x: DevPtr, m: usize, act: DevPtr) -> Result<()> {
        if !Self::gemv_fits(k) {
            bail!("decode GLU: rows of {k} (a multiple of 8)")
        }
        let split = glu_split(n);
        let mut a = Args::new();
        a.p(wg).p(wu).i(n).i(k).p(x).i(m).p(act).i(split);
        unsafe { self.run(&self.glu[variant(m)?], gemv_grid(n, 2 * split), (GEMV_WARPS * 32) as u32, &mut a, true) }
    }

    /// [`gemv`](Self::gemv) of `rmsnorm(x) · gain` for `m ≤ NORM_ROWS` rows of the f32 residual
    /// `x` (`[m, k]`): the norm folded into the dot products.
    ///
    /// # Safety
    /// As for [`gemv`](Self::gemv), with `x` `m · k` f32 and `gain` `k` values (T).
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn gemv_norm(
        &self,
        segs: &[Segment],
        k: usize,
        x: DevPtr,
        gain: DevPtr,
        eps: f32,
        m: usize,
        out: DevPtr,
        add: bool,
    ) -> Result<()> {
        if segs.is_empty() || segs.len() > 3 || !Self::gemv_fits(k) || !(1..=NORM_ROWS).contains(&m) {
            bail!(
                "decode GEMV+norm: {} segments of rows of {k}, {m} rows (1-3 segments, k a multiple of 8, 1-{NORM_ROWS} rows)",
                segs.len()
            )
        }
        let ([s0, s1, s2], n) = stacked(segs);
        let split = split_for(n);
        let mut a = Args::new();
        a.p(s0.weight).p(s1.weight).p(s2.weight).p(s0.bias).p(s1.bias).p(s2.bias);
        a.i(s0.rows).i(s1.rows).i(n).i(k).p(x).p(gain).f(eps).i(m).p(out).i(add as usize).i(split);
        unsafe { self.run(&self.gemv_norm[m - 1], gemv_grid(n, split), (GEMV_WARPS * 32) as u32, &mut a, true) }
    }

    /// [`glu`](Self::glu) of `rmsnorm(x) · gain` for `m ≤ NORM_ROWS` rows of the f32 residual `x`.
    ///
    /// # Safety
    /// As for [`glu`](Self::glu), with `x` `m · k` f32 and `gain` `k` values (T).
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn glu_norm(
        &self,
        wg: DevPtr,
        wu: DevPtr,
        n: usize,
        k: usize,
        x: DevPtr,
        gain: DevPtr,
        eps: f32,
        m: usize,
        act: DevPtr,
    ) -> Result<()> {
        if !Self::gemv_fits(k) || !(1..=NORM_ROWS).contains(&m) {
            bail!("decode GLU+norm: rows of {k} (a multiple of 8), {m} rows (1-{NORM_ROWS})")
        }
        let split = glu_split(n);
        let mut a = Args::new();
        a.p(wg).p(wu).i(n).i(k).p(x).p(gain).f(eps).i(m).p(act).i(split);
        unsafe { self.run(&self.glu_norm[m - 1], gemv_grid(n, 2 * split), (GEMV_WARPS * 32) as u32, &mut a, true) }
    }

    /// The q|k|v projection of `rmsnorm(x) · gain` (`m ≤ NORM_ROWS` rows of the f32 residual) with
    /// RoPE and the cache write in one launch (models without a per-head q/k norm): q into `q_out`
    /// (`[m, nh, hd]`), k and v into the caches at `slots`. `segs`: q, k, v, or one fused `[q; k; v]`.
    ///
    /// # Safety
    /// As for [`gemv_norm`](Self::gemv_norm) and [`rope_qkv`](Self::rope_qkv).
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn qkv_rope_norm(
        &self,
        segs: &[Segment],
        k: usize,
        (x, gain, eps): (DevPtr, DevPtr, f32),
        m: usize,
        (positions, slots, inv_freq): (DevPtr, DevPtr, DevPtr),
        (q_out, k_cache, v_cache): (DevPtr, DevPtr, DevPtr),
        (nh, nkv, hd): (usize, usize, usize),
        rot: usize,
        interleaved: bool,
    ) -> Result<()> {
        let (nq, nk) = (nh * hd, nkv * hd);
        let es = self.dtype.size_in_bytes();
        let [q, kk, v] = match *segs {
            [q, kk, v] if q.rows == nq && kk.rows == nk && v.rows == nk => [q, kk, v],
            [f] if f.rows == nq + 2 * nk => {
                let at = |p: DevPtr, rows: usize, per: usize| if p == DevPtr::NULL { p } else { p.offset(rows * per * es) };
                [
                    Segment { weight: f.weight, bias: f.bias, rows: nq },
                    Segment { weight: at(f.weight, nq, k), bias: at(f.bias, nq, 1), rows: nk },
                    Segment { weight: at(f.weight, nq + nk, k), bias: at(f.bias, nq + nk, 1), rows: nk },
                ]
            }
            _ => bail!("decode q|k|v+RoPE: segments do not match {nh} + 2·{nkv} heads of {hd}"),
        };
        if !Self::gemv_fits(k) || !(1..=NORM_ROWS).contains(&m) || !hd.is_multiple_of(2) || hd > 256 || rot > hd || !rot.is_multiple_of(2) {
            bail!("decode q|k|v+RoPE: rows of {k}, {m} rows, head_dim {hd}, rotary dims {rot}")
        }
        let mut a = Args::new();
        a.p(q.weight).p(kk.weight).p(v.weight).p(q.bias).p(kk.bias).p(v.bias);
        a.i(k).p(x).p(gain).f(eps).i(m).p(positions).p(slots).p(inv_freq);
        a.p(q_out).p(k_cache).p(v_cache).i(nh).i(nkv).i(hd).i(rot).i(interleaved as usize);
        let blocks = ((nh + 2 * nkv) * hd / 2) as u32;
        unsafe { self.run(&self.qkv_rope_norm[m - 1], (blocks, 1, 1), (GEMV_WARPS * 32) as u32, &mut a, true) }
    }

    /// From the f32 `qkv` rows (`[m, (nh + 2·nkv)·hd]`): per-head RMSNorm of q and k when their
    /// weights are given, RoPE of q and k (`rot` dimensions, `inv_freq` f32 `[rot/2]`, positions u32),
    /// q into `q_out` (`[m, nh, hd]`, T), k and v into the caches at `slots` (u32).
    ///
    /// # Safety
    /// Every address holds what the shapes above say; the slots are inside the caches.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn rope_qkv(
        &self,
        qkv: DevPtr,
        positions: DevPtr,
        slots: DevPtr,
        inv_freq: DevPtr,
        qk_norm: Option<(DevPtr, DevPtr, f32)>,
        q_out: DevPtr,
        k_cache: DevPtr,
        v_cache: DevPtr,
        m: usize,
        (nh, nkv, hd): (usize, usize, usize),
        rot: usize,
        interleaved: bool,
    ) -> Result<()> {
        if hd == 0 || hd > 256 || rot > hd || !rot.is_multiple_of(2) {
            bail!("decode RoPE: head_dim {hd} (≤ 256), rotary dims {rot} (even, ≤ head_dim)")
        }
        let (qn, kn, eps) = qk_norm.unwrap_or((DevPtr::NULL, DevPtr::NULL, 0.0));
        let mut a = Args::new();
        a.p(qkv).p(positions).p(slots).p(inv_freq).p(qn).p(kn).f(eps);
        a.p(q_out).p(k_cache).p(v_cache).i(nh).i(nkv).i(hd).i(rot).i(interleaved as usize);
        let block = hd.next_multiple_of(32) as u32;
        unsafe { self.run(&self.rope_qkv, (m as u32, (nh + 2 * nkv) as u32, 1), block, &mut a, true) }
    }

    /// Whether decode.cu's attention (one block per KV head serving its whole group of query heads)
    /// takes this step; else attention.cu's (one block per query head, one key per warp step). The
    /// grouped kernel pays a fixed cost (10 µs a layer at a handful of keys on an H200, against 4),
    /// the other about 1 µs per 16 keys: at up to SHORT_CONTEXT keys attention.cu's is quicker (1B
    /// shape, contexts 1-128: 799 against 763 t/s), past it the grouped one (depth 1024: 677 against
    /// 459 t/s).
    fn grouped_attention(sh: &AttentionShape, max_len: usize) -> bool {
        max_len > SHORT_CONTEXT
            && sh.num_kv_heads > 0
            && sh.num_heads.is_multiple_of(sh.num_kv_heads)
            && sh.num_heads / sh.num_kv_heads <= DECODE_MAX_GROUP
            && sh.head_dim.is_multiple_of(32)
            && sh.head_dim <= 256
    }

    /// Key partitions of a step whose longest row sees `max_len` keys (the attention grid's depth).
    pub fn attention_parts(sh: &AttentionShape, max_len: usize) -> usize {
        max_len.div_ceil(if Self::grouped_attention(sh, max_len) { DECODE_PART } else { PART }).max(1)
    }

    /// f32 values of attention scratch a step of `rows` rows with keys up to `max_len` needs.
    pub fn attention_scratch(rows: usize, shape: &AttentionShape, max_len: usize) -> usize {
        let parts = Self::attention_parts(shape, max_len);
        if parts == 1 {
            return 0;
        }
        rows * shape.num_heads * parts * (shape.head_dim + 2)
    }

    /// Causal paged attention of the step's rows (the caches already hold their keys and values):
    /// one pass when every row's keys fit one partition, else partial passes and a combine.
    ///
    /// # Safety
    /// See [`AttentionArgs`]; `scratch` holds [`attention_scratch`](Self::attention_scratch) f32.
    pub unsafe fn attention(&self, a: &AttentionArgs, sh: &AttentionShape) -> Result<()> {
        let (heads, hd) = (sh.num_heads, sh.head_dim);
        if hd > 256 || sh.num_kv_heads == 0 || !heads.is_multiple_of(sh.num_kv_heads) {
            bail!("decode attention: {heads} heads of {hd} (≤ 256) over {} KV heads", sh.num_kv_heads)
        }
        let parts = Self::attention_parts(sh, a.max_len);
        let n_parts = a.rows * heads * parts;
        let (part_m, part_l, part_acc) = (a.scratch, a.scratch.offset(4 * n_parts), a.scratch.offset(8 * n_parts));
        let direct = if parts == 1 { a.out } else { DevPtr::NULL };
        let window = sh.sliding_window.unwrap_or(0);
        let (scale, softcap) = (sh.scale, sh.softcap.unwrap_or(0.0));
        let mut args = Args::new();
        args.p(a.q).p(a.k_cache).p(a.v_cache).p(a.tables).p(a.row_table).p(a.row_len).p(part_m).p(part_l).p(part_acc);
        if Self::grouped_attention(sh, a.max_len) {
            // decode.cu's kernel waits for the kernel before it (programmatic launch).
            args.p(direct).i(heads).i(sh.num_kv_heads).i(hd).i(sh.block_size).f(scale).f(softcap).i(window).i(parts).i(DECODE_PART);
            unsafe { self.run(&self.att_decode, (a.rows as u32, sh.num_kv_heads as u32, parts as u32), 128, &mut args, true) }?;
        } else {
            // attention.cu's kernels know nothing of programmatic launches: plain stream order.
            args.i(heads).i(sh.num_kv_heads).i(hd).i(sh.block_size).f(scale).f(softcap).i(window).i(parts).p(direct);
            unsafe { self.run(&self.partial, (a.rows as u32, heads as u32, parts as u32), 128, &mut args, false) }?;
        }
        if parts > 1 {
            let mut args = Args::new();
            args.p(part_m).p(part_l).p(part_acc).p(a.out).i(heads).i(hd).i(parts);
            unsafe { self.run(&self.combine, (a.rows as u32, heads as u32, 1), hd.next_multiple_of(32) as u32, &mut args, false) }?;
        }
        Ok(())
    }
}
