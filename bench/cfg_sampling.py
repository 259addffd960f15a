"""Benchmark: one CFG decode-step sample (guidance + temperature + top-k/top-p + draw).

Compares fastbicot.kernels.cfg_sample (Triton on GPU, its torch path on CPU) with torch eager
(softmax + sort-based top-k/top-p + multinomial, the usual HF-style sampler), torch.compile of
that eager function, and FlashInfer's samplers (guidance combined in torch first) when importable.

    python bench/cfg_sampling.py                       # GPU: B = 32..512, V = 16384
    python bench/cfg_sampling.py --device cpu --no-compile --json out.json

Time is the median of triton.testing.do_bench on GPU and of a perf_counter loop on CPU; peak
memory is, per implementation, the CUDA allocator's peak above the inputs during one call
(reset_peak_memory_stats before each); on CPU it is not measured (null: one call allocates a few
[B, V] rows, below what RSS sampling resolves).

Every flag is checked at parse time (exit status 2, the flag named); the --json file is checked for
writability first and rewritten after every measurement ("complete": false until the end); exit
status 1 when any implementation failed.
"""

import argparse
import functools
import math
import os
import statistics
import sys
import time

import torch

from fastbicot.bench_cli import name_list, write_json
from fastbicot.checks import ArgumentError, arg_type, check_int, check_writable_file
from fastbicot.kernels.cfg_sample import cfg_sample

METHODS = ("fastbicot", "torch_eager", "torch_compile", "flashinfer")

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
        torch.cuda.reset_peak_memory_stats()  # per implementation: measure() runs once per method
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


def _device(text):
    if text not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"must be 'cpu' or 'cuda', got {text!r}")
    if text == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError("cuda requested but CUDA is not available here; use --device cpu")
    return text




def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    pos = arg_type(check_int, low=1)
    ap.add_argument("--device", type=_device, default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=pos, nargs="+", help="rows (default: 32..512 on GPU, 4 16 on CPU)")
    ap.add_argument("--vocab", type=pos, default=16384)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--methods", type=name_list(METHODS), default=None,
                    help=f"comma-separated, from {','.join(METHODS)} (default: all available)")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile (slow to build on CPU)")
    ap.add_argument("--reps", type=pos, default=10, help="timed repetitions on CPU")
    ap.add_argument("--json", help="write the results here (checked for writability first)")
    args = ap.parse_args(argv)
    if args.json is not None:
        try:
            check_writable_file("--json", args.json)
        except ArgumentError as e:
            ap.error(f"argument {e}")
    device, dtype = args.device, getattr(torch, args.dtype)
    batches = args.batch or ([32, 64, 128, 256, 512] if device == "cuda" else [4, 16])
    for name in args.configs:
        top_k = CONFIGS[name][2]
        if top_k > args.vocab:
            ap.error(f"argument --vocab: config {name!r} uses top_k={top_k} > --vocab {args.vocab}")

    wanted = args.methods or [m for m in METHODS if not (m == "torch_compile" and args.no_compile)]
    if args.methods and "torch_compile" in args.methods and args.no_compile:
        ap.error("argument --methods: torch_compile named together with --no-compile")
    methods = {}
    failures = []
    for m in wanted:
        if m == "fastbicot":
            methods[m] = lambda c, u, w, t, k, p: cfg_sample(
                c, u, guidance_scale=w, temperature=t, top_k=k, top_p=p, seed=0, offset=1, check_nan=False)
        elif m == "torch_eager":
            methods[m] = torch_eager
        elif m == "torch_compile":
            methods[m] = torch.compile(torch_eager, dynamic=False)
        elif m == "flashinfer":
            fi = flashinfer_sampler() if device == "cuda" else None
            if fi is not None:
                methods[m] = fi
            elif args.methods:  # asked for by name: not having it is a failure, not a silent skip
                ap.error("argument --methods: flashinfer requested but not usable here (needs CUDA and flashinfer)")

    results = []
    meta = {"torch": torch.__version__, "device_name": torch.cuda.get_device_name() if device == "cuda" else "cpu",
            "command": " ".join([os.path.basename(__file__), *(sys.argv[1:] if argv is None else argv)]),
            "peak_memory": ("CUDA allocator peak above the inputs during one call, reset per implementation"
                            if device == "cuda" else "not measured on CPU (null)")}
    doc = {"meta": meta, "complete": False, "results": results, "failures": failures}
    write_json(args.json, doc)
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
                    msg = f"{type(e).__name__}: {e}".splitlines()[0][:300]
                    failures.append({"config": name, "batch": B, "method": method, "error": msg})
                    write_json(args.json, doc)
                    print(f"{name:<10} {B:>5} {method:<14} failed: {msg}")
                    continue
                eager_ms = ms if method == "torch_eager" else eager_ms
                results.append({"config": name, "batch": B, "vocab": args.vocab, "dtype": args.dtype, "device": device,
                                "method": method, "median_ms": ms, "peak_mib": peak})
                write_json(args.json, doc)
            for r in results:
                if r["config"] == name and r["batch"] == B:
                    r["speedup_vs_eager"] = eager_ms / r["median_ms"] if eager_ms else None
                    mem = "-" if r["peak_mib"] is None else f"{r['peak_mib']:.1f}"
                    sp = "-" if r["speedup_vs_eager"] is None else f"{r['speedup_vs_eager']:.2f}x"
                    print(f"{name:<10} {B:>5} {r['method']:<14} {r['median_ms']:>9.3f} {mem:>9} {sp:>9}")
            write_json(args.json, doc)
    doc["complete"] = True
    write_json(args.json, doc)
    if failures:
        print(f"FAILED: {len(failures)} measurement(s): "
              + ", ".join(f"{f['config']}/{f['batch']}/{f['method']}" for f in failures), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
