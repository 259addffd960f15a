"""Benchmark: fastbicot.vq_decode vs transformers' JanusVQVAE.decode (random weights, real shapes).

GPU:  python bench/vq_decode.py --json bench/out/vq_decode.json
CPU:  python bench/vq_decode.py --device cpu            (small batches, ~1-2 minutes)
      python bench/vq_decode.py --device cpu --config tiny

Methods: hf_fp32 (eager), hf_bf16 (eager), hf_bf16_cl (bf16, channels-last weights), hf_compile
(torch.compile of decode, bf16; on CPU only when named in --methods), fastbicot_{fp32,bf16} (the
extension when it runs on the device) and fastbicot_torch_{fp32,bf16} (its pure-torch fallback).
Reports images/s (median over --iters), peak memory per method (CUDA: max_memory_allocated above
what was allocated before the method, reset_peak_memory_stats before each; CPU: growth of the
process peak RSS, /proc/self/status VmHWM, reset through /proc/self/clear_refs before each method,
allocator caching included; null where that is unavailable) and the max |difference| of every
fastbicot output from the HF output of the same dtype.

Every flag is checked at parse time (exit status 2, the flag named); the --json file is checked for
writability first and rewritten after every measurement ("complete": false until the end); exit
status 1 when any method failed.
"""

import argparse
import os
import statistics
import sys
import time

import torch
from transformers import JanusVQVAE, JanusVQVAEConfig

import fastbicot
from fastbicot import _ext
from fastbicot.bench_cli import name_list, write_json
from fastbicot.checks import ArgumentError, arg_type, check_int, check_writable_file

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
ALL_METHODS = ("hf_fp32", "hf_bf16", "hf_bf16_cl", "hf_compile", "fastbicot_fp32", "fastbicot_bf16",
               "fastbicot_torch_fp32", "fastbicot_torch_bf16")


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


def _rss_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"{field} not in /proc/self/status")


def _cpu_peak_reset():
    """Reset VmHWM (peak RSS) to the current RSS; returns that RSS in KiB, or None where impossible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _rss_kib("VmRSS")
    except OSError:
        return None


def bench(method, model_fp32, tokens, warmup, iters):
    device = tokens.device
    dtype = torch.float32 if method.endswith("fp32") else torch.bfloat16
    if device.type == "cuda":
        _sync(device)
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()  # per method: its copy of the model and its activations
    else:
        base = _cpu_peak_reset()
    fn, _ = _make(method, model_fp32, dtype)
    with torch.no_grad():
        for _ in range(warmup):
            out = fn(tokens)
        _sync(device)
        times = []
        for _ in range(iters):
            start = time.perf_counter()
            out = fn(tokens)
            _sync(device)
            times.append(time.perf_counter() - start)
    if device.type == "cuda":
        peak = (torch.cuda.max_memory_allocated() - base) / 2**30
    else:
        peak = None if base is None else (_rss_kib("VmHWM") - base) / 2**20
    return out.float(), dtype, statistics.median(times), peak


def _device(text):
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError) as e:
        raise argparse.ArgumentTypeError(f"not a torch device: {text!r} ({e})") from None
    if dev.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"must be cpu or cuda[:N], got {text!r}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError("cuda requested but CUDA is not available here; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text!r}: only {torch.cuda.device_count()} CUDA device(s)")
    return dev


def _int_list(text):
    out = []
    for part in text.split(","):
        try:
            out.append(check_int("value", int(part), low=1))
        except (ValueError, ArgumentError):
            raise argparse.ArgumentTypeError(f"comma-separated positive integers expected, got {text!r}") from None
    return out




def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", type=_device, default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--config", choices=sorted(CONFIGS), default="real")
    parser.add_argument(
        "--batches", type=_int_list, default=None, help="comma-separated (default 1,8,16,64 on GPU, 1 on CPU)"
    )
    parser.add_argument("--methods", type=name_list(ALL_METHODS, "method"), default=None,
                        help=f"comma-separated (GPU default {GPU_METHODS})")
    parser.add_argument("--warmup", type=arg_type(check_int, low=0), default=None)
    parser.add_argument("--iters", type=arg_type(check_int, low=1), default=None)
    parser.add_argument("--threads", type=arg_type(check_int, low=1), default=None, help="torch CPU threads")
    parser.add_argument("--json", default=None, help="write results here (checked for writability first)")
    args = parser.parse_args(argv)
    if args.json is not None:
        try:
            check_writable_file("--json", args.json)
        except ArgumentError as e:
            parser.error(f"argument {e}")

    device = args.device
    cpu = device.type == "cpu"
    if args.threads:
        torch.set_num_threads(args.threads)
    batches = args.batches or ([1] if cpu else [1, 8, 16, 64])
    methods = args.methods or (CPU_METHODS if cpu else GPU_METHODS).split(",")
    warmup = args.warmup if args.warmup is not None else (1 if cpu else 3)
    iters = args.iters if args.iters is not None else (1 if cpu else 10)

    torch.manual_seed(0)
    model = JanusVQVAE(JanusVQVAEConfig(**CONFIGS[args.config])).eval().to(device)
    k, n = model.config.num_embeddings, model.config.num_patches
    px = n * 2 ** (len(model.config.channel_multiplier) - 1)
    print(f"device={device} config={args.config} ({n}x{n} latents -> {px} px) extension={_ext.status()}")

    rows = []
    meta = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if not cpu else "cpu",
        "threads": torch.get_num_threads(),
        "config": args.config,
        "pixels": px,
        "torch": torch.__version__,
        "extension": _ext.status(),
        "command": " ".join([os.path.basename(__file__), *(sys.argv[1:] if argv is None else argv)]),
        "peak_memory": ("CUDA max_memory_allocated above the pre-method allocation, reset per method" if not cpu
                        else "CPU peak RSS growth (VmHWM) during the method, reset per method; null if unavailable"),
    }
    doc = {"meta": meta, "complete": False, "results": rows}
    write_json(args.json, doc)
    for batch in batches:
        tokens = torch.randint(0, k, (batch, n * n), device=device)
        reference = {}
        for method in methods:
            try:
                out, dtype, seconds, peak = bench(method, model, tokens, warmup, iters)
            except Exception as e:  # noqa: BLE001 -- one failing method must not hide the others
                rows.append({"method": method, "batch": batch, "error": f"{type(e).__name__}: {e}"[:300]})
                write_json(args.json, doc)
                print(f"{method:22s} batch {batch:3d}  failed: {rows[-1]['error']}")
                continue
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
            write_json(args.json, doc)
            r = rows[-1]
            print(
                f"{method:22s} batch {batch:3d}  {r['images_per_s']:9.2f} img/s  {r['ms']:10.1f} ms  "
                f"peak {'-' if peak is None else f'{peak:.2f} GiB':>9s}  "
                f"max|diff| vs HF {'-' if diff is None else f'{diff:.2e}'}"
            )
            if device.type == "cuda":
                torch.cuda.empty_cache()
    doc["complete"] = True
    write_json(args.json, doc)
    if args.json:
        print(f"wrote {args.json}")
    failed = [f"{r['method']}/batch {r['batch']}" for r in rows if "error" in r]
    if failed:
        print(f"FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
