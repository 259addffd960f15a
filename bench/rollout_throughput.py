"""Image-rollout throughput: the seed's loop vs transformers' Janus generate vs fastbicot.

    python bench/rollout_throughput.py --preset tiny --device cpu --batch 32 --json out.json

The same work for every implementation: ``--batch`` prompts (BOS, random text tokens, BOI),
``num_image_tokens`` image tokens each, CFG (guidance 5, T=1). Reported per implementation:
images/s, ms per decode step, % of the memory-bandwidth floor per step
(weight bytes + the KV bytes every row must read, / bandwidth; DESIGN.md §10), peak memory and the
attention backend. Random weights of the real shapes (JanusPolicy.from_preset).

Peak memory is measured per implementation, during its warm-up call: CUDA max_memory_allocated
after reset_peak_memory_stats (absolute: the model's weights included); CPU the process's peak
resident set (VmHWM, /proc/self/status) after resetting it to the current RSS through
/proc/self/clear_refs (absolute: the model and the Python process included; null where clear_refs
is unavailable).

Every flag is checked at parse time (exit status 2, the flag named); the --json file is checked for
writability first and rewritten after the warm-ups and after every timed round ("complete": false
until the end), so a failure mid-run keeps what was measured; exit status 1 when an implementation
failed (its error is in the JSON, the others are still timed).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

from fastbicot.bench_cli import name_list, write_json
from fastbicot.checks import ArgumentError, arg_type, check_float, check_int, check_writable_file
from fastbicot.models import JanusPolicy
from fastbicot.rollout import generate_images
from fastbicot.rollout.baselines import hf_generate_images, t2i_r1_generate_images
from fastbicot.rollout.runner import ModelRunner

HBM_GBS = {"H100": 3350.0, "H200": 4800.0, "B200": 8000.0, "A100": 2039.0}
IMPLS = ("t2i_r1_loop", "hf_generate", "fastbicot")


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


def _rss_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"{field} not in /proc/self/status")


def _peak_start(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := current RSS
        return True
    except OSError:
        return False


def _peak_gb(device, started):
    if not started:
        return None
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) / 1e9
    try:
        return _rss_kib("VmHWM") * 1024 / 1e9
    except OSError:
        return None


def run_all(fns, device, repeats, clock=time.perf_counter, on_progress=None):
    """Median seconds per call of every implementation, timed round-robin so that a change in
    machine load (shared CPUs) hits every implementation alike; peak memory per implementation
    (measured during its own warm-up call). An implementation that raises is recorded in
    ``errors`` and left out of the later rounds; the others go on.

    Returns (medians, peaks, errors); ``on_progress(medians, peaks, errors, rounds_done)`` is called
    after the warm-ups and after every round."""
    peaks, errors = {}, {}
    for name, fn in fns.items():  # warm-up: allocator, CUDA graph capture, lazy init
        started = _peak_start(device)
        try:
            fn()
        except Exception as e:  # noqa: BLE001 -- one failing implementation must not hide the others
            errors[name] = f"warm-up: {type(e).__name__}: {e}"[:500]
            continue
        peaks[name] = _peak_gb(device, started)
    times = {name: [] for name in fns if name not in errors}

    def medians():
        return {name: statistics.median(t) for name, t in times.items() if t and name not in errors}

    if on_progress is not None:
        on_progress(medians(), peaks, errors, 0)
    for r in range(repeats):
        for name, fn in fns.items():
            if name in errors:
                continue
            try:
                times[name].append(timed(fn, device, clock))
            except Exception as e:  # noqa: BLE001
                errors[name] = f"round {r + 1}: {type(e).__name__}: {e}"[:500]
        if on_progress is not None:
            on_progress(medians(), peaks, errors, r + 1)
    return medians(), peaks, errors


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




def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    pos = arg_type(check_int, low=1)
    ap.add_argument("--preset", default="tiny", choices=["tiny", "janus-pro-1b", "janus-pro-7b"])
    ap.add_argument("--device", type=_device, default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=pos, default=32, help="images per call (CFG doubles the rows)")
    ap.add_argument(
        "--prompt-len", type=arg_type(check_int, low=2), default=32,
        help="tokens per image prompt, BOS and BOI included",
    )
    ap.add_argument("--guidance", type=arg_type(check_float, low=0.0), default=5.0)
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                    help="default: float32 on CPU, bfloat16 on CUDA")
    ap.add_argument("--repeats", type=pos, default=5)
    ap.add_argument("--threads", type=pos, default=1, help="CPU threads (small models: 1 avoids contention)")
    ap.add_argument("--bandwidth-gbs", type=arg_type(check_float, low=0.0, low_open=True), default=None,
                    help="memory bandwidth; default: detected")
    ap.add_argument(
        "--clock",
        default="wall",
        choices=["wall", "cpu"],
        help="cpu: process CPU time (fair on a shared, oversubscribed CPU; use with --threads 1)",
    )
    ap.add_argument("--impls", type=name_list(IMPLS, "implementation"), default=list(IMPLS), help=f"comma-separated, from {','.join(IMPLS)}")
    ap.add_argument("--json", default=None, help="write the results here (checked for writability first)")
    args = ap.parse_args(argv)
    if args.json is not None:
        try:
            check_writable_file("--json", args.json)
        except ArgumentError as e:
            ap.error(f"argument {e}")
    from fastbicot.models.janus import PRESETS

    spec = PRESETS[args.preset]
    n_image = (spec.image_size // 2 ** (len(spec.vq_channel_multiplier) - 1)) ** 2
    if args.prompt_len + n_image > spec.max_position_embeddings:
        ap.error(f"argument --prompt-len: {args.prompt_len} prompt + {n_image} image tokens exceed the "
                 f"{args.preset} model's {spec.max_position_embeddings} positions")

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
        "t2i_r1_loop": (lambda: t2i_r1_generate_images(policy, ids, guidance_scale=w), "eager-sdpa+DynamicCache"),
        "hf_generate": (
            lambda: hf_generate_images(policy, ids, attention_mask=mask, do_sample=True, guidance_scale=w),
            "hf-sdpa+StaticCache",
        ),
        "fastbicot": (
            lambda: generate_images(policy, ids, guidance_scale=w, seed=0),
            ModelRunner(policy).decode_backend(),
        ),
    }
    bw = device_bandwidth_gbs(device, args.bandwidth_gbs)
    floor = floor_ms_per_step(policy, args.batch, args.prompt_len, bw)
    names = args.impls
    dev_name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({torch.get_num_threads()} threads)"
    )
    results = []
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
        "command": " ".join([os.path.basename(__file__), *(sys.argv[1:] if argv is None else argv)]),
        "peak_memory": (
            "CUDA max_memory_allocated during the implementation's warm-up, reset before it (weights included)"
            if device.type == "cuda"
            else "CPU peak RSS (VmHWM) during the implementation's warm-up, reset before it via "
            "/proc/self/clear_refs (whole process: weights and Python included)"
        ),
        "complete": False,
        "rounds_done": 0,
        "results": results,
        "errors": {},
    }

    def rows(secs, peaks):
        table = []
        for name in names:
            if name not in secs:
                continue
            ms = secs[name] / policy.num_image_tokens * 1e3
            table.append(
                {
                    "impl": name,
                    "images_per_s": args.batch / secs[name],
                    "ms_per_step": ms,
                    "pct_of_floor": 100.0 * floor / ms,
                    "peak_mem_gb": peaks.get(name),
                    "attention_backend": impls[name][1],
                }
            )
        return table

    def progress(secs, peaks, errors, rounds):
        results[:] = rows(secs, peaks)
        out["errors"] = dict(errors)
        out["rounds_done"] = rounds
        write_json(args.json, out)

    write_json(args.json, out)
    with torch.no_grad():
        clock = time.process_time if args.clock == "cpu" else time.perf_counter
        secs, peaks, errors = run_all({n: impls[n][0] for n in names}, device, args.repeats, clock, progress)
    progress(secs, peaks, errors, args.repeats)
    out["complete"] = True
    write_json(args.json, out)
    print(
        f"{args.preset} on {dev_name}, batch {args.batch}, {policy.num_image_tokens} image tokens, "
        f"{args.clock} clock, floor {floor:.4f} ms/step at {bw:.0f} GB/s"
    )
    print(f"{'impl':<12} {'images/s':>10} {'ms/step':>9} {'% floor':>8} {'peak GB':>8}  backend")
    for r in results:
        mem = "-" if r["peak_mem_gb"] is None else f"{r['peak_mem_gb']:.2f}"
        print(
            f"{r['impl']:<12} {r['images_per_s']:>10.2f} {r['ms_per_step']:>9.3f} {r['pct_of_floor']:>8.2f} "
            f"{mem:>8}  {r['attention_backend']}"
        )
    base = {r["impl"]: r["images_per_s"] for r in results}
    if "fastbicot" in base:
        for other in ("hf_generate", "t2i_r1_loop"):
            if other in base:
                print(f"fastbicot / {other}: {base['fastbicot'] / base[other]:.2f}x")
    if errors:
        for name, err in errors.items():
            print(f"FAILED {name}: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
