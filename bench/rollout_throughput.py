"""Image-rollout throughput: the seed's loop vs transformers' Janus generate vs fastbicot.

    python bench/rollout_throughput.py --preset tiny --device cpu --batch 32 --json out.json

The same work for every implementation: ``--batch`` prompts (BOS, random text tokens, BOI),
``num_image_tokens`` image tokens each, CFG (guidance 5, T=1). Reported per implementation:
images/s, ms per decode step, % of the memory-bandwidth floor per step
(weight bytes + the KV bytes every row must read, / bandwidth; DESIGN.md §10), peak memory and the
attention backend. Random weights of the real shapes (JanusPolicy.from_preset).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from fastbicot.models import JanusPolicy
from fastbicot.rollout import generate_images
from fastbicot.rollout.generate import decode_backend
from fastbicot.rollout.seed_loop import hf_generate_images, seed_generate_images

HBM_GBS = {"H100": 3350.0, "H200": 4800.0, "B200": 8000.0, "A100": 2039.0}


def measure_cpu_bandwidth_gbs(nbytes=1 << 28) -> float:
    """Copy bandwidth (read + write) of a large tensor: the CPU's effective memory bandwidth."""
    a = torch.empty(nbytes // 4, dtype=torch.float32).fill_(1.0)
    b = torch.empty_like(a)
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        b.copy_(a)
        best = min(best, time.perf_counter() - t0)
    return 2 * nbytes / best / 1e9


def device_bandwidth_gbs(device, override):
    if override:
        return override
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, gbs in HBM_GBS.items():
            if key in name:
                return gbs
        raise SystemExit(f"unknown GPU {name!r}: pass --bandwidth-gbs")
    return measure_cpu_bandwidth_gbs()


def floor_ms_per_step(policy, batch, prompt_len, bandwidth_gbs):
    """(weights + Σ_rows KV bytes read) / bandwidth, averaged over the image steps (2 rows per image)."""
    n = policy.num_image_tokens
    kv_per_token = (
        2 * policy.num_layers * policy.num_kv_heads * policy.head_dim * policy.lm_head.weight.element_size()
    )
    avg_len = prompt_len + (n + 1) / 2
    kv = 2 * batch * avg_len * kv_per_token
    return (policy.weight_bytes() + kv) / (bandwidth_gbs * 1e9) * 1e3


def timed(fn, device, clock):
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = clock()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return clock() - t0


def run_all(fns, device, repeats, clock=time.perf_counter):
    """Median seconds per call of every implementation, timed round-robin so that a change in
    machine load (shared CPUs) hits every implementation alike; peak memory per implementation."""
    peaks = {}
    for name, fn in fns.items():  # warm-up: allocator, CUDA graph capture, lazy init
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        fn()
        peaks[name] = (
            torch.cuda.max_memory_allocated()
            if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        ) / 1e9
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(timed(fn, device, clock))
    return {name: statistics.median(t) for name, t in times.items()}, peaks


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny", choices=["tiny", "janus-pro-1b", "janus-pro-7b"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=32, help="images per call (CFG doubles the rows)")
    ap.add_argument(
        "--prompt-len", type=int, default=32, help="tokens per image prompt, BOS and BOI included"
    )
    ap.add_argument("--guidance", type=float, default=5.0)
    ap.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on CUDA")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (small models: 1 avoids contention)")
    ap.add_argument("--bandwidth-gbs", type=float, default=None, help="memory bandwidth; default: detected")
    ap.add_argument(
        "--clock",
        default="wall",
        choices=["wall", "cpu"],
        help="cpu: process CPU time (fair on a shared, oversubscribed CPU; use with --threads 1)",
    )
    ap.add_argument("--impls", default="seed_loop,hf_generate,fastbicot")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    dtype = (
        getattr(torch, args.dtype)
        if args.dtype
        else (torch.float32 if device.type == "cpu" else torch.bfloat16)
    )
    policy = JanusPolicy.from_preset(args.preset, seed=0, device=device, dtype=dtype)
    g = torch.Generator().manual_seed(0)
    body = torch.randint(0, 256, (args.batch, args.prompt_len - 2), generator=g)
    ids = torch.cat(
        [
            torch.full((args.batch, 1), policy.bos_token_id),
            body,
            torch.full((args.batch, 1), policy.boi_token_id),
        ],
        dim=1,
    ).to(device)
    mask = torch.ones_like(ids)
    w = args.guidance
    impls = {
        "seed_loop": (lambda: seed_generate_images(policy, ids, guidance_scale=w), "eager-sdpa+DynamicCache"),
        "hf_generate": (
            lambda: hf_generate_images(policy, ids, attention_mask=mask, do_sample=True, guidance_scale=w),
            "hf-sdpa+StaticCache",
        ),
        "fastbicot": (
            lambda: generate_images(policy, ids, guidance_scale=w, seed=0),
            decode_backend(policy),
        ),
    }
    bw = device_bandwidth_gbs(device, args.bandwidth_gbs)
    floor = floor_ms_per_step(policy, args.batch, args.prompt_len, bw)
    names = args.impls.split(",")
    unknown = set(names) - set(impls)
    if unknown:
        raise SystemExit(f"unknown --impls {sorted(unknown)}; choose from {sorted(impls)}")
    with torch.no_grad():
        clock = time.process_time if args.clock == "cpu" else time.perf_counter
        secs, peaks = run_all({n: impls[n][0] for n in names}, device, args.repeats, clock)
    results = []
    for name in names:
        ms = secs[name] / policy.num_image_tokens * 1e3
        results.append(
            {
                "impl": name,
                "images_per_s": args.batch / secs[name],
                "ms_per_step": ms,
                "pct_of_floor": 100.0 * floor / ms,
                "peak_mem_gb": peaks[name],
                "attention_backend": impls[name][1],
            }
        )
    dev_name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({torch.get_num_threads()} threads)"
    )
    out = {
        "device": dev_name,
        "preset": args.preset,
        "batch": args.batch,
        "prompt_len": args.prompt_len,
        "guidance": w,
        "clock": args.clock,
        "dtype": str(dtype).replace("torch.", ""),
        "bandwidth_gbs": bw,
        "floor_ms_per_step": floor,
        "results": results,
    }
    print(
        f"{args.preset} on {dev_name}, batch {args.batch}, {policy.num_image_tokens} image tokens, "
        f"{args.clock} clock, floor {floor:.4f} ms/step at {bw:.0f} GB/s"
    )
    print(f"{'impl':<12} {'images/s':>10} {'ms/step':>9} {'% floor':>8} {'peak GB':>8}  backend")
    for r in results:
        print(
            f"{r['impl']:<12} {r['images_per_s']:>10.2f} {r['ms_per_step']:>9.3f} {r['pct_of_floor']:>8.2f} "
            f"{r['peak_mem_gb']:>8.2f}  {r['attention_backend']}"
        )
    base = {r["impl"]: r["images_per_s"] for r in results}
    if "fastbicot" in base:
        for other in ("hf_generate", "seed_loop"):
            if other in base:
                print(f"fastbicot / {other}: {base['fastbicot'] / base[other]:.2f}x")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return out


if __name__ == "__main__":
    main()
