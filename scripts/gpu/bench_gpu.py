#!/usr/bin/env python3
"""infer on a GPU against the memory roofline and PyTorch, on a Llama-3-8B-shaped model with random
weights (made here with transformers: real shapes, no download).

  python scripts/gpu/bench_gpu.py --infer target-gpu/infer --out OUT_DIR [--tiny] [--device cuda]

Steps (each result goes into OUT_DIR/results.json, a summary into OUT_DIR/summary.md):
  1. device copy bandwidth (torch, read + write bytes / time, median of 20);
  2. the model: LlamaConfig of Llama-3-8B in bf16, random init on the device, save_pretrained, plus a
     word-level tokenizer.json over the same vocabulary (t0, t1, ...) so text maps to known ids;
  3. PyTorch (transformers, eager, bf16): prefill of 512 tokens, batch-1 decode of 128 tokens;
  4. `infer bench --device cuda` on the same folder: bf16, --quantize q8_0, --quantize q4_k
     (pp512, tg128), each as a fraction of the roofline (bandwidth / bytes read per token);
  5. greedy tokens: infer vs PyTorch for the same prompt (bf16);
  6. `infer serve --device cuda` with 16 and 64 concurrent streaming requests: output tokens/s.
--tiny uses a small config (for a dry run of the script on a CPU: --device cpu).
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
TINY = dict(LLAMA3_8B, vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2)


def log(*a):
    print(*a, flush=True)


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


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
    return 2 * n / statistics.median(times[2:])


def make_model(path, cfg_kwargs, dev):
    cfg = LlamaConfig(**cfg_kwargs)
    torch.manual_seed(0)
    with torch.device(dev):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.eval()
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
    return pp, tg


def infer_bench(infer, path, device, extra, tiny):
    p, n = ("64", "16") if tiny else ("512", "128")
    cmd = [infer, "bench", path, "--device", device, "-p", p, "-n", n, "-r", "3", "-o", "json"] + extra
    log("$", " ".join(cmd))
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        log(r.stdout, r.stderr)
        return None
    recs = json.loads(r.stdout)
    return {("pp" if rec["n_prompt"] else "tg"): rec["avg_ts"] for rec in recs}


def greedy_match(infer, path, device, model, dev):
    prompt = " ".join(f"t{i}" for i in (1, 5, 9, 200, 7, 3, 42, 11))
    r = subprocess.run([infer, "run", path, prompt, "--raw", "--temperature", "0", "-n", "16", "--device", device],
                       capture_output=True, text=True)
    ours = r.stdout.split()
    ids = torch.tensor([[int(w[1:]) for w in prompt.split()]], device=dev)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=16, min_new_tokens=16, do_sample=False)
    theirs = [f"t{i}" for i in out[0, ids.shape[1]:].tolist()]
    same = 0
    for a, b in zip(ours, theirs):
        if a != b:
            break
        same += 1
    return {"infer": ours, "torch": theirs, "same_prefix": same, "stderr": r.stderr[-500:]}


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def serve_throughput(infer, path, device, clients, tiny):
    port = free_port()
    srv = subprocess.Popen([infer, "serve", path, "--device", device, "--port", str(port), "--max-seqs", "64"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if urllib.request.urlopen(url + "/health", timeout=1).status == 200:
                    break
            except Exception:
                time.sleep(1)
        model_id = json.loads(urllib.request.urlopen(url + "/v1/models", timeout=10).read())["data"][0]["id"]
        results = {}
        for n in clients:
            toks = []
            max_tokens = 16 if tiny else 128

            def one(i):
                body = json.dumps({"model": model_id, "prompt": " ".join(f"t{(i * 7 + j) % 500}" for j in range(32)),
                                   "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0}).encode()
                req = urllib.request.Request(url + "/v1/completions", body, {"Content-Type": "application/json"})
                try:
                    resp = json.loads(urllib.request.urlopen(req, timeout=600).read())
                    toks.append(resp["usage"]["completion_tokens"])
                except Exception as e:  # counted as no tokens; the error is shown
                    log(f"request {i}: {e}")

            t0 = time.perf_counter()
            threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            results[n] = sum(toks) / (time.perf_counter() - t0)
        return results
    finally:
        srv.terminate()
        srv.wait(timeout=30)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--infer", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--model-dir", default="/tmp/infer-llama3-8b-random")
    ap.add_argument("--skip", default="", help="comma-separated steps to skip: torch,quant,greedy,serve")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    os.makedirs(args.out, exist_ok=True)
    dev = torch.device(args.device)
    res = {"torch": torch.__version__, "transformers": transformers.__version__}
    if dev.type == "cuda":
        res["gpu"] = torch.cuda.get_device_name(0)
    bw = copy_bandwidth(dev, args.tiny)
    res["copy_bandwidth_GBps"] = bw / 1e9
    log(f"copy bandwidth: {bw / 1e9:.0f} GB/s")
    cfg = TINY if args.tiny else LLAMA3_8B
    t0 = time.perf_counter()
    model = make_model(args.model_dir, cfg, dev)
    log(f"model made in {time.perf_counter() - t0:.0f}s")
    n_params = sum(p.numel() for p in model.parameters())
    res["params"] = n_params
    if "torch" not in skip:
        pp, tg = torch_speed(model, dev, cfg["vocab_size"], args.tiny)
        res["torch_bf16"] = {"pp": pp, "tg": tg}
        log(f"torch bf16: pp {pp:.1f} t/s, tg {tg:.1f} t/s")
    if "greedy" not in skip:
        res["greedy"] = greedy_match(args.infer, args.model_dir, args.device, model, dev)
        log("greedy:", res["greedy"])
    del model
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    # Bytes read per decoded token ≈ the weights (+ a small KV cache): the roofline is bandwidth / bytes.
    bytes_per_param = {"bf16": 2.0, "q8_0": 34 / 32, "q4_k": 144 / 256}
    runs = [("bf16", ["--dtype", "bf16"])]
    if "quant" not in skip:
        runs += [("q8_0", ["--dtype", "bf16", "--quantize", "q8_0"]), ("q4_k", ["--dtype", "bf16", "--quantize", "q4_k"])]
    for name, extra in runs:
        r = infer_bench(args.infer, args.model_dir, args.device, extra, args.tiny)
        if r is None:
            res[f"infer_{name}"] = "failed"
            continue
        roof = bw / (n_params * bytes_per_param[name])
        r["roofline_tg"] = roof
        r["tg_fraction_of_roofline"] = r.get("tg", 0) / roof
        res[f"infer_{name}"] = r
        log(f"infer {name}: {r}")
    if "serve" not in skip:
        res["serve_bf16_output_tps"] = serve_throughput(args.infer, args.model_dir, args.device, [16, 64], args.tiny)
        log("serve:", res["serve_bf16_output_tps"])
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(res, f, indent=1)
    lines = ["| what | value |", "|---|---|"]
    for k, v in res.items():
        lines.append(f"| {k} | {json.dumps(v) if isinstance(v, (dict, list)) else v} |")
    with open(os.path.join(args.out, "summary.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    log("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
