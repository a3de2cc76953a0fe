#!/usr/bin/env python3
"""Writes tests/fixtures/kernels/ggml_products.bin: llama.cpp's own dequantization (gguf-py) of the
5-bit and K-quant weight formats, as the reference products for infer-kernels' quantized-matmul test
`repacked_formats_match_ggml_dequantization` (crates/infer-kernels/src/cpu/qmatmul/tests.rs).

The test makes the same weights and activations itself from the same pseudo-random sequence (a
64-bit LCG seeded with 5; every value derived from integers, so Python and Rust agree bit for bit):
random block bytes with sane f16 scales, and activations x. This script dequantizes the weights with
gguf-py (numpy ports of ggml's dequantize_row_* functions, independent of infer) and stores, for each
case and each (token t, row r), the f64 product x_t · w_r and its scale Σ|x_t,k · w_r,k| as f32. The
fixture therefore needs no weights and stays small, and the test runs without candle (so the aarch64
NEON check builds infer-kernels alone).

File layout (little-endian): u32 case count; per case u32 format index (in FORMATS order), rows,
cols, tokens, then tokens × rows pairs (exact, scale) of f32, token-major.

    pip install gguf numpy && python3 scripts/make_kernel_fixtures.py
"""
import struct
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import quants

M64 = (1 << 64) - 1


class Lcg:
    """The test's generator: state = state · a + c (mod 2^64), output = state >> 33."""

    def __init__(self, seed):
        self.s = seed

    def next(self):
        self.s = (self.s * 6364136223846793005 + 1442695040888963407) & M64
        return self.s >> 33


# (gguf type, block bytes, byte offsets of the block's f16 scale fields); the index is the test's.
FORMATS = [
    (T.Q5_0, 22, [0]),
    (T.Q5_1, 24, [0, 2]),
    (T.Q2_K, 84, [80, 82]),
    (T.Q3_K, 110, [108]),
    (T.Q4_K, 144, [0, 2]),
    (T.Q5_K, 176, [0, 2]),
    (T.Q6_K, 210, [208]),
]
# (rows, cols, tokens): fewer rows than a 16-row group, 2 groups and a rest over two super-blocks per
# row, and 37 tokens (two 16-token tiles and a rest).
SHAPES = [(6, 256, 3), (33, 512, 5), (20, 256, 37)]


def block_values(qtype):
    return 32 if qtype in (T.Q5_0, T.Q5_1) else 256


def random_weight(rng, qtype, block_bytes, f16_at, rows, cols):
    raw = bytearray()
    for _ in range(rows * cols // block_values(qtype)):
        block = bytearray(rng.next() & 0xFF for _ in range(block_bytes))
        for off in f16_at:
            d = np.float16((1 + rng.next() % 64) / 1024.0)  # exact in f16
            block[off : off + 2] = d.tobytes()
        raw += block
    return bytes(raw)


def main():
    out = Path(__file__).resolve().parent.parent / "tests/fixtures/kernels/ggml_products.bin"
    out.parent.mkdir(parents=True, exist_ok=True)
    rng = Lcg(5)
    cases = [(shape, f) for shape in SHAPES for f in range(len(FORMATS))]
    data = bytearray(struct.pack("<I", len(cases)))
    for (rows, cols, m), f in cases:
        qtype, bb, f16_at = FORMATS[f]
        raw = random_weight(rng, qtype, bb, f16_at, rows, cols)
        x = np.array([np.float32((rng.next() % 2001) - 1000) / np.float32(500) for _ in range(m * cols)], dtype=np.float32)
        wd = quants.dequantize(np.frombuffer(raw, dtype=np.uint8).reshape(rows, -1), qtype).astype(np.float64)
        assert wd.shape == (rows, cols), wd.shape
        prod = x.astype(np.float64).reshape(m, 1, cols) * wd.reshape(1, rows, cols)
        exact, scale = prod.sum(-1), np.abs(prod).sum(-1)
        data += struct.pack("<4I", f, rows, cols, m)
        data += np.stack([exact, scale], -1).astype("<f4").tobytes()
    out.write_bytes(data)
    print(f"wrote {out} ({len(data)} bytes, {len(cases)} cases)")


if __name__ == "__main__":
    main()
