"""Generate tiny random-weight HF transformers reference fixtures for the Rust tests.

Run from the repository root (optionally naming the fixtures to regenerate, e.g. `tiny-qwen3`):

    python -m venv .venv-ref && .venv-ref/bin/pip install torch transformers numpy && .venv-ref/bin/python scripts/make_hf_fixtures.py

(`scripts/requirements-ref.txt` lists the packages.) Writes, for each of tiny-llama, tiny-mistral,
tiny-qwen2, tiny-qwen3, tiny-phi3, tiny-gemma2, tiny-gemma3, tiny-mixtral and tiny-qwen3-moe, a
folder `tests/fixtures/tiny-<name>/` holding:

  config.json        HF config (model_type, architectures, ...). Besides the transformers-v5 style
                     `rope_parameters`, the legacy top-level `rope_theta` (and `rope_scaling` for llama)
                     are written too, so loaders that know either layout read the same values.
  model.safetensors  float32 weights, written by `save_pretrained(safe_serialization=True)`.
  expected.json      {"prompts", "continuations", "prefill_logits", "decode_logits"}: the logits
                     transformers computes (eager attention, float32, CPU) for 4 ragged prompts plus
                     3 continuation tokens each. decode_logits[p][j] are the logits at the position of
                     continuations[p][j], i.e. after feeding prompt + continuation[:j+1].

Everything is seeded, so re-running reproduces the same files (up to torch/transformers versions).
The weights are drawn with std 0.2 (not the default 0.02) and RMSNorm weights as 1 + 0.1*randn, Qwen2's
q/k/v biases as 0.5*randn, so the logits have a spread of a few units and every parameter matters.
"""

import inspect
import json
import os
import shutil
import sys

import numpy as np
import torch
import transformers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    MixtralConfig,
    MixtralForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")

PROMPT_LENS = [5, 11, 3, 8]
N_CONT = 3
VOCAB = 256
INIT_STD = 0.2
NORM_STD = 0.1
BIAS_STD = 0.5

COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    rms_norm_eps=1e-5,
    initializer_range=INIT_STD,
    hidden_act="silu",
)

LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}

MODELS = [
    dict(
        name="tiny-llama",
        seed=1001,
        config_cls=LlamaConfig,
        model_cls=LlamaForCausalLM,
        kwargs=dict(
            COMMON,
            head_dim=16,
            rope_theta=10000.0,
            rope_scaling=dict(LLAMA3_SCALING),
            tie_word_embeddings=False,
            bos_token_id=1,
            eos_token_id=2,
        ),
        legacy={"rope_theta": 10000.0, "rope_scaling": dict(LLAMA3_SCALING)},
    ),
    dict(
        name="tiny-mistral",
        seed=2002,
        config_cls=MistralConfig,
        model_cls=MistralForCausalLM,
        kwargs=dict(
            COMMON,
            head_dim=16,
            rope_theta=10000.0,
            sliding_window=4,
            tie_word_embeddings=False,
            bos_token_id=1,
            eos_token_id=2,
        ),
        legacy={"rope_theta": 10000.0},
        required={"sliding_window": 4},
    ),
    dict(
        name="tiny-qwen2",
        seed=3003,
        config_cls=Qwen2Config,
        model_cls=Qwen2ForCausalLM,
        kwargs=dict(
            COMMON,
            rope_theta=1000000.0,
            use_sliding_window=False,
            sliding_window=None,
            max_window_layers=2,
            tie_word_embeddings=True,
            bos_token_id=1,
            eos_token_id=2,
        ),
        legacy={"rope_theta": 1000000.0},
        required={"tie_word_embeddings": True},
    ),
    dict(
        name="tiny-qwen3",
        seed=4004,
        config_cls=Qwen3Config,
        model_cls=Qwen3ForCausalLM,
        kwargs=dict(
            COMMON,
            # head_dim differs from hidden_size / heads (16), as in the real Qwen3 models.
            head_dim=32,
            rope_theta=1000000.0,
            attention_bias=False,
            use_sliding_window=False,
            sliding_window=None,
            max_window_layers=2,
            tie_word_embeddings=False,
            bos_token_id=1,
            eos_token_id=2,
        ),
        legacy={"rope_theta": 1000000.0},
        required={"head_dim": 32},
    ),
    dict(
        name="tiny-phi3",
        seed=5005,
        config_cls=Phi3Config,
        model_cls=Phi3ForCausalLM,
        kwargs=dict(
            COMMON,
            rope_theta=10000.0,
            # Half of each 16-wide head rotates (Phi-4-mini style), with LongRoPE factors for those
            # 8 dimensions; every position of the fixture is below original_max_position_embeddings,
            # so the short factors apply (and the attention factor sqrt(1 + ln 2 / ln 64)).
            partial_rotary_factor=0.5,
            original_max_position_embeddings=64,
            rope_scaling={"rope_type": "longrope", "short_factor": [1.0, 1.3, 1.7, 2.5], "long_factor": [2.0, 3.0, 5.0, 8.0]},
            sliding_window=None,
            tie_word_embeddings=False,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        ),
        legacy={"rope_theta": 10000.0},
        required={"original_max_position_embeddings": 64},
    ),
    dict(
        name="tiny-gemma2",
        seed=6006,
        config_cls=Gemma2Config,
        model_cls=Gemma2ForCausalLM,
        kwargs=dict(
            COMMON,
            head_dim=16,
            hidden_activation="gelu_pytorch_tanh",
            rope_theta=10000.0,
            # Layer 0 slides over 4 tokens, layer 1 is global; strong soft-caps so they matter.
            sliding_window=4,
            attn_logit_softcapping=4.0,
            final_logit_softcapping=5.0,
            # = head_dim, as in Gemma 2 2B/9B (what llama.cpp assumes for GGUF files).
            query_pre_attn_scalar=16,
            tie_word_embeddings=True,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        ),
        legacy={"rope_theta": 10000.0},
        required={"final_logit_softcapping": 5.0},
    ),
    dict(
        name="tiny-gemma3",
        seed=7007,
        config_cls=Gemma3TextConfig,
        model_cls=Gemma3ForCausalLM,
        kwargs=dict(
            COMMON,
            # Six layers: five sliding (window 4, rotary base 1e4) then one global (base 1e6 with
            # linear scaling 8), Gemma 3's pattern; a narrower MLP keeps the file small.
            num_hidden_layers=6,
            intermediate_size=64,
            head_dim=16,
            hidden_activation="gelu_pytorch_tanh",
            sliding_window=4,
            query_pre_attn_scalar=16,
            rope_parameters={
                "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            },
            tie_word_embeddings=True,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        ),
        required={"model_type": "gemma3_text"},
    ),
    dict(
        name="tiny-mixtral",
        seed=8008,
        config_cls=MixtralConfig,
        model_cls=MixtralForCausalLM,
        kwargs=dict(
            COMMON,
            # Four SwiGLU experts of 64, two per token.
            intermediate_size=64,
            num_local_experts=4,
            num_experts_per_tok=2,
            head_dim=16,
            rope_theta=1000000.0,
            sliding_window=None,
            tie_word_embeddings=False,
            bos_token_id=1,
            eos_token_id=2,
        ),
        legacy={"rope_theta": 1000000.0},
        required={"num_local_experts": 4},
    ),
    dict(
        name="tiny-qwen3-moe",
        seed=9009,
        config_cls=Qwen3MoeConfig,
        model_cls=Qwen3MoeForCausalLM,
        kwargs=dict(
            COMMON,
            # Layer 0: four experts of 32, two per token, weights renormalized; layer 1 dense (64).
            intermediate_size=64,
            moe_intermediate_size=32,
            num_experts=4,
            num_experts_per_tok=2,
            norm_topk_prob=True,
            mlp_only_layers=[1],
            head_dim=16,
            rope_theta=1000000.0,
            use_sliding_window=False,
            sliding_window=None,
            max_window_layers=2,
            tie_word_embeddings=False,
            bos_token_id=1,
            eos_token_id=2,
        ),
        legacy={"rope_theta": 1000000.0},
        required={"mlp_only_layers": [1]},
    ),
]


def dtype_kwarg():
    """transformers v5 renamed `torch_dtype` to `dtype`."""
    params = inspect.signature(transformers.PreTrainedModel.from_pretrained).parameters
    if "dtype" in params or int(transformers.__version__.split(".")[0]) >= 5:
        return {"dtype": torch.float32}
    return {"torch_dtype": torch.float32}


def f32_list(t):
    """Shortest decimal strings that round-trip to the exact float32 values."""
    return [float(str(np.float32(x))) for x in t.detach().cpu().numpy().astype(np.float32)]


@torch.no_grad()
def randomize(model):
    """Make every parameter matter: RMSNorm weights ~ 1 + 0.1 N(0,1), biases ~ 0.5 N(0,1)."""
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.copy_(1.0 + NORM_STD * torch.randn_like(p))
        elif name.endswith(".bias"):
            p.copy_(BIAS_STD * torch.randn_like(p))
        elif p.dim() == 2 and name.endswith(".weight"):
            # _init_weights already used initializer_range; redo it explicitly so the result does
            # not depend on the version's init code paths.
            p.copy_(INIT_STD * torch.randn_like(p))


@torch.no_grad()
def build(spec, out_dir):
    torch.manual_seed(spec["seed"])
    config = spec["config_cls"](**spec["kwargs"], attn_implementation="eager")
    config.architectures = [spec["model_cls"].__name__]
    model = spec["model_cls"](config).to(torch.float32)
    randomize(model)
    if config.tie_word_embeddings:
        model.tie_weights()
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    if os.path.isdir(out_dir):
        shutil.rmtree(out_dir)
    model.save_pretrained(out_dir, safe_serialization=True)
    # Only config.json and model.safetensors are part of the fixture.
    for f in os.listdir(out_dir):
        if f not in ("config.json", "model.safetensors"):
            os.remove(os.path.join(out_dir, f))

    # Post-process config.json: add legacy rope keys next to v5's rope_parameters.
    cfg_path = os.path.join(out_dir, "config.json")
    with open(cfg_path) as fh:
        cfg = json.load(fh)
    for k, v in spec.get("legacy", {}).items():
        cfg.setdefault(k, v)
    cfg["torch_dtype"] = "float32"
    cfg.setdefault("dtype", "float32")
    with open(cfg_path, "w") as fh:
        json.dump(cfg, fh, indent=2, sort_keys=True)
        fh.write("\n")
    for k in ("model_type", "architectures"):
        assert k in cfg, (spec["name"], k)
    for k, v in spec.get("required", {}).items():
        assert cfg.get(k) == v, (spec["name"], k, cfg.get(k))
    return model


@torch.no_grad()
def reference(model_dir, seed):
    model = transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, attn_implementation="eager", **dtype_kwarg()
    )
    model.eval()

    g = torch.Generator().manual_seed(seed + 7)
    prompts = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in PROMPT_LENS]
    conts = [torch.randint(3, VOCAB, (N_CONT,), generator=g).tolist() for _ in PROMPT_LENS]

    prefill, decode, all_full = [], [], []
    max_cache_diff = 0.0
    for prompt, cont in zip(prompts, conts):
        ids = torch.tensor([prompt + cont])
        full = model(ids, use_cache=False).logits[0].float()  # [len, vocab]
        n = len(prompt)
        prefill.append([f32_list(row) for row in full[:n]])
        decode.append([f32_list(row) for row in full[n:]])
        all_full.append(full)

        # Sanity check: incremental decoding with the KV cache must match the full run.
        out = model(torch.tensor([prompt]), use_cache=True)
        pieces = [out.logits[0]]
        past = out.past_key_values
        for tok in cont:
            out = model(torch.tensor([[tok]]), past_key_values=past, use_cache=True)
            past = out.past_key_values
            pieces.append(out.logits[0])
        inc = torch.cat(pieces, 0).float()
        max_cache_diff = max(max_cache_diff, (inc - full).abs().max().item())

    assert max_cache_diff < 5e-5, f"cached vs full mismatch: {max_cache_diff}"
    stacked = torch.cat(all_full, 0)
    stats = dict(
        std=stacked.std().item(),
        min=stacked.min().item(),
        max=stacked.max().item(),
        max_cache_diff=max_cache_diff,
    )
    expected = {
        "prompts": prompts,
        "continuations": conts,
        "prefill_logits": prefill,
        "decode_logits": decode,
    }
    return model, expected, stats


def main():
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, numpy {np.__version__}")
    torch.set_num_threads(1)  # deterministic reductions
    os.makedirs(FIXTURES, exist_ok=True)
    # `make_hf_fixtures.py tiny-qwen3 ...` regenerates only the named fixtures.
    only = set(sys.argv[1:])
    for spec in MODELS:
        if only and spec["name"] not in only:
            continue
        out_dir = os.path.join(FIXTURES, spec["name"])
        orig = build(spec, out_dir)
        model, expected, stats = reference(out_dir, spec["seed"])

        # The reloaded model (which read the post-processed config.json) must equal the in-memory one.
        with torch.no_grad():
            ids = torch.tensor([expected["prompts"][1] + expected["continuations"][1]])
            d = (orig.eval()(ids).logits - model(ids).logits).abs().max().item()
        assert d == 0.0, f"{spec['name']}: reloaded model differs by {d}"

        with open(os.path.join(out_dir, "expected.json"), "w") as fh:
            json.dump(expected, fh, separators=(",", ":"))
            fh.write("\n")
        n_params = sum(p.numel() for p in model.parameters())
        print(
            f"{spec['name']}: params={n_params} logits std={stats['std']:.3f} "
            f"range=[{stats['min']:.2f}, {stats['max']:.2f}] "
            f"max|cached - full|={stats['max_cache_diff']:.3e}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
