//! The paged KV cache: keys and values live in fixed-size blocks; each sequence owns a block table
//! (the list of its blocks, in order); an allocator hands out blocks within a memory budget and
//! refuses cleanly when none are left.

use infer_kernels::AttentionShape;

use crate::config::ModelConfig;
use crate::error::{Error, Result};

/// Tokens per block unless configured otherwise.
pub const DEFAULT_BLOCK_SIZE: usize = 16;

/// Hands out block ids from a fixed pool.
#[derive(Debug, Clone)]
pub struct BlockAllocator {
    free: Vec<u32>,
    total: usize,
}

impl BlockAllocator {
    pub fn new(total: usize) -> Self {
        // Lowest ids are handed out first.
        Self { free: (0..total as u32).rev().collect(), total }
    }

    pub fn num_free(&self) -> usize {
        self.free.len()
    }

    pub fn num_total(&self) -> usize {
        self.total
    }

    /// Takes `n` blocks, or none at all if fewer than `n` are free.
    pub fn allocate(&mut self, n: usize) -> Result<Vec<u32>> {
        if n > self.free.len() {
            return Err(Error::CacheFull { needed: n, free: self.free.len(), total: self.total });
        }
        Ok(self.free.split_off(self.free.len() - n).into_iter().rev().collect())
    }

    /// Returns blocks to the pool.
    pub fn release(&mut self, blocks: impl IntoIterator<Item = u32>) {
        self.free.extend(blocks);
    }
}

/// One layer's key and value storage, `[num_blocks, block_size, num_kv_heads, head_dim]` each.
#[derive(Debug)]
pub struct LayerKv {
    pub k: Vec<f32>,
    pub v: Vec<f32>,
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

impl PagedKvCache {
    /// A cache of `num_blocks` blocks of `block_size` tokens for the model `cfg`.
    pub fn new(cfg: &ModelConfig, block_size: usize, num_blocks: usize) -> Result<Self> {
        if block_size == 0 || num_blocks == 0 {
            return Err(Error::param("kv-cache", "block size and block count must be positive"));
        }
        let per_layer = num_blocks * block_size * cfg.num_key_value_heads * cfg.head_dim;
        // Zeroed allocations are lazy: untouched blocks cost no resident memory.
        let layers = (0..cfg.num_hidden_layers).map(|_| LayerKv { k: vec![0.0; per_layer], v: vec![0.0; per_layer] }).collect();
        Ok(Self {
            block_size,
            num_kv_heads: cfg.num_key_value_heads,
            head_dim: cfg.head_dim,
            layers,
            allocator: BlockAllocator::new(num_blocks),
        })
    }

    /// Bytes one block takes over all layers (keys and values).
    pub fn bytes_per_block(cfg: &ModelConfig, block_size: usize) -> usize {
        2 * cfg.num_hidden_layers * block_size * cfg.num_key_value_heads * cfg.head_dim * std::mem::size_of::<f32>()
    }

    /// As many blocks as fit in `bytes`.
    pub fn with_memory_budget(cfg: &ModelConfig, block_size: usize, bytes: usize) -> Result<Self> {
        let per = Self::bytes_per_block(cfg, block_size);
        let n = bytes / per;
        if n == 0 {
            return Err(Error::param(
                "kv-cache-mem",
                format!("{bytes} bytes hold no block (one block of {block_size} tokens needs {per} bytes); give the cache more memory"),
            ));
        }
        Self::new(cfg, block_size, n)
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn num_free_blocks(&self) -> usize {
        self.allocator.num_free()
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

    /// Frees all blocks of `table`.
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
}
