"""Benchmark: fastbicot.vq_decode vs transformers' JanusVQVAE.decode (random weights, real shapes).

GPU:  python bench/vq_decode.py --json bench/out/vq_decode.json
CPU:  python bench/vq_decode.py --device cpu            (small batches, ~1-2 minutes)
      python bench/vq_decode.py --device cpu --config tiny

Methods: hf_fp32 (eager), hf_bf16 (eager), hf_bf16_cl (bf16, channels-last weights), hf_compile
(torch.compile of decode, bf16; on CPU only when named in --methods), fastbicot_{fp32,bf16} (the
extension when it runs on the device) and fastbicot_torch_{fp32,bf16} (its pure-torch fallback).
Reports images/s (median over --iters), peak memory (CUDA only) and the max |difference| of every
fastbicot output from the HF output of the same dtype.
"""

import argparse
import json
import os
import statistics
import time

import torch
from transformers import JanusVQVAE, JanusVQVAEConfig

import fastbicot
from fastbicot import _ext

CONFIGS = {
    # Janus-Pro's VQ-16: 16384x8 codebook, 128..512 channels, 24x24 latents -> 384 px.
    "real": {"num_patches": 24},
    "tiny": {
        "base_channels": 32,
        "channel_multiplier": [1, 1, 2],
        "num_res_blocks": 1,
        "num_embeddings": 1024,
        "latent_channels": 64,
        "num_patches": 24,
    },
}
GPU_METHODS = "hf_fp32,hf_bf16,hf_bf16_cl,hf_compile,fastbicot_fp32,fastbicot_bf16,fastbicot_torch_bf16"
CPU_METHODS = "hf_fp32,fastbicot_fp32,fastbicot_torch_fp32"


def _make(method, model_fp32, dtype):
    """Returns (decode function, model it uses)."""
    if method.startswith("hf"):
        model = JanusVQVAE(model_fp32.config).eval().to(model_fp32.device)
        model.load_state_dict(model_fp32.state_dict())
        model.to(dtype)
        if method == "hf_bf16_cl":
            model.to(memory_format=torch.channels_last)
        if method == "hf_compile":
            return torch.compile(model.decode), model
        return model.decode, model
    model = model_fp32 if dtype == torch.float32 else _make("hf", model_fp32, dtype)[1]
    use_ext = False if "torch" in method else None
    return (lambda tokens: fastbicot.vq_decode(model, tokens, use_extension=use_ext)), model


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench(method, model_fp32, tokens, warmup, iters):
    device = tokens.device
    dtype = torch.float32 if method.endswith("fp32") else torch.bfloat16
    fn, _ = _make(method, model_fp32, dtype)
    with torch.no_grad():
        for _ in range(warmup):
            out = fn(tokens)
        _sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(iters):
            start = time.perf_counter()
            out = fn(tokens)
            _sync(device)
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    return out.float(), dtype, statistics.median(times), peak


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--config", choices=sorted(CONFIGS), default="real")
    parser.add_argument(
        "--batches", default=None, help="comma-separated (default 1,8,16,64 on GPU, 1 on CPU)"
    )
    parser.add_argument("--methods", default=None, help=f"comma-separated (GPU default {GPU_METHODS})")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--iters", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--json", default=None, help="write results here")
    args = parser.parse_args()

    device = torch.device(args.device)
    cpu = device.type == "cpu"
    if args.threads:
        torch.set_num_threads(args.threads)
    batches = [int(b) for b in (args.batches or ("1" if cpu else "1,8,16,64")).split(",")]
    methods = (args.methods or (CPU_METHODS if cpu else GPU_METHODS)).split(",")
    warmup = args.warmup if args.warmup is not None else (1 if cpu else 3)
    iters = args.iters if args.iters is not None else (1 if cpu else 10)

    torch.manual_seed(0)
    model = JanusVQVAE(JanusVQVAEConfig(**CONFIGS[args.config])).eval().to(device)
    k, n = model.config.num_embeddings, model.config.num_patches
    px = n * 2 ** (len(model.config.channel_multiplier) - 1)
    print(f"device={device} config={args.config} ({n}x{n} latents -> {px} px) extension={_ext.status()}")

    rows = []
    for batch in batches:
        tokens = torch.randint(0, k, (batch, n * n), device=device)
        reference = {}
        for method in methods:
            out, dtype, seconds, peak = bench(method, model, tokens, warmup, iters)
            if method.startswith("hf") and dtype not in reference:
                reference[dtype] = out
            diff = (out - reference[dtype]).abs().max().item() if dtype in reference else None
            rows.append(
                {
                    "method": method,
                    "batch": batch,
                    "images_per_s": batch / seconds,
                    "ms": seconds * 1e3,
                    "peak_gib": peak,
                    "max_abs_diff_vs_hf": diff,
                }
            )
            r = rows[-1]
            print(
                f"{method:22s} batch {batch:3d}  {r['images_per_s']:9.2f} img/s  {r['ms']:10.1f} ms  "
                f"peak {'-' if peak is None else f'{peak:.2f} GiB':>9s}  "
                f"max|diff| vs HF {'-' if diff is None else f'{diff:.2e}'}"
            )
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if args.json:
        meta = {
            "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if not cpu else "cpu",
            "threads": torch.get_num_threads(),
            "config": args.config,
            "pixels": px,
            "torch": torch.__version__,
            "extension": _ext.status(),
        }
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": rows}, f, indent=1)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
