"""Benchmark: one CFG decode-step sample (guidance + temperature + top-k/top-p + draw).

Compares fastbicot.kernels.cfg_sample (Triton on GPU, its torch path on CPU) with torch eager
(softmax + sort-based top-k/top-p + multinomial, the usual HF-style sampler), torch.compile of
that eager function, and FlashInfer's samplers (guidance combined in torch first) when importable.

    python bench/cfg_sampling.py                       # GPU: B = 32..512, V = 16384
    python bench/cfg_sampling.py --device cpu --no-compile --json out.json

Time is the median of triton.testing.do_bench on GPU and of a perf_counter loop on CPU; peak
memory is the CUDA allocator's peak above the inputs during one call (not measured on CPU).
"""

import argparse
import functools
import json
import math
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from fastbicot.kernels.cfg_sample import cfg_sample

CONFIGS = {  # name -> (guidance_scale, temperature, top_k, top_p); Janus-Pro samples with w = 5
    "plain": (5.0, 1.0, 0, 1.0),
    "topk_topp": (5.0, 0.9, 2048, 0.95),
}


def torch_eager(c, u, w, temperature, top_k, top_p):
    z = (u.float() + w * (c.float() - u.float())) / temperature
    if top_k > 0:
        z = z.masked_fill(z < z.topk(top_k, -1).values[:, -1:], -math.inf)
    if top_p < 1.0:
        sorted_z, idx = z.sort(-1, descending=True)
        p = sorted_z.softmax(-1)
        remove = p.cumsum(-1) - p > top_p  # keep a token while the mass before it is < top_p
        z = z.scatter(-1, idx, sorted_z.masked_fill(remove, -math.inf))
    return torch.multinomial(z.softmax(-1), 1).squeeze(1)


def flashinfer_sampler():
    try:
        import flashinfer.sampling as fs
    except (ImportError, OSError, RuntimeError):  # not installed, or built for another torch / CUDA
        return None

    def run(c, u, w, temperature, top_k, top_p):
        z = (u.float() + w * (c.float() - u.float())) / temperature
        if top_k == 0 and top_p == 1.0:
            return fs.sampling_from_logits(z)
        return fs.top_k_top_p_sampling_from_logits(z, top_k or z.shape[-1], top_p)

    return run


def measure(fn, device, reps):
    fn()  # warm-up (compilation, autotuning, allocator)
    if device == "cuda":
        import triton.testing

        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        return triton.testing.do_bench(fn, return_mode="median"), peak
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3, None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    ap.add_argument("--batch", type=int, nargs="+", help="rows (default: 32..512 on GPU, 4 16 on CPU)")
    ap.add_argument("--vocab", type=int, default=16384)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile (slow to build on CPU)")
    ap.add_argument("--reps", type=int, default=10, help="timed repetitions on CPU")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    device, dtype = args.device, getattr(torch, args.dtype)
    batches = args.batch or ([32, 64, 128, 256, 512] if device == "cuda" else [4, 16])

    methods = {
        "fastbicot": lambda c, u, w, t, k, p: cfg_sample(
            c, u, guidance_scale=w, temperature=t, top_k=k, top_p=p, seed=0, offset=1, check_nan=False),
        "torch_eager": torch_eager,
    }
    if not args.no_compile:
        methods["torch_compile"] = torch.compile(torch_eager, dynamic=False)
    if device == "cuda" and (fi := flashinfer_sampler()) is not None:
        methods["flashinfer"] = fi

    results = []
    print(f"device={device} dtype={args.dtype} V={args.vocab}")
    print(f"{'config':<10} {'B':>5} {'method':<14} {'ms':>9} {'peak MiB':>9} {'vs eager':>9}")
    for name in args.configs:
        w, t, k, p = CONFIGS[name]
        for B in batches:
            c = torch.randn(B, args.vocab, device=device).mul_(3).to(dtype)
            u = torch.randn(B, args.vocab, device=device).mul_(3).to(dtype)
            eager_ms = None
            for method, fn in methods.items():
                try:
                    ms, peak = measure(functools.partial(fn, c, u, w, t, k, p), device, args.reps)
                except Exception as e:  # noqa: BLE001 - e.g. no compiler for torch.compile; bench the rest
                    print(f"{name:<10} {B:>5} {method:<14} failed: {type(e).__name__}: {e}".splitlines()[0])
                    continue
                eager_ms = ms if method == "torch_eager" else eager_ms
                results.append({"config": name, "batch": B, "vocab": args.vocab, "dtype": args.dtype, "device": device,
                                    "method": method, "median_ms": ms, "peak_mib": peak})
            for r in results:
                if r["config"] == name and r["batch"] == B:
                    r["speedup_vs_eager"] = eager_ms / r["median_ms"] if eager_ms else None
                    mem = "-" if r["peak_mib"] is None else f"{r['peak_mib']:.1f}"
                    sp = "-" if r["speedup_vs_eager"] is None else f"{r['speedup_vs_eager']:.2f}x"
                    print(f"{name:<10} {B:>5} {r['method']:<14} {r['median_ms']:>9.3f} {mem:>9} {sp:>9}")
    if args.json:
        meta = {"torch": torch.__version__, "device_name": torch.cuda.get_device_name() if device == "cuda" else "cpu"}
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
