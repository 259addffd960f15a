"""Benchmark: per-token log-probs through a linear head + GRPO loss, forward + backward.

    python bench/grpo_loss.py [--device cuda|cpu] [--json OUT]

Compares, per head (image: H=4096, V=16384, bias, frozen head; text: H=4096, V=102400, no bias,
trainable head), on N = samples x (CoT + image) tokens:
  fastbicot      token_logprobs + grpo_loss (fused, never [N, V])
  torch_eager    full logits + log_softmax + gather + the same loss formulas
  torch_compile  torch.compile of torch_eager (GPU by default; --compile on CPU)
  liger          LigerFusedLinearGRPOLoss, when liger_kernel is importable
Reports median time (triton.testing.do_bench on GPU, a timer median on CPU) and peak memory
beyond the inputs (CUDA: max_memory_allocated; CPU: peak RSS growth from /proc/self/status
VmHWM after resetting it through /proc/self/clear_refs).
"""

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from fastbicot.kernels.grpo_loss import grpo_loss
from fastbicot.kernels.token_logprobs import token_logprobs

BETA = 0.01


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


def measure(step, leaves, device, reps):
    def run():
        for t in leaves:
            t.grad = None
        step().backward()

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
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    base = _rss_kib("VmRSS")
    run()
    peak = (_rss_kib("VmHWM") - base) / 1024
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        run()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), peak


def bench_head(name, H, V, with_bias, train_weight, samples, length, device, dtype, compile_, reps):
    N = samples * length
    hidden = torch.randn(N, H, device=device, dtype=dtype, requires_grad=True)
    weight = (torch.randn(V, H, device=device) / H**0.5).to(dtype).requires_grad_(train_weight)
    bias = torch.randn(V, device=device, dtype=dtype) if with_bias else None
    targets = torch.randint(0, V, (N,), device=device)
    seq_ids = torch.arange(samples, device=device).repeat_interleave(length)
    adv = torch.randn(samples, device=device)
    ref = -torch.rand(N, device=device) * 5
    leaves = [hidden] + ([weight] if train_weight else [])
    methods = {
        "fastbicot": lambda: fused_step(hidden, weight, bias, targets, adv, seq_ids, ref),
        "torch_eager": lambda: eager_step(hidden, weight, bias, targets, adv[seq_ids], ref),
    }
    if compile_:
        compiled = torch.compile(eager_step)
        methods["torch_compile"] = lambda: compiled(hidden, weight, bias, targets, adv[seq_ids], ref)
    try:
        liger = liger_step_factory(samples, length)
        methods["liger"] = lambda: liger(hidden, weight, bias, targets, adv, ref)
    except ImportError:
        pass
    rows = []
    for method, step in methods.items():
        try:
            ms, mib = measure(step, leaves, device, reps)
            rows.append(dict(head=name, method=method, N=N, H=H, V=V, ms=ms, peak_mib=mib))
        except Exception as e:  # a baseline failing (e.g. OOM, API drift) must not hide the others
            rows.append(dict(head=name, method=method, N=N, H=H, V=V, error=f"{type(e).__name__}: {e}"[:200]))
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--samples", type=int, default=None, help="sequences (GPU 8, CPU 2)")
    p.add_argument("--cot", type=int, default=None, help="CoT tokens per sample (GPU 100, CPU 20)")
    p.add_argument("--image", type=int, default=None, help="image tokens per sample (GPU 576, CPU 100)")
    p.add_argument("--hidden", type=int, default=None, help="H (GPU 4096, CPU 128)")
    p.add_argument("--compile", action="store_true", help="include torch.compile on CPU (slow to compile)")
    p.add_argument("--reps", type=int, default=5, help="CPU timing repetitions")
    args = p.parse_args()
    gpu = args.device == "cuda"
    samples = args.samples or (8 if gpu else 2)
    length = (args.cot or (100 if gpu else 20)) + (args.image or (576 if gpu else 100))
    H = args.hidden or (4096 if gpu else 128)
    heads = [("image", 16384 if gpu else 4096, True, False), ("text", 102400 if gpu else 16384, False, True)]
    dtype = torch.bfloat16 if gpu else torch.float32
    rows = []
    for name, V, with_bias, train_weight in heads:
        rows += bench_head(name, H, V, with_bias, train_weight, samples, length, args.device, dtype,
                           compile_=gpu or args.compile, reps=args.reps)
    device_name = torch.cuda.get_device_name() if gpu else "cpu"
    print(f"device: {device_name}  dtype: {dtype}  N = {samples} x {length} tokens  (forward + backward)")
    print(f"{'head':6} {'method':14} {'V':>7} {'median ms':>10} {'peak MiB':>9}")
    for r in rows:
        if "error" in r:
            print(f"{r['head']:6} {r['method']:14} {r['V']:>7}  failed: {r['error']}")
        else:
            print(f"{r['head']:6} {r['method']:14} {r['V']:>7} {r['ms']:>10.2f} {r['peak_mib']:>9.1f}")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(dict(device=device_name, dtype=str(dtype), torch=torch.__version__, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
