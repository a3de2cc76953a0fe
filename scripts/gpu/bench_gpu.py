#!/usr/bin/env python3
"""infer on a GPU against the memory roofline and PyTorch, on Llama-3.2-1B- and Llama-3-8B-shaped models
with random weights (made here with transformers: real shapes, no download).

  python scripts/gpu/bench_gpu.py --infer target-gpu/infer --out OUT_DIR [--budget S] [--tiny] [--device cuda]

Device time is scarce, so every step has a time cap, the whole script a budget (steps that would not fit
are recorded as skipped), and OUT_DIR/results.json is rewritten after every step: a run cut short still
brings back what it measured. Steps:
  1. device copy bandwidth (torch, read + write bytes / time, median of 20);
  2. 1B shape: the model (LlamaConfig, bf16, random init with a wider spread so greedy choices are not
     near-ties, save_pretrained, plus a word-level tokenizer.json over the same vocabulary: t0, t1, ...);
     greedy tokens of infer on the GPU (bf16, and f32, which tells bf16 rounding from a wrong result)
     vs PyTorch vs infer on the CPU; `infer bench` bf16 (pp512, tg128); PyTorch eager prefill / decode;
  3. 8B shape: the same, without the CPU and f32 runs; then `infer serve` with 16 and 64 concurrent streaming
     clients, then `infer bench --quantize q8_0` and `q4_k` (in-situ quantization at load).
Each decode speed is also given as a fraction of the roofline (copy bandwidth / bytes of weights).
--tiny uses small configs (a dry run of the script on a CPU: --device cpu).
"""
import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
import traceback
import urllib.request

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

LLAMA3_8B = dict(
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    max_position_embeddings=8192,
    rope_theta=500000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)
LLAMA32_1B = dict(LLAMA3_8B, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                  num_key_value_heads=8, tie_word_embeddings=True)
TINY = dict(LLAMA3_8B, vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2)
TINY2 = dict(TINY, hidden_size=128, tie_word_embeddings=True)

# Bytes read per decoded token ≈ the weights (+ a small KV cache): the roofline is bandwidth / bytes.
BYTES_PER_PARAM = {"bf16": 2.0, "q8_0": 34 / 32, "q4_k": 144 / 256}


def log(*a):
    print(*a, flush=True)


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


class Session:
    """Results, the time left, and a step runner that records failures instead of stopping."""

    def __init__(self, out, budget):
        self.out = out
        self.res = {}
        self.deadline = time.time() + budget

    def left(self):
        return self.deadline - time.time()

    def save(self):
        with open(os.path.join(self.out, "results.json"), "w") as f:
            json.dump(self.res, f, indent=1)

    def step(self, name, need, fn):
        """Runs fn(cap) where cap is the time it may take; skips it when fewer than `need` seconds are left."""
        left = self.left()
        if left < need:
            self.res[name] = f"skipped: {left:.0f}s left, needs {need}s"
            log(f"== {name}: {self.res[name]}")
            self.save()
            return None
        log(f"== {name} ({left:.0f}s left)")
        t0 = time.time()
        try:
            r = fn(left)
        except Exception as e:
            traceback.print_exc()
            r = f"error: {type(e).__name__}: {e}"[:2000]
        self.res[name] = r
        self.res.setdefault("step_seconds", {})[name] = round(time.time() - t0, 1)
        log(f"-> {name}: {json.dumps(r)[:3000]}")
        self.save()
        return r


def copy_bandwidth(dev, tiny):
    n = (64 << 20) if tiny else (2 << 30)
    src = torch.empty(n, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    times = []
    for _ in range(20):
        sync(dev)
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(dev)
        times.append(time.perf_counter() - t0)
    del src, dst
    return 2 * n / statistics.median(times[2:])


def make_model(path, cfg_kwargs, dev):
    # initializer_range 0.02 (the default) makes a random model's logits nearly flat, so two correct
    # bf16 implementations disagree on near-ties within a few tokens; a wider spread separates them.
    cfg = LlamaConfig(**cfg_kwargs, initializer_range=0.06)
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(dev):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    model = model.to(torch.bfloat16).eval()
    model.save_pretrained(path, safe_serialization=True)
    from tokenizers import Tokenizer, models, pre_tokenizers
    vocab = {f"t{i}": i for i in range(cfg.vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(os.path.join(path, "tokenizer.json"))
    return model


def torch_speed(model, dev, vocab, tiny):
    p = 64 if tiny else 512
    ids = torch.randint(0, vocab, (1, p), device=dev)
    with torch.no_grad():
        model(ids)  # warm-up
        times = []
        for _ in range(3):
            sync(dev)
            t0 = time.perf_counter()
            model(ids)
            sync(dev)
            times.append(time.perf_counter() - t0)
        pp = p / statistics.median(times)
        n = 16 if tiny else 128
        prompt = ids[:, :16]
        model.generate(prompt, max_new_tokens=4, min_new_tokens=4, do_sample=False)
        sync(dev)
        t0 = time.perf_counter()
        model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        sync(dev)
        tg = n / (time.perf_counter() - t0)
    return {"pp": pp, "tg": tg}


def run_cmd(cmd, cap, env=None):
    log("$", " ".join(cmd), env or "")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=cap, env={**os.environ, **(env or {})})
    if r.returncode != 0:
        raise RuntimeError(f"exit {r.returncode}: {(r.stderr or r.stdout)[-1500:]}")
    return r


def roofline_tg(bw, n_params, kind):
    """Decode tokens/s at the memory roofline: bandwidth ÷ bytes of weights per token (None without
    a measured bandwidth)."""
    return bw / (n_params * BYTES_PER_PARAM[kind]) if bw else None


def infer_depths(infer, path, device, tiny, cap, n_params, bw):
    """Decode speed (bf16) after 0, 1024 and 4096 tokens of context: what attention costs as the
    context grows (tg at depth 0 is what the roofline speaks of)."""
    depths = "0,64,256" if tiny else "0,1024,4096"
    r = run_cmd([infer, "bench", path, "--device", device, "--dtype", "bf16", "-p", "0", "-n", "32", "-r", "2",
                 "-d", depths, "-o", "json"], cap)
    roof = roofline_tg(bw, n_params, "bf16")
    return {str(rec["n_depth"]): {"tg": rec["avg_ts"], "tg_fraction_of_roofline": rec["avg_ts"] / roof if roof else None}
            for rec in json.loads(r.stdout)}


def infer_bench(infer, path, device, extra, tiny, cap, n_params, bw, kind, env=None):
    p, n = ("64", "16") if tiny else ("512", "128")
    r = run_cmd([infer, "bench", path, "--device", device, "-p", p, "-n", n, "-r", "3", "-o", "json"] + extra, cap, env)
    out = {}
    for rec in json.loads(r.stdout):
        out["pp" if rec["n_prompt"] else "tg"] = rec["avg_ts"]
    roof = roofline_tg(bw, n_params, kind)
    out["roofline_tg"] = roof
    out["tg_fraction_of_roofline"] = out.get("tg", 0) / roof if roof else None
    out["stderr"] = r.stderr[-400:]
    return out


PROMPT = " ".join(f"t{i}" for i in (1, 5, 9, 200, 7, 3, 42, 11))


def torch_greedy(model, dev, n=16):
    ids = torch.tensor([[int(w[1:]) for w in PROMPT.split()]], device=dev)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return [f"t{i}" for i in out[0, ids.shape[1]:].tolist()]


def infer_greedy(infer, path, device, cap, n=16, extra=()):
    r = run_cmd([infer, "run", path, PROMPT, "--raw", "--temperature", "0", "-n", str(n), "--device", device, *extra], cap)
    return r.stdout.split()


def same_prefix(a, b):
    k = 0
    for x, y in zip(a, b):
        if x != y:
            break
        k += 1
    return k


def divergence(model, dev, ours, theirs):
    """Where our greedy tokens first differ from PyTorch's, both choices' logits there: in f32 (an f32
    copy of the model) and in PyTorch's bf16. A gap of a few hundredths is a near-tie that bf16
    rounding may flip either way; a gap of whole units means a wrong result."""
    k = same_prefix(ours, theirs)
    if k >= min(len(ours), len(theirs)):
        return {"diverges_at": None}
    import copy
    ids = torch.tensor([[int(w[1:]) for w in PROMPT.split()] + [int(w[1:]) for w in theirs[:k]]], device=dev)
    a, b = int(theirs[k][1:]), int(ours[k][1:])
    with torch.no_grad():
        lb = model(ids).logits[0, -1].float()
        m32 = copy.deepcopy(model).float()
        lf = m32(ids).logits[0, -1]
        del m32
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    top = torch.topk(lf, 5)
    return {"diverges_at": k, "torch_choice": a, "our_choice": b,
            "f32_logits": [lf[a].item(), lf[b].item()], "f32_gap": (lf[a] - lf[b]).item(),
            "bf16_logits": [lb[a].item(), lb[b].item()],
            "f32_top5": [[i, v] for i, v in zip(top.indices.tolist(), top.values.tolist())]}


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def serve_throughput(infer, path, device, clients, tiny, cap, out_dir):
    end = time.time() + cap
    port = free_port()
    errlog = open(os.path.join(out_dir, "serve.log"), "w")
    srv = subprocess.Popen([infer, "serve", path, "--device", device, "--port", str(port), "--max-seqs", "64"],
                           stdout=errlog, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            if srv.poll() is not None:
                raise RuntimeError(f"server exited with {srv.returncode} (serve.log)")
            if time.time() > end:
                raise RuntimeError("server not ready in time")
            try:
                if urllib.request.urlopen(url + "/health", timeout=1).status == 200:
                    break
            except Exception:
                time.sleep(0.5)
        model_id = json.loads(urllib.request.urlopen(url + "/v1/models", timeout=10).read())["data"][0]["id"]
        results = {}
        for n in clients:
            toks, errors = [], []
            max_tokens = 16 if tiny else 128

            def one(i):
                body = json.dumps({"model": model_id, "prompt": " ".join(f"t{(i * 7 + j) % 500}" for j in range(32)),
                                   "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0}).encode()
                req = urllib.request.Request(url + "/v1/completions", body, {"Content-Type": "application/json"})
                try:
                    resp = json.loads(urllib.request.urlopen(req, timeout=max(1, end - time.time())).read())
                    toks.append(resp["usage"]["completion_tokens"])
                except Exception as e:  # counted as no tokens; the error is shown
                    errors.append(f"request {i}: {e}")

            t0 = time.perf_counter()
            threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(n)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(max(0.1, end - time.time()))
            dt = time.perf_counter() - t0
            results[n] = {"output_tps": sum(toks) / dt, "done": len(toks), "seconds": dt, "errors": errors[:3]}
            log(f"serve {n} clients: {results[n]}")
            if time.time() > end:
                break
        return results
    finally:
        srv.terminate()
        try:
            srv.wait(timeout=20)
        except subprocess.TimeoutExpired:
            srv.kill()
        errlog.close()


def shape_steps(s, args, dev, tag, cfg, cpu_greedy, serve):
    """The steps for one model shape, keyed `tag.*` in the results."""
    path = os.path.join(args.model_dir, tag)
    bw = s.res.get("copy_bandwidth_GBps", 0) * 1e9
    held = {}

    def make(cap):
        held["model"] = make_model(path, cfg, dev)
        return "ok"

    if s.step(f"{tag}.make", 60, make) != "ok":
        return
    model = held.pop("model")
    n_params = sum(p.numel() for p in model.parameters())
    s.res[f"{tag}.params"] = n_params
    theirs = s.step(f"{tag}.torch_greedy", 20, lambda cap: torch_greedy(model, dev))
    ours = s.step(f"{tag}.infer_greedy_gpu", 30, lambda cap: infer_greedy(args.infer, path, args.device, min(cap, 180)))
    if isinstance(theirs, list) and isinstance(ours, list):
        s.res[f"{tag}.greedy_same_prefix_gpu_vs_torch"] = same_prefix(ours, theirs)
        s.step(f"{tag}.greedy_divergence", 20, lambda cap: divergence(model, dev, ours, theirs))
    if cpu_greedy and "cpugreedy" not in args.skip_set:
        # The same weights computed in f32 on the GPU: tells bf16 rounding from a wrong result.
        f32 = s.step(f"{tag}.infer_greedy_gpu_f32", 30,
                     lambda cap: infer_greedy(args.infer, path, args.device, min(cap, 180), extra=("--dtype", "f32")))
        if isinstance(theirs, list) and isinstance(f32, list):
            s.res[f"{tag}.greedy_same_prefix_gpu_f32_vs_torch"] = same_prefix(f32, theirs)
        cpu = s.step(f"{tag}.infer_greedy_cpu", 60, lambda cap: infer_greedy(args.infer, path, "cpu", min(cap, 240)))
        if isinstance(cpu, list) and isinstance(ours, list):
            s.res[f"{tag}.greedy_same_prefix_gpu_vs_cpu"] = same_prefix(ours, cpu)
    s.step(f"{tag}.infer_bf16", 40, lambda cap: infer_bench(args.infer, path, args.device, ["--dtype", "bf16"], args.tiny,
                                                            min(cap, 200), n_params, bw, "bf16"))
    # The same with the CUDA decode step off (candle ops and cuBLAS for every step), with its norms
    # unfused, without CUDA graphs, without programmatic dependent launches: what each buys; then
    # decode at longer contexts.
    for name, env in (("tensor_path", {"INFER_TENSOR_PATH": "1"}), ("unfused", {"INFER_CUDA_UNFUSED": "1"}),
                      ("no_graph", {"INFER_CUDA_GRAPH": "0"}), ("no_pdl", {"INFER_CUDA_PDL": "0"})):
        s.step(f"{tag}.infer_bf16_{name}", 40,
               lambda cap, env=env: infer_bench(args.infer, path, args.device, ["--dtype", "bf16"], args.tiny, min(cap, 200),
                                                n_params, bw, "bf16", env=env))
    s.step(f"{tag}.infer_bf16_depths", 40, lambda cap: infer_depths(args.infer, path, args.device, args.tiny, min(cap, 120),
                                                                    n_params, bw))
    r = None
    if "torch" not in args.skip_set:
        r = s.step(f"{tag}.torch_bf16", 20, lambda cap: torch_speed(model, dev, cfg["vocab_size"], args.tiny))
    roof = roofline_tg(bw, n_params, "bf16")
    if isinstance(r, dict) and roof:
        r["tg_fraction_of_roofline"] = r["tg"] / roof
    del model
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    if serve:
        s.step(f"{tag}.serve_bf16", 60, lambda cap: serve_throughput(args.infer, path, args.device, [16, 64], args.tiny,
                                                                     min(cap, 150), args.out))
    if "quant" not in args.skip_set:
        for q in ("q8_0", "q4_k"):
            s.step(f"{tag}.infer_{q}", 60, lambda cap, q=q: infer_bench(args.infer, path, args.device,
                                                                         ["--dtype", "bf16", "--quantize", q], args.tiny,
                                                                         min(cap, 150), n_params, bw, q))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--infer", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--budget", type=float, default=420, help="seconds for the whole script")
    ap.add_argument("--model-dir", default="/tmp/infer-gpu-models")
    ap.add_argument("--skip", default="", help="comma-separated: 1b,8b,quant,serve,torch (its speed), cpugreedy (the f32 GPU and CPU greedy runs)")
    args = ap.parse_args()
    args.skip_set = set(filter(None, args.skip.split(",")))
    os.makedirs(args.out, exist_ok=True)
    os.makedirs(args.model_dir, exist_ok=True)
    dev = torch.device(args.device)
    s = Session(args.out, args.budget)
    s.res.update({"torch": torch.__version__, "transformers": transformers.__version__})
    if dev.type == "cuda":
        s.res["gpu"] = torch.cuda.get_device_name(0)
    bw = s.step("copy_bandwidth_GBps", 5, lambda cap: copy_bandwidth(dev, args.tiny) / 1e9)
    if not isinstance(bw, float):
        s.res["copy_bandwidth_GBps"] = 0
    if "1b" not in args.skip_set:
        shape_steps(s, args, dev, "1b", TINY2 if args.tiny else LLAMA32_1B, cpu_greedy=True, serve=False)
    if "8b" not in args.skip_set:
        shape_steps(s, args, dev, "8b", TINY if args.tiny else LLAMA3_8B, cpu_greedy=False,
                    serve="serve" not in args.skip_set)
    s.save()
    lines = ["| what | value |", "|---|---|"]
    for k, v in s.res.items():
        lines.append(f"| {k} | {json.dumps(v) if isinstance(v, (dict, list)) else v} |")
    with open(os.path.join(args.out, "summary.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    log("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
