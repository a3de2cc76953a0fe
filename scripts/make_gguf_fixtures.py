"""Write GGUF copies of tiny HF fixtures with llama.cpp's own naming (gguf-py's TensorNameMap and
metadata writers), so the GGUF path of each architecture is checked against transformers' logits.

    .venv-ref/bin/python scripts/make_gguf_fixtures.py     # after scripts/make_hf_fixtures.py

For each fixture listed below, writes tests/fixtures/<name>/model-f16.gguf: 2-D weights in F16, norms
in F32 (as llama.cpp's converter stores them), the architecture's hyperparameters, and a byte-level
BPE vocabulary (255 single-byte tokens and one merge) so the file loads as a whole model; the
reference test feeds token ids directly.
"""
import json
import os
import sys

import gguf
import numpy as np
from safetensors.numpy import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")

# fixture folder -> gguf architecture
FIXTURES_ARCH = {
    "tiny-qwen3": gguf.MODEL_ARCH.QWEN3,
    "tiny-phi3": gguf.MODEL_ARCH.PHI3,
    "tiny-gemma2": gguf.MODEL_ARCH.GEMMA2,
    "tiny-gemma3": gguf.MODEL_ARCH.GEMMA3,
    "tiny-mixtral": gguf.MODEL_ARCH.LLAMA,  # llama.cpp writes Mixtral as `llama` with experts
    "tiny-qwen3-moe": gguf.MODEL_ARCH.QWEN3MOE,
}
GEMMA = (gguf.MODEL_ARCH.GEMMA2, gguf.MODEL_ARCH.GEMMA3)


def byte_tokens():
    """GPT-2's printable stand-ins for the 256 bytes (what byte-level BPE vocabularies store)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    table = dict(zip(bs, cs))
    return [chr(table[b]) for b in range(256)]


def permute_llama(w, n_head, n_head_kv=None):
    """llama.cpp's q/k row permutation for `llama`-arch files (interleaved rotary pairs)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def convert(name, arch):
    d = os.path.join(FIXTURES, name)
    cfg = json.load(open(os.path.join(d, "config.json")))
    tensors = load_file(os.path.join(d, "model.safetensors"))
    out = os.path.join(d, "model-f16.gguf")
    w = gguf.GGUFWriter(out, gguf.MODEL_ARCH_NAMES[arch])
    n_layers = cfg["num_hidden_layers"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    w.add_name(name)
    w.add_block_count(n_layers)
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    rope = cfg.get("rope_parameters") or {}
    if "full_attention" in rope:
        # Per layer type (Gemma 3): the file carries the global layers' settings; llama.cpp uses a
        # base of 10000 for the sliding layers.
        rope = rope["full_attention"]
    w.add_rope_freq_base(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    if rope.get("rope_type") == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rope["factor"])
    if arch in GEMMA:
        w.add_sliding_window(cfg["sliding_window"])
        if cfg.get("attn_logit_softcapping"):
            w.add_attn_logit_softcapping(cfg["attn_logit_softcapping"])
        if cfg.get("final_logit_softcapping"):
            w.add_final_logit_softcapping(cfg["final_logit_softcapping"])
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    partial = rope.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
    rot = int(head_dim * partial)
    if rot != head_dim:
        w.add_rope_dimension_count(rot)
    if rope.get("rope_type") == "longrope":
        # As llama.cpp's Phi-3 converter: the factors as tensors, the original context and the
        # attention factor as metadata.
        orig = rope["original_max_position_embeddings"]
        factor = cfg["max_position_embeddings"] / orig
        attn = rope.get("attention_factor") or (1.0 if factor <= 1.0 else (1 + np.log(factor) / np.log(orig)) ** 0.5)
        w.add_rope_scaling_attn_factors(float(attn))
        w.add_rope_scaling_orig_ctx_len(orig)
        w.add_tensor(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FACTORS_LONG] + ".weight", np.array(rope["long_factor"], dtype=np.float32))
        w.add_tensor(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FACTORS_SHORT] + ".weight", np.array(rope["short_factor"], dtype=np.float32))
    # 255 byte tokens plus one merge ("ĠĠ", two spaces) in the last id: BPE files need merges.
    tokens = byte_tokens()[:255] + ["ĠĠ"]
    assert cfg["vocab_size"] == len(tokens), "the byte vocabulary needs vocab_size 256"
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.NORMAL] * len(tokens))
    w.add_token_merges(["Ġ Ġ"])
    w.add_bos_token_id(cfg.get("bos_token_id", 1))
    w.add_eos_token_id(cfg.get("eos_token_id", 2))
    n_experts = cfg.get("num_local_experts") or cfg.get("num_experts") or 0
    if n_experts:
        w.add_expert_count(n_experts)
        w.add_expert_used_count(cfg["num_experts_per_tok"])
        if cfg.get("moe_intermediate_size"):
            w.add_expert_feed_forward_length(cfg["moe_intermediate_size"])
        # Experts are stacked into one [n_experts, rows, cols] tensor per projection.
        kinds = {"w1": "gate", "w3": "up", "w2": "down", "gate_proj": "gate", "up_proj": "up", "down_proj": "down"}
        for layer in range(n_layers):
            for hf_kind, kind in kinds.items():
                keys = [k for k in tensors if k.startswith(f"model.layers.{layer}.") and f".experts.0.{hf_kind}." in k]
                if not keys:
                    continue
                stem = keys[0].split(".experts.0.")[0]
                stack = np.stack([tensors.pop(f"{stem}.experts.{e}.{hf_kind}.weight") for e in range(n_experts)])
                w.add_tensor(f"blk.{layer}.ffn_{kind}_exps.weight", stack.astype(np.float16))
            for router in (f"model.layers.{layer}.block_sparse_moe.gate.weight", f"model.layers.{layer}.mlp.gate.weight"):
                if router in tensors:
                    w.add_tensor(f"blk.{layer}.ffn_gate_inp.weight", tensors.pop(router).astype(np.float16))
    if arch == gguf.MODEL_ARCH.LLAMA:
        for k in list(tensors):
            if k.endswith("self_attn.q_proj.weight"):
                tensors[k] = permute_llama(tensors[k], cfg["num_attention_heads"])
            elif k.endswith("self_attn.k_proj.weight"):
                tensors[k] = permute_llama(tensors[k], cfg["num_attention_heads"], cfg["num_key_value_heads"])
    names = gguf.get_tensor_name_map(arch, n_layers)
    # llama.cpp's qwen3moe has no dense layers; tiny-qwen3-moe's dense layer 1 takes the generic
    # (llama) names, which infer reads for any layer without a router.
    generic = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layers)
    for hf_name, t in sorted(tensors.items()):
        g = names.get_name(hf_name, try_suffixes=(".weight", ".bias")) or generic.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        assert g is not None, f"{name}: no GGUF name for {hf_name}"
        if arch in GEMMA and hf_name.endswith("norm.weight"):
            t = t + 1.0  # llama.cpp's converter stores Gemma's RMSNorm weights as 1 + w
        data = t.astype(np.float16) if t.ndim == 2 else t.astype(np.float32)
        w.add_tensor(g, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    print(f"{out}: {os.path.getsize(out)} bytes, {len(tensors)} tensors")


def main():
    only = set(sys.argv[1:])
    for name, arch in FIXTURES_ARCH.items():
        if not only or name in only:
            convert(name, arch)


if __name__ == "__main__":
    main()
