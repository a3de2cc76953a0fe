#!/usr/bin/env python3
"""infer vs llama.cpp (the PyPI package llama-cpp-python) on the same GGUF, threads and tests, alternated
in one run: for each test, llama.cpp then infer, twice, each a warm-up plus R timed repetitions.
Prints a markdown table of median tokens/s and the ratio infer / llama.cpp.

  python scripts/bench_vs_llamacpp.py MODEL.gguf [-p 512] [-n 128] [-t 2] [-r 5] [--infer target/release/infer]

Needs llama-cpp-python (scripts/requirements-ref.txt), or with --llama-bench PATH llama.cpp's own
llama-bench binary (scripts/build-llamacpp.sh; its defaults, repacked weights included). Its extra CPU buffer types (AMX / repacked
weights) are switched off by default because its from-source build crashes in the AMX path on the
machine these figures come from; --extra-bufts turns them back on.
"""
import argparse
import json
import random
import shlex
import statistics
import subprocess
import sys
import time


def llama(model, threads, extra_bufts):
    import llama_cpp
    from llama_cpp import Llama

    if not extra_bufts:
        from llamacpp_bufts import disable_extra_bufts

        disable_extra_bufts()
    return Llama(model_path=model, n_ctx=4096, n_batch=512, n_ubatch=512, n_threads=threads, n_threads_batch=threads,
                 verbose=False), llama_cpp.__version__


def llama_run(llm, p, n, seed):
    rng = random.Random(seed)
    toks = [rng.randrange(llm.n_vocab()) for _ in range(max(p, n))]
    llm.reset()
    llm._ctx.kv_cache_clear() if hasattr(llm._ctx, "kv_cache_clear") else None
    t0 = time.perf_counter()
    if p:
        llm.eval(toks[:p])
    else:
        for t in toks[:n]:
            llm.eval([t])
    return (p + n) / (time.perf_counter() - t0)


def llama_bench_run(binary, model, p, n, threads, reps, extra=()):
    out = subprocess.run([binary, "-m", model, "-p", str(p), "-n", str(n), "-t", str(threads), "-r", str(reps), "-o", "json", *extra],
                         check=True, capture_output=True, text=True).stdout
    return [x for r in json.loads(out) for x in r["samples_ts"]]


def infer_run(binary, model, p, n, threads, reps):
    out = subprocess.run([binary, "bench", model, "-p", str(p), "-n", str(n), "-t", str(threads), "-r", str(reps), "-o", "json"],
                         check=True, capture_output=True, text=True).stdout
    recs = json.loads(out)
    return [x for r in recs for x in r["samples_ts"]]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("-p", default="512")
    ap.add_argument("-n", default="128")
    ap.add_argument("-t", type=int, default=2)
    ap.add_argument("-r", type=int, default=5)
    ap.add_argument("--infer", default="target/release/infer")
    ap.add_argument("--extra-bufts", action="store_true")
    ap.add_argument("--llama-bench", help="time llama.cpp with this llama-bench binary instead of llama-cpp-python")
    ap.add_argument("--llama-bench-args", default="",
                    help="more llama-bench arguments, e.g. '--repack 0' where its repacked/AMX weights crash (Sapphire Rapids VM)")
    ap.add_argument("--json")
    a = ap.parse_args()
    if a.llama_bench:
        llm, version = None, "llama-bench " + subprocess.run([a.llama_bench, "--version"], capture_output=True, text=True).stderr.strip().splitlines()[0]
    else:
        llm, version = llama(a.model, a.t, a.extra_bufts)
    tests = [(int(p), 0) for p in a.p.split(",") if int(p)] + [(0, int(n)) for n in a.n.split(",") if int(n)]
    rows = []
    for p, n in tests:
        ll, inf = [], []
        for round_ in range(2):
            if a.llama_bench:
                ll += llama_bench_run(a.llama_bench, a.model, p, n, a.t, a.r, shlex.split(a.llama_bench_args))
            else:
                llama_run(llm, p, n, 999)  # warm-up
                ll += [llama_run(llm, p, n, round_ * 100 + i) for i in range(a.r)]
            inf += infer_run(a.infer, a.model, p, n, a.t, a.r)
        name = f"pp{p}" if p else f"tg{n}"
        row = {"test": name, "threads": a.t, "llama_cpp_ts": statistics.median(ll), "infer_ts": statistics.median(inf)}
        row["ratio"] = row["infer_ts"] / row["llama_cpp_ts"]
        rows.append(row)
        print(f"{name}: llama.cpp {row['llama_cpp_ts']:.1f} t/s, infer {row['infer_ts']:.1f} t/s, ratio {row['ratio']:.2f}", file=sys.stderr)
    print(f"\n{a.model.split('/')[-1]}, {a.t} threads, {'' if a.llama_bench else 'llama-cpp-python '}{version} {a.llama_bench_args}"
          f"{'' if a.llama_bench else ' (extra buffer types ' + ('on' if a.extra_bufts else 'off') + ')'}, median of {2 * a.r} runs each\n")
    print("| test | llama.cpp t/s | infer t/s | infer / llama.cpp |")
    print("|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['test']} | {r['llama_cpp_ts']:.1f} | {r['infer_ts']:.1f} | {r['ratio']:.2f}x |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"llama_cpp_python": version, "model": a.model, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
