"""Benchmark: per-token log-probs through a linear head + GRPO loss, forward + backward.

    python bench/grpo_loss.py [--device cuda|cpu] [--methods fastbicot,torch_eager] [--json OUT]

Compares, per head (image: H=4096, V=16384, bias, frozen head; text: H=4096, V=102400, no bias,
trainable head), on N = samples x (CoT + image) tokens:
  fastbicot      token_logprobs + grpo_loss (fused, never [N, V])
  torch_eager    full logits + log_softmax + gather + the same loss formulas
  torch_compile  torch.compile of torch_eager (GPU by default; --compile on CPU)
  liger          LigerFusedLinearGRPOLoss, when liger_kernel is importable
Reports median time (triton.testing.do_bench on GPU, a timer median on CPU) and peak memory
beyond the inputs, per implementation (CUDA: max_memory_allocated after reset_peak_memory_stats
before each implementation; CPU: growth of the process's peak RSS, /proc/self/status VmHWM, after
resetting it through /proc/self/clear_refs before each implementation -- includes allocator caching;
null where clear_refs is not writable).

Every flag is checked at parse time (exit status 2, the flag named). The --json file is checked for
writability before anything runs and rewritten after every measurement ("complete": false until the
end), so a failure mid-run keeps what was measured. Exit status 1 when any implementation failed.
"""

import argparse
import os
import statistics
import sys
import time

import torch

from fastbicot.bench_cli import name_list, write_json
from fastbicot.checks import ArgumentError, arg_type, check_int, check_writable_file
from fastbicot.kernels.grpo_loss import grpo_loss
from fastbicot.kernels.token_logprobs import token_logprobs

BETA = 0.01
METHODS = ("fastbicot", "torch_eager", "torch_compile", "liger")


def eager_step(hidden, weight, bias, targets, adv_tok, ref):
    logits = hidden @ weight.t()
    if bias is not None:
        logits = logits + bias
    logp = torch.log_softmax(logits.float(), dim=-1).gather(1, targets[:, None])[:, 0]
    r = torch.exp(logp - logp.detach())
    d = ref - logp
    per_token = -torch.minimum(r * adv_tok, r.clamp(0.8, 1.2) * adv_tok) + BETA * (torch.exp(d) - d - 1)
    return per_token.mean()


def fused_step(hidden, weight, bias, targets, adv, seq_ids, ref):
    logp = token_logprobs(hidden, weight, targets, bias=bias)
    return grpo_loss(logp, adv, seq_ids, ref_logprobs=ref, beta=BETA)[0]


def liger_step_factory(samples, length):
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    loss_fn = LigerFusedLinearGRPOLoss(beta=BETA, use_ref_model=True)

    def step(hidden, weight, bias, targets, adv, ref):
        H = hidden.shape[1]
        out = loss_fn(hidden.view(samples, length, H), weight, targets.view(samples, length),
                      torch.ones(samples, length, device=hidden.device), adv, bias=bias,
                      ref_per_token_logps=ref.view(samples, length))
        return out[0] if isinstance(out, tuple) else out

    return step


def _rss_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _cpu_peak_reset():
    """Reset VmHWM to the current RSS; returns the RSS in KiB, or None where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _rss_kib("VmRSS")
    except (OSError, RuntimeError):
        return None


def measure(step, leaves, device, reps):
    def run():
        for t in leaves:
            t.grad = None
        step().backward()

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    run()  # warm-up / compile
    if device == "cuda":
        import triton

        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        ms = triton.testing.do_bench(run, grad_to_none=leaves)
        return ms, peak / 2**20
    for t in leaves:
        t.grad = None
    base = _cpu_peak_reset()
    run()
    peak = None if base is None else (_rss_kib("VmHWM") - base) / 1024
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        run()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), peak


def bench_head(name, H, V, with_bias, train_weight, samples, length, device, dtype, methods_wanted, reps,
               on_row=None):
    N = samples * length
    hidden = torch.randn(N, H, device=device, dtype=dtype, requires_grad=True)
    weight = (torch.randn(V, H, device=device) / H**0.5).to(dtype).requires_grad_(train_weight)
    bias = torch.randn(V, device=device, dtype=dtype) if with_bias else None
    targets = torch.randint(0, V, (N,), device=device)
    seq_ids = torch.arange(samples, device=device).repeat_interleave(length)
    adv = torch.randn(samples, device=device)
    ref = -torch.rand(N, device=device) * 5
    leaves = [hidden] + ([weight] if train_weight else [])
    def build(method):
        if method == "fastbicot":
            return lambda: fused_step(hidden, weight, bias, targets, adv, seq_ids, ref)
        if method == "torch_eager":
            return lambda: eager_step(hidden, weight, bias, targets, adv[seq_ids], ref)
        if method == "torch_compile":
            compiled = torch.compile(eager_step)
            return lambda: compiled(hidden, weight, bias, targets, adv[seq_ids], ref)
        liger = liger_step_factory(samples, length)
        return lambda: liger(hidden, weight, bias, targets, adv, ref)

    rows = []
    for method in methods_wanted:
        try:
            ms, mib = measure(build(method), leaves, device, reps)
            row = {"head": name, "method": method, "N": N, "H": H, "V": V, "ms": ms, "peak_mib": mib}
        except Exception as e:  # noqa: BLE001 -- a baseline failing (OOM, API drift) must not hide the others
            row = {"head": name, "method": method, "N": N, "H": H, "V": V, "error": f"{type(e).__name__}: {e}"[:200]}
        rows.append(row)
        if on_row is not None:
            on_row(row)
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


def _device(text):
    if text not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"must be 'cpu' or 'cuda', got {text!r}")
    if text == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError("cuda requested but CUDA is not available here (torch.cuda.is_available() "
                                         "is False); use --device cpu")
    return text




def _liger_available():
    try:
        import liger_kernel.chunked_loss  # noqa: F401
    except ImportError:
        return False
    return True




def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    pos = arg_type(check_int, low=1)
    p.add_argument("--device", type=_device, default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", help="write the results here (checked for writability first)")
    p.add_argument("--samples", type=pos, default=None, help="sequences (GPU 8, CPU 2)")
    p.add_argument("--cot", type=arg_type(check_int, low=0), default=None,
                   help="CoT tokens per sample (GPU 100, CPU 20)")
    p.add_argument("--image", type=arg_type(check_int, low=0), default=None,
                   help="image tokens per sample (GPU 576, CPU 100)")
    p.add_argument("--hidden", type=pos, default=None, help="H (GPU 4096, CPU 128)")
    p.add_argument("--methods", type=name_list(METHODS, "method"), default=None,
                   help=f"comma-separated, from {','.join(METHODS)} (default: all available; torch_compile "
                        f"on CPU only with --compile)")
    p.add_argument("--compile", action="store_true", help="include torch.compile on CPU (slow to compile)")
    p.add_argument("--reps", type=pos, default=5, help="CPU timing repetitions")
    args = p.parse_args(argv)
    if args.json is not None:
        try:
            check_writable_file("--json", args.json)
        except ArgumentError as e:
            p.error(f"argument {e}")
    gpu = args.device == "cuda"
    samples = args.samples or (8 if gpu else 2)
    cot = args.cot if args.cot is not None else (100 if gpu else 20)
    image = args.image if args.image is not None else (576 if gpu else 100)
    if cot + image < 1:
        p.error("argument --cot/--image: a sample needs at least one token (--cot + --image >= 1)")
    length = cot + image
    H = args.hidden or (4096 if gpu else 128)
    if args.methods is None:
        methods = ["fastbicot", "torch_eager"] + (["torch_compile"] if gpu or args.compile else [])
        methods += ["liger"] if _liger_available() else []
    else:
        methods = args.methods
        if "liger" in methods and not _liger_available():
            p.error("argument --methods: liger requested but liger_kernel is not importable")
    heads = [("image", 16384 if gpu else 4096, True, False), ("text", 102400 if gpu else 16384, False, True)]
    dtype = torch.bfloat16 if gpu else torch.float32
    device_name = torch.cuda.get_device_name() if gpu else "cpu"
    rows = []
    doc = {"device": device_name, "dtype": str(dtype), "torch": torch.__version__,
           "command": " ".join([os.path.basename(__file__), *(sys.argv[1:] if argv is None else argv)]),
           "peak_memory": ("CUDA max_memory_allocated above the inputs, reset per implementation" if gpu else
                           "CPU: growth of the process peak RSS (VmHWM) during one step, reset per "
                           "implementation via /proc/self/clear_refs; null where unavailable"),
           "complete": False, "rows": rows}

    def on_row(row):  # incremental: the file always holds every row measured so far
        rows.append(row)
        write_json(args.json, doc)

    write_json(args.json, doc)
    for name, V, with_bias, train_weight in heads:
        bench_head(name, H, V, with_bias, train_weight, samples, length, args.device, dtype, methods,
                   reps=args.reps, on_row=on_row)
    doc["complete"] = True
    write_json(args.json, doc)
    print(f"device: {device_name}  dtype: {dtype}  N = {samples} x {length} tokens  (forward + backward)")
    print(f"{'head':6} {'method':14} {'V':>7} {'median ms':>10} {'peak MiB':>9}")
    for r in rows:
        if "error" in r:
            print(f"{r['head']:6} {r['method']:14} {r['V']:>7}  failed: {r['error']}")
        else:
            mem = "-" if r["peak_mib"] is None else f"{r['peak_mib']:.1f}"
            print(f"{r['head']:6} {r['method']:14} {r['V']:>7} {r['ms']:>10.2f} {mem:>9}")
    failed = [f"{r['head']}/{r['method']}" for r in rows if "error" in r]
    if failed:
        print(f"FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
