//! Paged attention against a dense f64 reference, on every instruction-set path; results that do
//! not depend on chunking.

use super::*;

/// Dense reference: softmax(q kᵀ · scale + causal/window mask) v for one sequence stored contiguously.
fn reference(q: &[f32], k: &[f32], v: &[f32], n_new: usize, ctx: usize, sh: &AttentionShape) -> Vec<f32> {
    let hd = sh.head_dim;
    let mut out = vec![0.0; n_new * sh.num_heads * hd];
    for i in 0..n_new {
        let pos = ctx - n_new + i;
        for h in 0..sh.num_heads {
            let kvh = h * sh.num_kv_heads / sh.num_heads;
            let qv = &q[(i * sh.num_heads + h) * hd..][..hd];
            let mut w: Vec<f64> = (0..=pos)
                .map(|t| {
                    let visible = sh.sliding_window.is_none_or(|win| pos - t < win);
                    if !visible {
                        return f64::NEG_INFINITY;
                    }
                    let kv = &k[(t * sh.num_kv_heads + kvh) * hd..][..hd];
                    let s = qv.iter().zip(kv).map(|(a, b)| (*a as f64) * (*b as f64)).sum::<f64>() * sh.scale as f64;
                    match sh.softcap {
                        Some(c) => c as f64 * (s / c as f64).tanh(),
                        None => s,
                    }
                })
                .collect();
            let m = w.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let z: f64 = w
                .iter_mut()
                .map(|x| {
                    *x = (*x - m).exp();
                    *x
                })
                .sum();
            for d in 0..hd {
                let acc: f64 = (0..=pos).map(|t| w[t] / z * v[(t * sh.num_kv_heads + kvh) * hd + d] as f64).sum();
                out[(i * sh.num_heads + h) * hd + d] = acc as f32;
            }
        }
    }
    out
}

fn rand_vec(n: usize, seed: &mut u64) -> Vec<f32> {
    (0..n)
        .map(|_| {
            *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((*seed >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
        })
        .collect()
}

#[test]
fn paged_matches_dense_ragged_gqa_and_window() {
    for ((window, softcap), head_dim, isa) in [(None, None), (Some(3), None), (Some(20), None), (None, Some(0.8))]
        .into_iter()
        .flat_map(|w| [8, 64, 72, 96].into_iter().flat_map(move |hd| Isa::available().into_iter().map(move |isa| (w, hd, isa))))
    {
        let sh = AttentionShape { num_heads: 4, num_kv_heads: 2, head_dim, block_size: 4, scale: 0.35, sliding_window: window, softcap };
        let kv_row = sh.num_kv_heads * sh.head_dim;
        let num_blocks = 16;
        let mut kc = vec![0.0f32; num_blocks * sh.block_size * kv_row];
        let mut vc = kc.clone();
        let mut kh = vec![half::f16::ZERO; num_blocks * sh.block_size * kv_row];
        let mut vh = kh.clone();
        let mut seed = 7u64;
        // Two sequences: one already holds 6 tokens and decodes 1; one prefills 30 tokens (rows see
        // up to 30 keys, past the 8-wide vector steps of the softmax).
        // Blocks are deliberately scattered and interleaved between the sequences.
        let tables: [Vec<u32>; 2] = [vec![9, 2], vec![5, 14, 0, 11, 3, 7, 15, 1]];
        let ctx = [7usize, 30];
        let new = [1usize, 30];
        let full: Vec<(Vec<f32>, Vec<f32>)> =
            ctx.iter().map(|&c| (rand_vec(c * kv_row, &mut seed), rand_vec(c * kv_row, &mut seed))).collect();
        // Pre-fill the old tokens of sequence 0.
        let slot = |s: usize, t: usize| tables[s][t / sh.block_size] as usize * sh.block_size + t % sh.block_size;
        let old: Vec<usize> = (0..6).map(|t| slot(0, t)).collect();
        write_kv(&full[0].0[..6 * kv_row], &full[0].1[..6 * kv_row], &old, &sh, &mut kc, &mut vc);
        write_kv(&full[0].0[..6 * kv_row], &full[0].1[..6 * kv_row], &old, &sh, &mut kh, &mut vh);
        // The batch: seq 0's last token, then seq 1's 30 tokens.
        let mut kb = full[0].0[6 * kv_row..].to_vec();
        kb.extend_from_slice(&full[1].0);
        let mut vb = full[0].1[6 * kv_row..].to_vec();
        vb.extend_from_slice(&full[1].1);
        let slots: Vec<usize> = std::iter::once(slot(0, 6)).chain((0..30).map(|t| slot(1, t))).collect();
        write_kv(&kb, &vb, &slots, &sh, &mut kc, &mut vc);
        write_kv(&kb, &vb, &slots, &sh, &mut kh, &mut vh);
        let q = rand_vec(31 * sh.num_heads * sh.head_dim, &mut seed);
        let seqs = [
            SeqAttention { q_start: 0, q_len: 1, context_len: 7, block_table: &tables[0] },
            SeqAttention { q_start: 1, q_len: 30, context_len: 30, block_table: &tables[1] },
        ];
        let mut out = vec![f32::NAN; q.len()];
        paged_attention(isa, &q, &kc, &vc, &seqs, &sh, &mut out);
        let qr = sh.num_heads * sh.head_dim;
        let r0 = reference(&q[..qr], &full[0].0, &full[0].1, new[0], ctx[0], &sh);
        let r1 = reference(&q[qr..], &full[1].0, &full[1].1, new[1], ctx[1], &sh);
        let expect: Vec<f32> = r0.into_iter().chain(r1).collect();
        for (a, b) in out.iter().zip(&expect) {
            assert!((a - b).abs() < 1e-5, "window {window:?} head_dim {head_dim} {isa:?}: {a} vs {b}");
        }
        // An f16 cache gives the reference over f16-rounded keys and values.
        let round = |x: &[f32]| -> Vec<f32> { x.iter().map(|&v| half::f16::from_f32(v).to_f32()).collect() };
        let mut out = vec![f32::NAN; q.len()];
        paged_attention(isa, &q, &kh, &vh, &seqs, &sh, &mut out);
        let r0 = reference(&q[..qr], &round(&full[0].0), &round(&full[0].1), new[0], ctx[0], &sh);
        let r1 = reference(&q[qr..], &round(&full[1].0), &round(&full[1].1), new[1], ctx[1], &sh);
        for (a, b) in out.iter().zip(r0.iter().chain(&r1)) {
            assert!((a - b).abs() < 1e-5, "f16 cache, window {window:?} head_dim {head_dim} {isa:?}: {a} vs {b}");
        }
        // A q8_0 cache (head sizes that are multiples of 32) gives the reference over q8_0-rounded
        // keys and values (llama.cpp's rounding: scale max|x|/127 kept as f16, values x·127/max|x|
        // to the nearest integer), and stays near the exact result.
        if head_dim % 32 == 0 {
            let n = num_blocks * sh.block_size * kv_row;
            let (mut kq, mut kd, mut vq, mut vd) =
                (vec![0i8; n], vec![half::f16::ZERO; n / 32], vec![0i8; n], vec![half::f16::ZERO; n / 32]);
            let k8 = (&mut kq[..], &mut kd[..]);
            let v8 = (&mut vq[..], &mut vd[..]);
            write_kv_q8(&full[0].0[..6 * kv_row], &full[0].1[..6 * kv_row], &old, &sh, k8, v8);
            write_kv_q8(&kb, &vb, &slots, &sh, (&mut kq, &mut kd), (&mut vq, &mut vd));
            let mut out = vec![f32::NAN; q.len()];
            paged_attention_q8(isa, &q, (&kq, &kd), (&vq, &vd), &seqs, &sh, &mut out);
            let q8 = |x: &[f32]| -> Vec<f32> {
                x.chunks(32)
                    .flat_map(|c| {
                        let amax = c.iter().fold(0f32, |m, v| m.max(v.abs()));
                        let d = amax / 127.0;
                        let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
                        let d16 = half::f16::from_f32(d).to_f32();
                        c.iter().map(move |&v| d16 * (v * inv).round())
                    })
                    .collect()
            };
            let r0 = reference(&q[..qr], &q8(&full[0].0), &q8(&full[0].1), new[0], ctx[0], &sh);
            let r1 = reference(&q[qr..], &q8(&full[1].0), &q8(&full[1].1), new[1], ctx[1], &sh);
            for ((a, b), e) in out.iter().zip(r0.iter().chain(&r1)).zip(&expect) {
                assert!((a - b).abs() < 1e-4, "q8_0 cache, window {window:?} head_dim {head_dim} {isa:?}: {a} vs {b}");
                assert!((a - e).abs() < 0.02, "q8_0 cache far from f32, head_dim {head_dim} {isa:?}: {a} vs {e}");
            }
        }
    }
}

/// A prompt chunk after earlier context (the tiled kernel's rows start past position 0 and
/// its key steps cross block boundaries), every path against the dense reference.
#[test]
fn chunked_prompt_matches_dense() {
    for (window, softcap, head_dim) in [(None, None, 64), (Some(17), None, 128), (None, Some(1.5), 32), (Some(40), None, 64)] {
        let sh = AttentionShape { num_heads: 6, num_kv_heads: 2, head_dim, block_size: 8, scale: 0.2, sliding_window: window, softcap };
        let kv_row = sh.num_kv_heads * head_dim;
        let (ctx, new) = (53usize, 21usize);
        let mut seed = 11u64;
        let (k, v) = (rand_vec(ctx * kv_row, &mut seed), rand_vec(ctx * kv_row, &mut seed));
        let table: Vec<u32> = (0..ctx.div_ceil(sh.block_size) as u32).rev().collect();
        let slots: Vec<usize> = (0..ctx).map(|t| table[t / sh.block_size] as usize * sh.block_size + t % sh.block_size).collect();
        let mut kc = vec![0f32; table.len() * sh.block_size * kv_row];
        let mut vc = kc.clone();
        write_kv(&k, &v, &slots, &sh, &mut kc, &mut vc);
        let q = rand_vec(new * sh.num_heads * head_dim, &mut seed);
        let seqs = [SeqAttention { q_start: 0, q_len: new, context_len: ctx, block_table: &table }];
        let want = reference(&q, &k, &v, new, ctx, &sh);
        for isa in Isa::available() {
            let mut out = vec![f32::NAN; q.len()];
            paged_attention(isa, &q, &kc, &vc, &seqs, &sh, &mut out);
            for (i, (a, b)) in out.iter().zip(&want).enumerate() {
                assert!((a - b).abs() < 1e-5, "window {window:?} softcap {softcap:?} head_dim {head_dim} {isa:?} [{i}]: {a} vs {b}");
            }
        }
    }
}

/// A row's result does not depend on how its sequence is split into forward passes: one
/// prefill, chunks of 5, or one row at a time give bit-identical outputs (greedy decoding then
/// does not change with batching, chunked prefill or preemption), with and without a window.
#[test]
fn results_do_not_depend_on_chunking() {
    for (window, head_dim) in [(None, 64), (Some(11), 64), (None, 72), (None, 128)] {
        let sh =
            AttentionShape { num_heads: 6, num_kv_heads: 2, head_dim, block_size: 4, scale: 0.3, sliding_window: window, softcap: None };
        let kv_row = sh.num_kv_heads * head_dim;
        let q_row = sh.num_heads * head_dim;
        let ctx = 37;
        let mut seed = 5u64;
        let (k, v, q) = (rand_vec(ctx * kv_row, &mut seed), rand_vec(ctx * kv_row, &mut seed), rand_vec(ctx * q_row, &mut seed));
        let table: Vec<u32> = (0..ctx.div_ceil(sh.block_size) as u32).map(|b| (b * 7) % 10).collect();
        let slots: Vec<usize> = (0..ctx).map(|t| table[t / sh.block_size] as usize * sh.block_size + t % sh.block_size).collect();
        let mut kc = vec![0f32; 10 * sh.block_size * kv_row];
        let mut vc = kc.clone();
        write_kv(&k, &v, &slots, &sh, &mut kc, &mut vc);
        for isa in Isa::available() {
            let run = |chunk: usize| -> Vec<f32> {
                let mut all = Vec::new();
                for start in (0..ctx).step_by(chunk) {
                    let n = chunk.min(ctx - start);
                    let seqs = [SeqAttention { q_start: 0, q_len: n, context_len: start + n, block_table: &table }];
                    let mut out = vec![f32::NAN; n * q_row];
                    paged_attention(isa, &q[start * q_row..(start + n) * q_row], &kc, &vc, &seqs, &sh, &mut out);
                    all.extend(out);
                }
                all
            };
            let whole = run(ctx);
            for chunk in [1, 5] {
                let got = run(chunk);
                assert!(
                    got.iter().zip(&whole).all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{isa:?} window {window:?} head_dim {head_dim}: chunks of {chunk} differ"
                );
            }
        }
    }
}

#[test]
fn row_metadata_lists_each_rows_table_start_and_key_count() {
    let (t0, t1) = ([7u32, 3], [5u32]);
    let seqs = [
        SeqAttention { q_start: 0, q_len: 2, context_len: 20, block_table: &t0 },
        SeqAttention { q_start: 2, q_len: 1, context_len: 4, block_table: &t1 },
    ];
    let (mut tables, mut row_table, mut row_len) = (vec![9], Vec::new(), Vec::new());
    row_metadata(seqs, &mut tables, &mut row_table, &mut row_len);
    assert_eq!(tables, [9, 7, 3, 5], "appended after what was there");
    assert_eq!(row_table, [1, 1, 3]);
    assert_eq!(row_len, [19, 20, 4]);
}
