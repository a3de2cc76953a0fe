//! The paged KV cache: keys and values live in fixed-size blocks; each sequence owns a block table
//! (the list of its blocks, in order); an allocator hands out blocks within a memory budget and
//! refuses cleanly when none are left.

use candle_core::{DType, Device, Tensor};
use infer_kernels::AttentionShape;

use crate::config::ModelConfig;
use crate::error::{Error, Result};

/// Tokens per block unless configured otherwise.
pub const DEFAULT_BLOCK_SIZE: usize = 16;

/// Content hash of a full block: it covers the block's tokens and, through `parent`, every token
/// before them, so equal hashes mean equal keys and values.
pub type BlockHash = u128;

/// Hashes one full block of tokens following the block whose hash is `parent` (`0` for the first).
pub fn block_hash(parent: BlockHash, tokens: &[u32]) -> BlockHash {
    use std::hash::{DefaultHasher, Hash, Hasher};
    // Two independent 64-bit SipHashes: collisions are out of reach in practice.
    let half = |salt: u8| {
        let mut h = DefaultHasher::new();
        salt.hash(&mut h);
        parent.hash(&mut h);
        tokens.hash(&mut h);
        h.finish()
    };
    ((half(1) as u128) << 64) | half(2) as u128
}

/// The root a salted sequence's block hashes start from instead of `0` (see
/// [`SamplingParams::cache_salt`](crate::SamplingParams)).
pub fn salt_root(salt: &str) -> BlockHash {
    let words: Vec<u32> = salt.bytes().map(u32::from).collect();
    block_hash(u128::MAX, &words)
}

#[derive(Debug, Clone, Default)]
struct BlockMeta {
    refs: u32,
    hash: Option<BlockHash>,
    /// When it became evictable (for LRU order).
    released_at: u64,
}

/// Hands out block ids from a fixed pool. Blocks are reference-counted; a full block may carry its
/// content hash, and when its last user releases it, it stays cached (reusable by a later request
/// with the same prefix) until the space is needed, evicted least recently used first.
#[derive(Debug, Clone)]
pub struct BlockAllocator {
    free: Vec<u32>,
    meta: Vec<BlockMeta>,
    /// Cached blocks no sequence uses, by release time: the eviction order.
    evictable: std::collections::BTreeSet<(u64, u32)>,
    by_hash: std::collections::HashMap<BlockHash, u32>,
    clock: u64,
    total: usize,
}

impl BlockAllocator {
    pub fn new(total: usize) -> Self {
        // Lowest ids are handed out first.
        Self {
            free: (0..total as u32).rev().collect(),
            meta: vec![BlockMeta::default(); total],
            evictable: Default::default(),
            by_hash: Default::default(),
            clock: 0,
            total,
        }
    }

    /// Blocks that can be handed out: never used, or cached but unused (evicted on demand).
    pub fn num_free(&self) -> usize {
        self.free.len() + self.evictable.len()
    }

    /// Unused blocks that still hold a cached prefix.
    pub fn num_cached(&self) -> usize {
        self.evictable.len()
    }

    pub fn num_total(&self) -> usize {
        self.total
    }

    /// Takes `n` blocks, or none at all if fewer than `n` are free.
    pub fn allocate(&mut self, n: usize) -> Result<Vec<u32>> {
        if n > self.num_free() {
            return Err(Error::CacheFull { needed: n, free: self.num_free(), total: self.total });
        }
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let b = match self.free.pop() {
                Some(b) => b,
                None => {
                    let (_, b) = self.evictable.pop_first().expect("counted as free");
                    if let Some(h) = self.meta[b as usize].hash.take() {
                        self.by_hash.remove(&h);
                    }
                    b
                }
            };
            self.meta[b as usize].refs = 1;
            out.push(b);
        }
        Ok(out)
    }

    /// Drops one reference to each block; unused blocks become free, or stay cached if hashed.
    pub fn release(&mut self, blocks: impl IntoIterator<Item = u32>) {
        for b in blocks {
            let m = &mut self.meta[b as usize];
            debug_assert!(m.refs > 0, "block {b} released twice");
            m.refs = m.refs.saturating_sub(1);
            if m.refs == 0 {
                if m.hash.is_some() {
                    self.clock += 1;
                    m.released_at = self.clock;
                    self.evictable.insert((self.clock, b));
                } else {
                    self.free.push(b);
                }
            }
        }
    }

    /// Takes a reference to the cached block holding `hash`, if any.
    pub fn acquire_cached(&mut self, hash: BlockHash) -> Option<u32> {
        let b = *self.by_hash.get(&hash)?;
        let m = &mut self.meta[b as usize];
        if m.refs == 0 {
            self.evictable.remove(&(m.released_at, b));
        }
        m.refs += 1;
        Some(b)
    }

    /// Records that `block` (full, in use) holds the content `hash`, so later requests can share it.
    /// If another block already holds the same content, this one stays private.
    pub fn register(&mut self, block: u32, hash: BlockHash) {
        if self.meta[block as usize].hash.is_none() && !self.by_hash.contains_key(&hash) {
            self.meta[block as usize].hash = Some(hash);
            self.by_hash.insert(hash, block);
        }
    }

    /// Forgets every cached prefix (unused cached blocks become plain free blocks).
    pub fn clear_cached(&mut self) {
        for (_, b) in std::mem::take(&mut self.evictable) {
            self.meta[b as usize].hash = None;
            self.free.push(b);
        }
        for m in &mut self.meta {
            m.hash = None;
        }
        self.by_hash.clear();
    }
}

/// One layer's key and value storage, `[num_blocks, block_size, num_kv_heads, head_dim]` each.
#[derive(Debug)]
pub enum LayerKv {
    /// Host memory in f32, for the CPU kernels (zeroed lazily by the OS: untouched blocks cost no
    /// resident memory).
    Host { k: Vec<f32>, v: Vec<f32> },
    /// Host memory in f16 (half the memory; the CPU kernels widen it in registers).
    HostF16 { k: Vec<half::f16>, v: Vec<half::f16> },
    /// Host memory in q8_0 (34 bytes per 32 values: `i8` values and one f16 scale per 32, the
    /// `ks`/`vs` vectors; the CPU kernels widen it as they read it).
    HostQ8 { k: Vec<i8>, ks: Vec<half::f16>, v: Vec<i8>, vs: Vec<half::f16> },
    /// Flat device tensors in the model's dtype, for the CUDA kernels.
    Device { k: Tensor, v: Tensor },
}

/// The cache of all layers plus its block allocator.
#[derive(Debug)]
pub struct PagedKvCache {
    block_size: usize,
    num_kv_heads: usize,
    head_dim: usize,
    layers: Vec<LayerKv>,
    allocator: BlockAllocator,
}

/// Whether the cache for a model on `device` lives on that device (the CUDA kernels read it there);
/// otherwise it is host f32 memory.
pub fn cache_on_device(device: &Device) -> bool {
    cfg!(feature = "cuda") && device.is_cuda()
}

/// How the KV cache stores keys and values (`--kv-cache-dtype`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvDtype {
    F32,
    F16,
    /// GPU caches only.
    BF16,
    /// llama.cpp's q8_0: 32 values as `i8` with one f16 scale (8.5 bits a value), host only; the
    /// head size must be a multiple of 32.
    Q8_0,
}

impl KvDtype {
    /// Its name as the flag takes it: f32, f16, bf16, q8_0.
    pub fn name(self) -> &'static str {
        match self {
            KvDtype::F32 => "f32",
            KvDtype::F16 => "f16",
            KvDtype::BF16 => "bf16",
            KvDtype::Q8_0 => "q8_0",
        }
    }

    /// Bytes of 32 values.
    pub fn bytes_per_32(self) -> usize {
        match self {
            KvDtype::F32 => 128,
            KvDtype::F16 | KvDtype::BF16 => 64,
            KvDtype::Q8_0 => 34,
        }
    }

    /// The tensor dtype of a device cache (q8_0 has none).
    pub fn tensor_dtype(self) -> Option<DType> {
        match self {
            KvDtype::F32 => Some(DType::F32),
            KvDtype::F16 => Some(DType::F16),
            KvDtype::BF16 => Some(DType::BF16),
            KvDtype::Q8_0 => None,
        }
    }
}

impl From<DType> for KvDtype {
    /// F16 and BF16 as themselves, anything else as F32.
    fn from(d: DType) -> Self {
        match d {
            DType::F16 => KvDtype::F16,
            DType::BF16 => KvDtype::BF16,
            _ => KvDtype::F32,
        }
    }
}

impl std::fmt::Display for KvDtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The KV cache dtype when none is asked for: the model's on a GPU, f32 on the host.
pub fn default_cache_dtype(device: &Device, model_dtype: DType) -> KvDtype {
    if cache_on_device(device) {
        model_dtype.into()
    } else {
        KvDtype::F32
    }
}

/// Parses a KV cache dtype name: `f32`, `f16`, `bf16` or `q8_0`.
pub fn parse_cache_dtype(s: &str) -> Result<KvDtype> {
    match s.trim().to_ascii_lowercase().as_str() {
        "f32" => Ok(KvDtype::F32),
        "f16" => Ok(KvDtype::F16),
        "bf16" => Ok(KvDtype::BF16),
        "q8_0" | "q8" => Ok(KvDtype::Q8_0),
        _ => Err(Error::param("kv-cache-dtype", format!("`{s}` is not one of f32, f16, bf16, q8_0"))),
    }
}

/// `n` zero f16s from zeroed memory: like `vec![0.0f32; n]`, the pages are only committed when
/// written (`vec![f16::ZERO; n]` would write, and so commit, all of them at once).
fn zeroed_f16(n: usize) -> Vec<half::f16> {
    let mut v = std::mem::ManuallyDrop::new(vec![0u16; n]);
    // SAFETY: `f16` is `repr(transparent)` over `u16` (same size and alignment) and 0 is +0.0.
    unsafe { Vec::from_raw_parts(v.as_mut_ptr().cast::<half::f16>(), v.len(), v.capacity()) }
}

/// Checks a cache dtype for `device` and the model: f32/f16/bf16 on a GPU, f32/f16/q8_0 on the host
/// (q8_0: head sizes that are a multiple of 32).
fn check_cache_dtype(cfg: &ModelConfig, device: &Device, dtype: KvDtype) -> Result<()> {
    let gpu = cache_on_device(device);
    let ok = match dtype {
        KvDtype::F32 | KvDtype::F16 => true,
        KvDtype::BF16 => gpu,
        KvDtype::Q8_0 => !gpu,
    };
    let place = if gpu { "a GPU" } else { "the CPU" };
    if !ok {
        return Err(Error::param(
            "kv-cache-dtype",
            format!("{dtype} is not supported for the KV cache on {place}: use f32 or f16 (bf16 works on a GPU, q8_0 on the CPU)"),
        ));
    }
    if dtype == KvDtype::Q8_0 && !cfg.head_dim.is_multiple_of(infer_kernels::Q8_BLOCK) {
        return Err(Error::param(
            "kv-cache-dtype",
            format!("q8_0 needs a head size that is a multiple of 32; this model's is {}: use f16", cfg.head_dim),
        ));
    }
    Ok(())
}

/// Share of the device memory still free (after the weights) that a GPU cache takes by default.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
const DEVICE_MEMORY_SHARE: f64 = 0.8;

/// What limited the size of an engine's KV cache.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum CacheLimit {
    /// The size asked for (`--kv-cache-mem`, [`EngineConfig::kv_cache_bytes`](crate::EngineConfig)).
    Requested,
    /// What `max_seqs` full contexts can use.
    Demand,
    /// `share` of the `available` bytes (host: `MemAvailable` after loading; GPU: free memory).
    Memory { available: u64, share: f64 },
}

/// Blocks for a default cache: the `want`ed ones, or as many of `per` bytes as fit in `share` of
/// the `available` bytes when that is fewer.
fn blocks_that_fit(want: usize, per: usize, room: Option<(u64, f64)>) -> (usize, CacheLimit) {
    match room {
        Some((available, share)) => {
            let fit = (available as f64 * share) as usize / per.max(1);
            if fit < want {
                (fit, CacheLimit::Memory { available, share })
            } else {
                (want, CacheLimit::Demand)
            }
        }
        None => (want, CacheLimit::Demand),
    }
}

/// How an engine's KV cache was sized (printed at start by the CLI and the server).
#[derive(Debug, Clone)]
pub struct CacheSizing {
    pub blocks: usize,
    pub block_size: usize,
    pub dtype: KvDtype,
    /// Bytes the blocks take over all layers.
    pub bytes: usize,
    /// Tokens one sequence may hold (before the cache's own capacity bounds it).
    pub max_context: usize,
    pub max_seqs: usize,
    pub limit: CacheLimit,
}

impl CacheSizing {
    /// Whole contexts of `max_context` tokens the cache holds at once.
    pub fn full_contexts(&self) -> f64 {
        (self.blocks * self.block_size) as f64 / self.max_context.max(1) as f64
    }
}

impl std::fmt::Display for CacheSizing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let tokens = self.blocks * self.block_size;
        write!(
            f,
            "KV cache: {} tokens in {} blocks, {} {:?}; room for {:.1} full contexts of {} tokens ({} sequences at most)",
            tokens,
            self.blocks,
            crate::memory::human(self.bytes as u64),
            self.dtype,
            self.full_contexts(),
            self.max_context,
            self.max_seqs
        )?;
        match self.limit {
            CacheLimit::Requested => write!(f, "; size as asked"),
            CacheLimit::Demand => write!(f, "; all that --max-seqs × the context can use"),
            CacheLimit::Memory { available, share } => {
                write!(f, "; limited to {:.0}% of the {} available", share * 100.0, crate::memory::human(available))?;
                if tokens < self.max_context {
                    write!(f, " (one sequence may hold {tokens} tokens; give it more with --kv-cache-mem or lower --ctx-size)")?;
                }
                Ok(())
            }
        }
    }
}

impl PagedKvCache {
    /// The cache the engine makes when no budget is given: room for `max_seqs` contexts of
    /// `max_context` tokens, but at most [`KV_MEMORY_SHARE`](crate::memory::KV_MEMORY_SHARE) of the
    /// memory available now (call it after the weights are loaded, so they are counted); on a GPU
    /// at most 80% of its free memory (as vLLM's `gpu_memory_utilization` does).
    pub fn default_for(
        cfg: &ModelConfig,
        block_size: usize,
        max_context: usize,
        max_seqs: usize,
        device: &Device,
        dtype: impl Into<KvDtype>,
    ) -> Result<(Self, CacheSizing)> {
        let dtype = dtype.into();
        if block_size == 0 {
            return Err(Error::param("kv-cache", "block size must be positive"));
        }
        let want = max_context.div_ceil(block_size).saturating_mul(max_seqs);
        let per = Self::bytes_per_block_of(cfg, block_size, dtype).max(1);
        let room: Option<(u64, f64)> = if cache_on_device(device) {
            #[cfg(feature = "cuda")]
            {
                Some((infer_kernels::cuda::memory_info(device)?.0 as u64, DEVICE_MEMORY_SHARE))
            }
            #[cfg(not(feature = "cuda"))]
            None
        } else {
            crate::memory::available_bytes().map(|a| (a, crate::memory::KV_MEMORY_SHARE))
        };
        let (blocks, limit) = blocks_that_fit(want, per, room);
        if blocks == 0 {
            return Err(Error::param(
                "kv-cache",
                format!(
                    "not enough memory for the KV cache: one block of {block_size} tokens takes {}, more than {:.0}% of the memory available; free some memory or give --kv-cache-mem",
                    crate::memory::human(per as u64),
                    room.map_or(0.0, |r| r.1 * 100.0)
                ),
            ));
        }
        let cache = Self::new_on(cfg, block_size, blocks, device, dtype)?;
        let sizing = CacheSizing { blocks, block_size, dtype, bytes: blocks * per, max_context, max_seqs, limit };
        Ok((cache, sizing))
    }

    /// A host (f32) cache of `num_blocks` blocks of `block_size` tokens for the model `cfg`.
    pub fn new(cfg: &ModelConfig, block_size: usize, num_blocks: usize) -> Result<Self> {
        Self::new_on(cfg, block_size, num_blocks, &Device::Cpu, KvDtype::F32)
    }

    /// The same for a model on `device` with keys and values stored as `dtype`: on a CUDA device
    /// the blocks are device memory, else host memory (f32, f16 or q8_0).
    pub fn new_on(cfg: &ModelConfig, block_size: usize, num_blocks: usize, device: &Device, dtype: impl Into<KvDtype>) -> Result<Self> {
        let dtype = dtype.into();
        if block_size == 0 || num_blocks == 0 {
            return Err(Error::param("kv-cache", "block size and block count must be positive"));
        }
        check_cache_dtype(cfg, device, dtype)?;
        let per_layer = num_blocks * block_size * cfg.num_key_value_heads * cfg.head_dim;
        let layers = (0..cfg.num_hidden_layers)
            .map(|_| -> Result<LayerKv> {
                Ok(match (cache_on_device(device), dtype.tensor_dtype()) {
                    (true, Some(dt)) => {
                        LayerKv::Device { k: Tensor::zeros(per_layer, dt, device)?, v: Tensor::zeros(per_layer, dt, device)? }
                    }
                    _ if dtype == KvDtype::F16 => LayerKv::HostF16 { k: zeroed_f16(per_layer), v: zeroed_f16(per_layer) },
                    _ if dtype == KvDtype::Q8_0 => {
                        let scales = per_layer / infer_kernels::Q8_BLOCK;
                        LayerKv::HostQ8 { k: vec![0; per_layer], ks: zeroed_f16(scales), v: vec![0; per_layer], vs: zeroed_f16(scales) }
                    }
                    _ => LayerKv::Host { k: vec![0.0; per_layer], v: vec![0.0; per_layer] },
                })
            })
            .collect::<Result<Vec<_>>>()
            .map_err(|e| {
                Error::param(
                    "kv-cache",
                    format!("cannot allocate {num_blocks} KV blocks on {device:?}: {e}; lower --kv-cache-mem, --max-seqs or --ctx-size"),
                )
            })?;
        Ok(Self {
            block_size,
            num_kv_heads: cfg.num_key_value_heads,
            head_dim: cfg.head_dim,
            layers,
            allocator: BlockAllocator::new(num_blocks),
        })
    }

    /// Bytes one block takes over all layers (keys and values) in a cache of `dtype` (the host
    /// cache is f32).
    pub fn bytes_per_block_of(cfg: &ModelConfig, block_size: usize, dtype: KvDtype) -> usize {
        2 * cfg.num_hidden_layers * block_size * cfg.num_key_value_heads * cfg.head_dim * dtype.bytes_per_32() / 32
    }

    /// Bytes one block takes over all layers (keys and values) in the host cache.
    pub fn bytes_per_block(cfg: &ModelConfig, block_size: usize) -> usize {
        Self::bytes_per_block_of(cfg, block_size, KvDtype::F32)
    }

    /// As many host blocks as fit in `bytes`.
    pub fn with_memory_budget(cfg: &ModelConfig, block_size: usize, bytes: usize) -> Result<Self> {
        Self::with_memory_budget_on(cfg, block_size, bytes, &Device::Cpu, KvDtype::F32)
    }

    /// As many blocks as fit in `bytes`, for a model on `device` (see [`new_on`](Self::new_on)).
    pub fn with_memory_budget_on(
        cfg: &ModelConfig,
        block_size: usize,
        bytes: usize,
        device: &Device,
        dtype: impl Into<KvDtype>,
    ) -> Result<Self> {
        let dtype = dtype.into();
        check_cache_dtype(cfg, device, dtype)?;
        let per = Self::bytes_per_block_of(cfg, block_size, dtype);
        let n = bytes / per;
        if n == 0 {
            return Err(Error::param(
                "kv-cache-mem",
                format!("{bytes} bytes hold no block (one block of {block_size} tokens needs {per} bytes); give the cache more memory"),
            ));
        }
        Self::new_on(cfg, block_size, n, device, dtype)
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Blocks that can be handed out (including unused blocks that still cache a prefix).
    pub fn num_free_blocks(&self) -> usize {
        self.allocator.num_free()
    }

    /// Unused blocks that still cache a prefix.
    pub fn num_cached_blocks(&self) -> usize {
        self.allocator.num_cached()
    }

    /// Blocks some sequence holds.
    pub fn num_used_blocks(&self) -> usize {
        self.allocator.num_total() - self.allocator.num_free()
    }

    /// The block allocator (prefix lookups and registration).
    pub fn allocator_mut(&mut self) -> &mut BlockAllocator {
        &mut self.allocator
    }

    pub fn num_blocks(&self) -> usize {
        self.allocator.num_total()
    }

    /// Tokens the whole cache can hold.
    pub fn capacity_tokens(&self) -> usize {
        self.num_blocks() * self.block_size
    }

    /// Blocks needed to hold `tokens` tokens.
    pub fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block_size)
    }

    /// Grows `table` so it holds at least `tokens` tokens. On failure nothing is allocated.
    pub fn reserve(&mut self, table: &mut Vec<u32>, tokens: usize) -> Result<()> {
        let need = self.blocks_for(tokens).saturating_sub(table.len());
        if need > 0 {
            table.extend(self.allocator.allocate(need)?);
        }
        Ok(())
    }

    /// Points an empty block table at the cached blocks of the longest cached prefix of `tokens`
    /// (whole blocks, leaving at least one token to compute), recording their hashes in `hashes`;
    /// returns how many tokens they hold. `root` is the sequence's namespace (`0`, or a
    /// [`salt_root`]).
    pub fn match_prefix(&mut self, tokens: &[u32], root: BlockHash, table: &mut Vec<u32>, hashes: &mut Vec<BlockHash>) -> usize {
        debug_assert!(table.is_empty() && hashes.is_empty());
        let bs = self.block_size;
        let full = tokens.len().saturating_sub(1) / bs;
        let mut parent = root;
        for i in 0..full {
            let h = block_hash(parent, &tokens[i * bs..(i + 1) * bs]);
            let Some(b) = self.allocator.acquire_cached(h) else { break };
            table.push(b);
            hashes.push(h);
            parent = h;
        }
        table.len() * bs
    }

    /// Makes the full blocks of a sequence whose first `computed.len()` tokens are in the cache
    /// shareable (content-hashed in the prefix cache); `hashes` holds the hashes of the blocks
    /// committed before and grows by the new ones; `root` as for [`match_prefix`](Self::match_prefix).
    pub fn commit_full_blocks(&mut self, computed: &[u32], root: BlockHash, table: &[u32], hashes: &mut Vec<BlockHash>) {
        let bs = self.block_size;
        while (hashes.len() + 1) * bs <= computed.len() {
            let i = hashes.len();
            let h = block_hash(hashes.last().copied().unwrap_or(root), &computed[i * bs..(i + 1) * bs]);
            self.allocator.register(table[i], h);
            hashes.push(h);
        }
    }

    /// Releases all blocks of `table` (shared or cached blocks stay for their other users).
    pub fn release(&mut self, table: &mut Vec<u32>) {
        self.allocator.release(table.drain(..));
    }

    /// The flat slot index of token position `pos` of a sequence with block table `table`.
    pub fn slot(&self, table: &[u32], pos: usize) -> usize {
        table[pos / self.block_size] as usize * self.block_size + pos % self.block_size
    }

    /// The attention geometry for a layer of this cache.
    pub fn shape(&self, num_heads: usize, sliding_window: Option<usize>) -> AttentionShape {
        AttentionShape {
            num_heads,
            num_kv_heads: self.num_kv_heads,
            head_dim: self.head_dim,
            block_size: self.block_size,
            scale: 1.0 / (self.head_dim as f32).sqrt(),
            sliding_window,
            softcap: None,
        }
    }

    /// One layer's storage.
    pub fn layer_mut(&mut self, layer: usize) -> &mut LayerKv {
        &mut self.layers[layer]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_cache_fits_the_memory() {
        // 8 sequences of 2048 tokens in blocks of 16 = 1024 blocks of 1 MiB.
        let mib = 1 << 20;
        assert_eq!(blocks_that_fit(1024, mib, Some((4 << 30, 0.5))), (1024, CacheLimit::Demand));
        let (n, limit) = blocks_that_fit(1024, mib, Some((512 << 20, 0.5)));
        assert_eq!((n, limit), (256, CacheLimit::Memory { available: 512 << 20, share: 0.5 }));
        assert_eq!(blocks_that_fit(1024, mib, None), (1024, CacheLimit::Demand));
        assert_eq!(blocks_that_fit(1024, mib, Some((mib as u64, 0.5))).0, 0, "no room: the caller reports it");
        // What the engine prints says what limited it.
        let sizing = CacheSizing {
            blocks: 256,
            block_size: 16,
            dtype: KvDtype::F32,
            bytes: 256 * mib,
            max_context: 8192,
            max_seqs: 4,
            limit: CacheLimit::Memory { available: 512 << 20, share: 0.5 },
        };
        let line = sizing.to_string();
        assert!(line.contains("4096 tokens") && line.contains("0.5 full contexts") && line.contains("50% of the 512 MiB"), "{line}");
        assert!(line.contains("one sequence may hold 4096 tokens"), "{line}");
    }

    #[test]
    fn q8_0_cache_takes_34_bytes_per_32_values_and_needs_head_sizes_of_32() {
        let json = r#"{"model_type": "llama", "vocab_size": 32, "hidden_size": 128, "intermediate_size": 64,
            "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 64}"#;
        let mut cfg = ModelConfig::from_hf_json(json, std::path::Path::new("config.json")).unwrap();
        assert_eq!(cfg.head_dim, 64);
        assert_eq!(parse_cache_dtype("Q8_0").unwrap(), KvDtype::Q8_0);
        assert!(parse_cache_dtype("q4_0").unwrap_err().to_string().contains("f32, f16, bf16, q8_0"));
        let per = |d| PagedKvCache::bytes_per_block_of(&cfg, 16, d);
        assert_eq!(per(KvDtype::Q8_0) * 128, per(KvDtype::F32) * 34);
        assert_eq!(per(KvDtype::F16) * 2, per(KvDtype::F32));
        let cache = PagedKvCache::new_on(&cfg, 16, 4, &Device::Cpu, KvDtype::Q8_0).unwrap();
        let n = 4 * 16 * cfg.num_key_value_heads * 64;
        assert!(matches!(&cache.layers[0], LayerKv::HostQ8 { k, ks, .. } if k.len() == n && ks.len() == n / 32));
        cfg.head_dim = 80;
        let err = PagedKvCache::new_on(&cfg, 16, 4, &Device::Cpu, KvDtype::Q8_0).unwrap_err().to_string();
        assert!(err.contains("multiple of 32") && err.contains("80"), "{err}");
    }

    #[test]
    fn allocator_refuses_cleanly_and_recycles() {
        let mut a = BlockAllocator::new(4);
        let x = a.allocate(3).unwrap();
        assert_eq!(x, vec![0, 1, 2]);
        let err = a.allocate(2).unwrap_err().to_string();
        assert!(err.starts_with("KV cache full: 2 more blocks needed, 1 free of 4"), "{err}");
        assert_eq!(a.num_free(), 1, "a refused request takes nothing");
        a.release(x);
        assert_eq!(a.allocate(4).unwrap().len(), 4);
    }

    #[test]
    fn cached_blocks_are_shared_then_evicted_lru() {
        let mut a = BlockAllocator::new(3);
        let h1 = block_hash(0, &[1, 2]);
        let h2 = block_hash(h1, &[3, 4]);
        assert_ne!(h2, block_hash(0, &[3, 4]), "the hash covers the prefix");
        let x = a.allocate(2).unwrap();
        a.register(x[0], h1);
        a.register(x[1], h2);
        // A second user shares the first block.
        assert_eq!(a.acquire_cached(h1), Some(x[0]));
        a.release(x.clone());
        assert_eq!((a.num_free(), a.num_cached()), (2, 1), "block 0 still used, block 1 cached");
        a.release([x[0]]);
        assert_eq!((a.num_free(), a.num_cached()), (3, 2));
        // Reuse from the cache.
        assert_eq!(a.acquire_cached(h2), Some(x[1]));
        a.release([x[1]]);
        // Allocation takes never-used blocks first, then evicts the least recently released (h1).
        let y = a.allocate(2).unwrap();
        assert_eq!(y[0], 2);
        assert_eq!(y[1], x[0]);
        assert_eq!(a.acquire_cached(h1), None, "evicted");
        assert_eq!(a.acquire_cached(h2), Some(x[1]));
        assert!(a.allocate(1).is_err());
    }
}
