#!/usr/bin/env python3
"""Speculative decoding side by side: `infer serve` and llama.cpp's `llama-server`, each without and with
prompt lookup (infer: --draft ngram; llama.cpp: --spec-type ngram-simple / ngram-mod / ngram-cache), on
the same GGUF, threads and prompts, one server at a time. Each prompt is sent greedy (temperature 0)
over the OpenAI chat API with streaming; the generation rate is (tokens - 1) / (last token time - first
token time), measured by this client for every server alike. Prompts with the document in them
(copy, code edit, extraction) and without (open questions) are reported apart. Medians of R rounds.

  python scripts/bench_spec.py MODEL.gguf [--infer target/release/infer] [--llama-server PATH] [-t 2] [-n 192] [-r 3]

llama-server comes from scripts/build-llamacpp.sh (~/.cache/infer/llamacpp/bin/llama-server).
"""
import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request

DOC = (
    "The Great Barrier Reef is the world's largest coral reef system, composed of over 2,900 individual reefs and 900 "
    "islands stretching for over 2,300 kilometres over an area of approximately 344,400 square kilometres. The reef is "
    "located in the Coral Sea, off the coast of Queensland, Australia. The Great Barrier Reef can be seen from outer "
    "space and is the world's biggest single structure made by living organisms. This reef structure is composed of and "
    "built by billions of tiny organisms, known as coral polyps. It supports a wide diversity of life and was selected "
    "as a World Heritage Site in 1981. CNN labelled it one of the seven natural wonders of the world in 1997. Australian "
    "World Heritage places included it in its list in 2007. The Queensland National Trust named it a state icon of "
    "Queensland in 2006."
)

CODE = '''import json


def load_config(path):
    with open(path) as f:
        config = json.load(f)
    if "name" not in config:
        raise ValueError("config has no name")
    return config


def save_config(path, config):
    with open(path, "w") as f:
        json.dump(config, f, indent=2)


def merge_configs(base, override):
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_configs(merged[key], value)
        else:
            merged[key] = value
    return merged
'''

GROUNDED = [
    ("copy", f"Repeat the following text exactly, word for word:\n\n{DOC}"),
    ("code edit", f"Rename the function `load_config` to `read_config` in this code. Answer with the whole code.\n\n```python\n{CODE}```"),
    ("extract", f"Copy every sentence of the following text that contains a year, one per line:\n\n{DOC}"),
    ("rewrite", f"Rewrite the following text with British spelling and fix nothing else:\n\n{DOC}"),
]
OPEN = [
    ("story", "Write a short story about a robot who learns to paint."),
    ("explain", "Explain how a refrigerator works, step by step."),
]


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wait_ready(url, proc, timeout=180):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except Exception:
            pass
        time.sleep(0.3)
    raise RuntimeError("server not ready")


def stream(url, prompt, n):
    body = {"model": "m", "messages": [{"role": "user", "content": prompt}], "temperature": 0, "max_tokens": n,
            "stream": True, "stream_options": {"include_usage": True}}
    req = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    first = last = None
    chunks = 0
    usage = None
    text = []
    with urllib.request.urlopen(req, timeout=600) as r:
        for line in r:
            line = line.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            ev = json.loads(line[6:])
            if ev.get("usage"):
                usage = ev["usage"]
            for ch in ev.get("choices", []):
                piece = (ch.get("delta") or {}).get("content")
                if piece:
                    now = time.perf_counter()
                    first = first or now
                    last = now
                    chunks += 1
                    text.append(piece)
    tokens = usage["completion_tokens"] if usage else chunks
    return tokens, first, last, "".join(text)


def run_server(cmd, url, prompts, n, rounds, threads_env):
    env = dict(os.environ, **threads_env)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        wait_ready(url, proc)
        stream(url, "Hello", 8)  # warm-up
        rates = {name: [] for name, _ in prompts}
        texts = {}
        for _ in range(rounds):
            for name, p in prompts:
                tokens, first, last, text = stream(url, p, n)
                if first is None or last <= first or tokens < 2:
                    continue
                rates[name].append((tokens - 1) / (last - first))
                texts[name] = text
        return {k: statistics.median(v) for k, v in rates.items() if v}, texts
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--infer", default=os.path.join(os.environ.get("CARGO_TARGET_DIR", "target"), "release", "infer"))
    ap.add_argument("--llama-server", default=os.path.expanduser("~/.cache/infer/llamacpp/bin/llama-server"))
    ap.add_argument("-t", type=int, default=2)
    ap.add_argument("-n", type=int, default=192)
    ap.add_argument("-r", type=int, default=3)
    ap.add_argument("--draft-max", type=int, default=8)
    ap.add_argument("--json", help="write the results here")
    a = ap.parse_args()
    prompts = GROUNDED + OPEN
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    lcpp = [a.llama_server, "-m", a.model, "-t", str(a.t), "-tb", str(a.t), "-np", "1", "-c", "4096", "--port", str(port),
            "--no-webui", "--jinja"]
    inf = [a.infer, "serve", a.model, "-t", str(a.t), "-c", "4096", "--max-seqs", "1", "--port", str(port), "--served-model-name", "m"]
    n = str(a.draft_max)
    configs = [
        ("llama.cpp", lcpp),
        ("llama.cpp ngram-simple", lcpp + ["--spec-type", "ngram-simple", "--spec-draft-n-max", n]),
        ("llama.cpp ngram-mod", lcpp + ["--spec-default"]),
        ("llama.cpp ngram-cache", lcpp + ["--spec-type", "ngram-cache", "--spec-draft-n-max", n]),
        ("infer", inf),
        ("infer --draft ngram", inf + ["--draft", "ngram", "--draft-max", n]),
    ]
    results, texts = {}, {}
    for name, cmd in configs:
        print(f"running {name} ...", file=sys.stderr)
        try:
            results[name], texts[name] = run_server(cmd, url, prompts, a.n, a.r, {})
        except Exception as e:
            print(f"  {name} failed: {e}", file=sys.stderr)
    names = [c[0] for c in configs if c[0] in results]
    print(f"\n{a.model}, {a.t} threads, greedy, {a.n} tokens, median of {a.r}; generation t/s (client-side)\n")
    print("| prompt | " + " | ".join(names) + " |")
    print("|---" * (len(names) + 1) + "|")
    for pname, _ in prompts:
        print(f"| {pname} | " + " | ".join(f"{results[nm].get(pname, float('nan')):.1f}" for nm in names) + " |")
    for nm in ["infer", "infer --draft ngram"]:
        if nm in texts and "infer" in texts:
            same = sum(texts[nm].get(p) == texts["infer"].get(p) for p, _ in prompts)
            print(f"{nm}: {same}/{len(prompts)} answers identical to infer without drafts", file=sys.stderr)

    def gm(xs):
        xs = [x for x in xs if x == x]
        return statistics.geometric_mean(xs) if xs else float("nan")

    print()
    for group, ps in (("with the document", GROUNDED), ("open questions", OPEN)):
        row = {nm: gm([results[nm].get(p) for p, _ in ps if p in results[nm]]) for nm in names}
        print(f"{group}: " + ", ".join(f"{nm} {v:.1f}" for nm, v in row.items()))
        if "infer --draft ngram" in row and "infer" in row:
            best_l = max((v for k, v in row.items() if k.startswith("llama.cpp")), default=float("nan"))
            print(f"  infer --draft ngram / infer = {row['infer --draft ngram'] / row['infer']:.2f}x; "
                  f"/ best llama.cpp = {row['infer --draft ngram'] / best_l:.2f}x")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"results": results, "texts": texts}, f, indent=1)


if __name__ == "__main__":
    main()
