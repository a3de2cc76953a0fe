//! Rotary position embeddings: the frequencies of a model (plain, linear, Llama 3.1, GGUF
//! `rope_freqs`, LongRoPE), rotated pairs `(i, i + rot/2)` or interleaved `(2i, 2i + 1)`, on the
//! first `rotary_dim` dimensions of each head (partial rotary) or all of them.

use candle_core::{DType, Device, Tensor};

use crate::config::{ModelConfig, RopeScaling};
use crate::error::{Error, Result};
use crate::weights::host_f32;

/// What the rotary embedding needs for one batch: cos/sin tables, or on CUDA the positions (the
/// kernel computes the angles).
pub(crate) enum RopeInput {
    /// `[tokens, 1, rotary_dim / 2]` each.
    Tables(Tensor, Tensor),
    #[cfg(feature = "cuda")]
    Positions(Tensor),
}

/// LongRoPE: two sets of inverse frequencies, chosen per position.
#[derive(Debug, Clone)]
struct LongRope {
    short: Vec<f32>,
    long: Vec<f32>,
    original_max: f64,
    attention_factor: f32,
}

/// Rotary embedding frequencies of one model; cos/sin are computed per batch for the tokens' positions.
#[derive(Debug, Clone)]
pub(crate) struct Rotary {
    /// `[1, rotary_dim / 2]` (f32), and the same values on the host.
    inv_freq: Tensor,
    inv_host: Vec<f32>,
    interleaved: bool,
    rotary_dim: usize,
    long_rope: Option<LongRope>,
}

impl Rotary {
    pub(crate) fn new(cfg: &ModelConfig, device: &Device) -> Result<Self> {
        let dim = cfg.rotary_dim;
        let base: Vec<f32> = (0..dim / 2).map(|i| (1.0 / cfg.rope_theta.powf(2.0 * i as f64 / dim as f64)) as f32).collect();
        let mut inv = base.clone();
        let mut long_rope = None;
        match &cfg.rope_scaling {
            None => {}
            Some(RopeScaling::Linear { factor }) => inv.iter_mut().for_each(|f| *f /= *factor as f32),
            Some(RopeScaling::FreqFactors(ff)) => {
                if ff.len() != inv.len() {
                    return Err(Error::Model(format!("rope_freqs has {} entries, expected {}", ff.len(), inv.len())));
                }
                inv.iter_mut().zip(ff).for_each(|(f, d)| *f /= d);
            }
            Some(RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings }) => {
                let low_wavelen = original_max_position_embeddings / low_freq_factor;
                let high_wavelen = original_max_position_embeddings / high_freq_factor;
                for f in inv.iter_mut() {
                    let freq = *f as f64;
                    let wavelen = 2.0 * std::f64::consts::PI / freq;
                    let scaled = if wavelen > low_wavelen { freq / factor } else { freq };
                    let out = if wavelen < high_wavelen || wavelen > low_wavelen {
                        scaled
                    } else {
                        let smooth = (original_max_position_embeddings / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                        (1.0 - smooth) * scaled / factor + smooth * scaled
                    };
                    *f = out as f32;
                }
            }
            Some(RopeScaling::LongRope { short, long, original_max, attention_factor }) => {
                let scale = |factors: &[f64]| -> Vec<f32> { base.iter().zip(factors).map(|(&b, &f)| (b as f64 / f) as f32).collect() };
                inv = scale(short);
                long_rope = Some(LongRope {
                    short: inv.clone(),
                    long: scale(long),
                    original_max: *original_max,
                    attention_factor: *attention_factor as f32,
                });
            }
        }
        let n = inv.len();
        Ok(Self {
            inv_freq: Tensor::from_vec(inv.clone(), (1, n), device)?,
            inv_host: inv,
            interleaved: cfg.rope_interleaved,
            rotary_dim: dim,
            long_rope,
        })
    }

    /// The inverse frequencies on the model's device (f32, `rotary_dim / 2`), the rotated dims and
    /// whether pairs are interleaved, for kernels that compute the angles themselves; `None` with
    /// LongRoPE (two sets of frequencies chosen per position).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(crate) fn device_freqs(&self) -> Option<(&Tensor, usize, bool)> {
        match self.long_rope {
            Some(_) => None,
            None => Some((&self.inv_freq, self.rotary_dim, self.interleaved)),
        }
    }

    /// What [`apply`](Self::apply) needs for tokens at `positions` (u32, on the model's device;
    /// `host` holds the same values).
    pub(crate) fn prepare(&self, positions: &Tensor, host: &[u32], dtype: DType) -> Result<RopeInput> {
        if self.long_rope.is_some() {
            let half = self.rotary_dim / 2;
            let (mut cos, mut sin) = (Vec::new(), Vec::new());
            self.tables_into(host, &mut cos, &mut sin);
            let dev = positions.device();
            let t = (host.len(), 1, half);
            return Ok(RopeInput::Tables(Tensor::from_vec(cos, t, dev)?.to_dtype(dtype)?, Tensor::from_vec(sin, t, dev)?.to_dtype(dtype)?));
        }
        #[cfg(feature = "cuda")]
        if positions.device().is_cuda() {
            return Ok(RopeInput::Positions(positions.clone()));
        }
        let freqs = positions.to_dtype(DType::F32)?.unsqueeze(1)?.broadcast_mul(&self.inv_freq)?;
        let freqs = freqs.unsqueeze(1)?;
        Ok(RopeInput::Tables(freqs.cos()?.to_dtype(dtype)?, freqs.sin()?.to_dtype(dtype)?))
    }

    /// The cos/sin tables (`[positions, rotary_dim / 2]` each) for tokens at `positions`, written
    /// into `cos` and `sin` (reusing their memory).
    pub(crate) fn tables_into(&self, positions: &[u32], cos: &mut Vec<f32>, sin: &mut Vec<f32>) {
        cos.clear();
        sin.clear();
        for &p in positions {
            // LongRoPE: the short frequencies below the original context, the long ones from there.
            let (inv, factor) = match &self.long_rope {
                Some(lr) if (p as f64) < lr.original_max => (&lr.short, lr.attention_factor),
                Some(lr) => (&lr.long, lr.attention_factor),
                None => (&self.inv_host, 1.0),
            };
            for &f in inv {
                let (s, c) = (p as f32 * f).sin_cos();
                cos.push(c * factor);
                sin.push(s * factor);
            }
        }
    }

    /// Rotates `x` (`[tokens, heads, head_dim]` on the host) in place with tables from
    /// [`tables_into`](Self::tables_into).
    pub(crate) fn apply_host(&self, x: &mut [f32], heads: usize, head_dim: usize, cos: &[f32], sin: &[f32]) {
        infer_kernels::fused::rope(x, heads, head_dim, cos, sin, self.rotary_dim, self.interleaved);
    }

    /// `x`: `[tokens, heads, head_dim]`.
    pub(crate) fn apply(&self, x: &Tensor, input: &RopeInput) -> Result<Tensor> {
        match input {
            RopeInput::Tables(cos, sin) => {
                let (t, h, d) = x.dims3()?;
                let rot = self.rotary_dim;
                if let (Some(xv), Some(c), Some(s)) = (host_f32(x), host_f32(cos), host_f32(sin)) {
                    let mut y = xv.get().to_vec();
                    self.apply_host(&mut y, h, d, c.get(), s.get());
                    return Ok(Tensor::from_vec(y, (t, h, d), x.device())?);
                }
                let xr = if rot < d { x.narrow(2, 0, rot)?.contiguous()? } else { x.clone() };
                // Each token is its own "batch" so every token gets its own position.
                let x4 = xr.reshape((t, h, 1, rot))?;
                let y = if self.interleaved {
                    candle_nn::rotary_emb::rope_i(&x4, cos, sin)?
                } else {
                    candle_nn::rotary_emb::rope(&x4, cos, sin)?
                };
                let y = y.reshape((t, h, rot))?;
                Ok(if rot < d { Tensor::cat(&[&y, &x.narrow(2, rot, d - rot)?], 2)? } else { y })
            }
            #[cfg(feature = "cuda")]
            RopeInput::Positions(pos) => {
                Ok(infer_kernels::cuda::rope(&x.contiguous()?, pos, &self.inv_freq.flatten_all()?, self.interleaved)?)
            }
        }
    }
}
