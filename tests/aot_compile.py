"""Ahead-of-time compile of every Triton kernel specialization the launchers pick at real shapes.

    python tests/aot_compile.py [--quick | --full | --all] [--targets sm_90,sm_80] [--jobs N] [--json OUT]

No GPU is needed: each kernel is compiled by Triton's own compiler and the ptxas that ships with
triton for GPUTarget("cuda", 90, 32) (H100/H200) and GPUTarget("cuda", 80, 32) (A100). The
specializations are the ones the launchers produce for the real shapes (Janus-Pro-1B/7B: head
dim 128, 16/32 heads, hidden 2048/4096, image vocab 16384, text vocab 102400, 16-512 decode rows,
bf16/fp16/fp32, every constexpr flag combination): for fastbicot/kernels/decode_attention.py
and fastbicot/kernels/cfg_sample.py the launch plan comes from the launchers themselves (`_prefix_launch`,
`_suffix_merge_launch`, `_cfg_launch`, with on_gpu=True, from CPU tensors of the real shapes that
are never touched); for token_logprobs and grpo_loss from their `_config` and the launchers'
argument lists. Pointer/integer specializations (16-byte alignment, divisibility by 16, == 1) are
Triton's own (its binder and `_pack_args`, the same calls a launch makes). Identical
specializations are compiled once.

Fails (exit 1) on a compile error or when a kernel needs more shared memory per block than the
target has (sm_90: 227 KB, sm_80: 163 KB: such a launch raises OutOfResources). Prints one row per
compile: registers per thread, spill stores/loads and stack frame (bytes per thread, from ptxas
-v), shared memory per block, warps and stages. Three sets:
  --quick  the prefix kernel (bf16/fp32) on both targets and one production launch of every other
           kernel on sm_90 (the default pytest run, tests/test_aot_compile.py; ~1 min on 2 cores);
  --full   every kernel x every tile/warp/stage config its launcher picks at the real shapes x
           bf16/fp32 x both targets, the sampler with its production flag sets (keyed streams, as
           the rollout launches it, and unkeyed) plus all flags on,
           every grpo flag combination (.ci/run; ~140 compiles);
  --all    the whole cross product: fp16 too, every constexpr flag combination, more row counts and
           token counts (~630 compiles: for a many-core machine, e.g. --jobs 16).

Needs TRITON_INTERPRET unset (the script drops it before importing triton), a triton with the
NVIDIA backend (3.6 to 3.9 tested) and nothing else: no CUDA driver, no device.
"""

import argparse
import contextlib
import importlib
import io
import itertools
import json
import os
import re
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

# Triton chooses interpreter or compiler when a kernel is decorated (at import): drop the switch
# before anything imports triton. The ptxas log is printed by triton when it compiles; a fresh cache
# directory makes every compile run ptxas (and keeps this run out of the user's cache).
os.environ.pop("TRITON_INTERPRET", None)
os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9 warns when unset; 1 = its default
if "FASTBICOT_AOT_CACHE" not in os.environ:  # inherited by the spawned workers; removed at the end
    os.environ["FASTBICOT_AOT_CACHE"] = tempfile.mkdtemp(prefix="fastbicot_aot_")
    _OWN_CACHE = os.environ["FASTBICOT_AOT_CACHE"]
else:
    _OWN_CACHE = None
os.environ["TRITON_CACHE_DIR"] = os.environ["FASTBICOT_AOT_CACHE"]

import torch
import triton

TARGETS = {"sm_90": (90, 227 * 1024), "sm_80": (80, 163 * 1024)}  # capability, shared bytes per block
if os.environ.get("FASTBICOT_AOT_SHARED_LIMIT"):
    TARGETS = {t: (cap, int(os.environ["FASTBICOT_AOT_SHARED_LIMIT"])) for t, (cap, _) in TARGETS.items()}
MODELS = {"janus-pro-1b": {"heads": 16, "hidden": 2048}, "janus-pro-7b": {"heads": 32, "hidden": 4096}}
HEAD_DIM = 128
IMAGE_VOCAB, TEXT_VOCAB = 16384, 102400
SMS = 132  # H100/H200 SXM; only the prefix kernel's split count reads it
PREFIX_LEN, SUFFIX_LEN = 700, 576  # prompt + CoT tokens shared by a group; a row's image tokens


class Spec:
    """One kernel launch to compile: the JIT function, its positional args and keyword args."""

    def __init__(self, kernel, label, fn, args, kwargs, quick=False):
        self.kernel, self.label, self.fn, self.args, self.kwargs, self.quick = (
            kernel, label, fn, args, kwargs, quick)


def _empty(*shape, dtype):
    return torch.empty(*shape, dtype=dtype)  # CPU pages never touched: real shapes cost nothing


def _dt(dtype):
    return str(dtype).replace("torch.", "").replace("bfloat16", "bf16").replace("float", "fp")


# ---------------------------------------------------------------------------------------------- specs


def decode_attention_specs(full):
    da = importlib.import_module("fastbicot.kernels.decode_attention")  # the package re-exports functions

    dtypes = [torch.bfloat16, torch.float32] + ([torch.float16] if full > 1 else [])
    rows_list = [16, 32, 33, 64, 512] if full else [64]
    specs = []
    for model, cfg in MODELS.items():
        if not full and model != "janus-pro-1b":
            continue
        H = cfg["heads"]
        for dtype in dtypes:
            for B in rows_list:
                P = max(2, B // 8 + 1)  # groups of 8 conditional rows + the shared unconditional prefix
                q = _empty(B, H, HEAD_DIM, dtype=dtype)
                kv = _empty(P, 2, H, PREFIX_LEN, HEAD_DIM, dtype=dtype)  # the rollout's [P, 2, H, L, D]
                skv = _empty(B, 2, H, SUFFIX_LEN, HEAD_DIM, dtype=dtype)
                plen, slen = _empty(P, dtype=torch.int32), _empty(B, dtype=torch.int32)
                layout = (_empty(B, dtype=torch.int32), _empty(P + 1, dtype=torch.int32))
                scale = HEAD_DIM ** -0.5
                _, args, kw, parts = da._prefix_launch(q, kv[:, 0], kv[:, 1], plen, layout, scale, None,
                                                          on_gpu=True, sms=SMS)
                tag = f"{model} {_dt(dtype)} rows={B} D={HEAD_DIM} BLOCK_M={kw['BLOCK_M']}"
                specs.append(Spec("decode_attention._prefix_kernel", tag, da._prefix_kernel, args, kw,
                                  quick=dtype in (torch.float32, torch.bfloat16)))
                suffix = (skv[:, 0], skv[:, 1], slen)
                for name, prt, sfx, out_dtype in (("grouped", parts, suffix, dtype),
                                                  ("prefix-only", parts, None, torch.float32),
                                                  ("suffix-only", None, suffix, torch.float32)):
                    _, args, kw, _ = da._suffix_merge_launch(q, prt, sfx, scale, out_dtype)
                    specs.append(Spec("decode_attention._suffix_merge_kernel",
                                      f"{model} {_dt(dtype)} {name} BLOCK_S={kw['BLOCK_S']}",
                                      da._suffix_merge_kernel, args, kw,
                                      quick=name == "grouped" and dtype == torch.bfloat16))
    return specs


def cfg_sample_specs(full):
    cs = importlib.import_module("fastbicot.kernels.cfg_sample")  # the package re-exports functions

    dtypes = [torch.bfloat16, torch.float32] + ([torch.float16] if full > 1 else [])
    # --full: the flag sets of the production calls (the rollout keys every row's stream by its
    # sample: CoT text: top-k 50; CFG image: guidance with the seed in device memory; greedy with
    # guidance, which reads no stream), the same without keys (the public default), and the one
    # with every optional branch on. --all: every combination.
    # (has_u, greedy, top_k, top_p, rng_tensor, keyed)
    full_flags = [(False, False, 50, 1.0, False, True), (True, False, 0, 1.0, True, True),
                  (False, False, 50, 1.0, False, False), (True, False, 0, 1.0, True, False),
                  (True, True, 0, 1.0, False, False), (True, False, 50, 0.9, True, True)]
    specs = []
    for V in (IMAGE_VOCAB, TEXT_VOCAB):
        for dtype in dtypes:
            for B in ([16, 512] if full > 1 else [16]):
                c = _empty(B, V, dtype=dtype)
                for has_u, greedy, top_k, top_p, rng_tensor, keyed in itertools.product(
                        (False, True), (False, True), (0, 50), (1.0, 0.9), (False, True), (False, True)):
                    if full == 1 and (has_u, greedy, top_k, top_p, rng_tensor, keyed) not in full_flags:
                        continue
                    seed = torch.zeros((), dtype=torch.int64) if rng_tensor else 5
                    keys = _empty(B, dtype=torch.int64) if keyed else None
                    kern, _, args, kw, _ = cs._cfg_launch(
                        c, c if has_u else None, 5.0 if has_u else 1.0, 0.0 if greedy else 1.0,
                        top_k, top_p, seed, 0, keys, on_gpu=True)
                    flags = ",".join(k for k in ("HAS_U", "GREEDY", "DO_TOPK", "DO_TOPP", "RNG_IN_MEMORY",
                                                 "HAS_KEYS") if kw[k]) or "plain"
                    # quick: what the rollout launches for the CoT text default (top-k 50) and the
                    # CFG image default, keyed
                    quick = dtype == torch.bfloat16 and not greedy and not rng_tensor and keyed and (
                        (V == TEXT_VOCAB and not has_u and top_k and top_p == 1.0)
                        or (V == IMAGE_VOCAB and has_u and not top_k and top_p == 1.0))
                    specs.append(Spec(f"cfg_sample.{kern.__name__}",
                                      f"V={V} {_dt(dtype)} rows={B} {flags}", kern, args, kw,
                                      quick=bool(quick)))
    return specs


def token_logprobs_specs(full):
    tlp = importlib.import_module("fastbicot.kernels.token_logprobs")  # the package re-exports functions

    cuda = torch.device("cuda")
    specs = []
    dtypes = [torch.bfloat16, torch.float32] + ([torch.float16] if full > 1 else [])
    for model, cfg in MODELS.items():
        H = cfg["hidden"]
        for V in (IMAGE_VOCAB, TEXT_VOCAB):
            for dtype in dtypes:
                for N in ([512, 9216, 5411] if full > 1 else [5411] if full else [9216]):
                    for has_bias in (False, True):
                        conf = tlp._config(cuda, dtype)
                        flags = {"UPCAST": False, "IEEE": dtype == torch.float32}
                        bn, bv = conf["BLOCK_N"], conf["BLOCK_V"]
                        row_blocks, tiles = triton.cdiv(N, bn), triton.cdiv(V, bv)
                        splits = max(1, min(tiles, triton.cdiv(4 * SMS, row_blocks)))
                        tiles_per_split = triton.cdiv(tiles, splits)
                        h, w = _empty(N, H, dtype=dtype), _empty(V, H, dtype=dtype)
                        b = _empty(V, dtype=dtype) if has_bias else h
                        t, f32 = _empty(N, dtype=torch.int64), _empty(N, dtype=torch.float32)
                        tag = f"{model} V={V} {_dt(dtype)} N={N}{' bias' if has_bias else ''}"
                        quick = (dtype == torch.bfloat16 and model == "janus-pro-1b" and V == IMAGE_VOCAB
                                 and has_bias)
                        specs.append(Spec("token_logprobs._fwd_kernel", tag, tlp._fwd_kernel,
                                          (h, w, b, t, f32, f32, N, V, H, h.stride(0), w.stride(0), 1.0,
                                           tiles_per_split),
                                          {"HAS_BIAS": has_bias, **flags, **conf}, quick=quick))
                        chunk = max(bv, (tlp._GPU_CHUNK_BYTES // (N * h.element_size())) // bv * bv)
                        chunk = min(chunk, triton.cdiv(V, bv) * bv)
                        g = _empty(N, chunk, dtype=dtype)
                        specs.append(Spec("token_logprobs._grad_logits_kernel", tag, tlp._grad_logits_kernel,
                                          (h, w, b, t, f32, f32, g, N, V, H, chunk, chunk, h.stride(0),
                                           w.stride(0), 1.0),
                                          {"HAS_BIAS": has_bias, **flags, **conf}))
                        dh = _empty(N, H, dtype=torch.float32)
                        mm = {"BLOCK_M": bn, "BLOCK_N": bv, "BLOCK_K": conf["BLOCK_K"],
                              "num_warps": conf["num_warps"], "num_stages": conf["num_stages"]}
                        specs.append(Spec("token_logprobs._matmul_acc_kernel", f"{model} {_dt(dtype)} N={N}",
                                          tlp._matmul_acc_kernel,
                                          (g, w, dh, N, chunk, H, g.stride(0), w.stride(0), dh.stride(0)),
                                          {**flags, **mm}))
    return specs


def grpo_loss_specs(full):
    gl = importlib.import_module("fastbicot.kernels.grpo_loss")  # the package re-exports functions

    specs = []
    for N in ([9216, 5411] if full > 1 else [5411]):
        f32 = _empty(N, dtype=torch.float32)
        seq = _empty(N, dtype=torch.int64)
        for has_old in (False, True):
            for has_ref in (False, True):
                for per_seq in (False, True):
                    adv = _empty(64, dtype=torch.float32) if per_seq else f32
                    kw = {"HAS_OLD": has_old, "HAS_REF": has_ref, "ADV_PER_SEQ": per_seq, "BLOCK": gl._BLOCK}
                    tag = f"N={N} " + (",".join(k for k in ("HAS_OLD", "HAS_REF", "ADV_PER_SEQ") if kw[k])
                                       or "plain")
                    quick = has_old and has_ref and per_seq
                    specs.append(Spec("grpo_loss._fwd_kernel", tag, gl._fwd_kernel,
                                      (f32, f32, f32, adv, seq, f32, f32, f32, f32, N, 0.04, 0.2, 0.28), kw,
                                      quick=quick))
                    specs.append(Spec("grpo_loss._bwd_kernel", tag, gl._bwd_kernel,
                                      (f32, f32, f32, adv, seq, f32, f32, N, 0.04, 0.2, 0.28), kw))
    return specs


def all_specs(full):
    """full: 0 = --quick, 1 = --full (CI), 2 = --all."""
    specs = (decode_attention_specs(full) + cfg_sample_specs(full) + token_logprobs_specs(full)
             + grpo_loss_specs(full))
    return specs if full else [s for s in specs if s.quick]


def quick_targets(spec, targets):
    """--quick compiles the prefix kernel (issue 14's fix) for every target, the rest for the first."""
    return targets if spec.kernel == "decode_attention._prefix_kernel" else targets[:1]


# ---------------------------------------------------------------------------------------------- compile


def _target(name):
    from triton.backends.compiler import GPUTarget

    return GPUTarget("cuda", TARGETS[name][0], 32)


def _specialize(spec, target):
    """(signature, constexprs, attrs, options) exactly as a launch computes them (triton 3.6-3.9)."""
    from triton import knobs
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = spec.fn
    kwargs = dict(spec.kwargs)
    kwargs["debug"] = False
    for knob in ("instrumentation_mode", "fpsan_homomorphic_casts"):  # 3.9 adds these in JITFunction.run
        if hasattr(knobs.compilation, knob):
            kwargs[knob] = getattr(knobs.compilation, knob)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound_args, specialization, options = binder(*spec.args, **kwargs)
    return fn._pack_args(backend, kwargs, bound_args, specialization, options)


def _key(spec, target_name):
    options, signature, constexprs, attrs = _specialize(spec, _target(target_name))
    return repr((spec.kernel, target_name, sorted(signature.items()), sorted(constexprs.items(), key=str),
                 sorted(attrs.items(), key=str), sorted(options.__dict__.items(), key=str)))


_PTXAS = {
    "regs": re.compile(r"Used (\d+) registers"),
    "stack": re.compile(r"(\d+) bytes stack frame"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
}
_SPECS = {}


def _compile(job):
    """Worker: compile spec `index` of the (full/quick) list for `target_name`; returns a result row."""
    index, target_name, full = job
    if full not in _SPECS:
        _SPECS[full] = all_specs(full)
    spec = _SPECS[full][index]
    from triton.compiler import ASTSource

    row = {"kernel": spec.kernel, "variant": spec.label, "target": target_name,
           "shared_limit": TARGETS[target_name][1]}
    t0 = time.time()
    log = io.StringIO()
    try:
        target = _target(target_name)
        options, signature, constexprs, attrs = _specialize(spec, target)
        src = ASTSource(spec.fn, signature, constexprs, attrs)
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(src, target=target, options=options.__dict__)
        md = compiled.metadata
        row.update(shared=int(md.shared), num_warps=int(md.num_warps), num_stages=int(md.num_stages))
        text = log.getvalue()
        for name, pattern in _PTXAS.items():
            m = pattern.search(text)
            row[name] = int(m.group(1)) if m else None
        row["status"] = "ok" if row["shared"] <= row["shared_limit"] else "shared memory over the limit"
    except Exception as exc:  # noqa: BLE001 -- a compile error is a result to report, not a crash of the run
        row["status"] = f"compile error: {type(exc).__name__}: {str(exc).strip()[:2000]}"
    row["seconds"] = round(time.time() - t0, 2)
    return row


def _fmt(v):
    return "?" if v is None else str(v)


def table(rows):
    lines = ["| kernel | variant | target | regs | spill st/ld (B) | stack (B) | shared (KB) | warps/stages | s | status |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        shared = f"{r['shared'] / 1024:.1f}" if "shared" in r else "?"
        lines.append(f"| {r['kernel']} | {r['variant']} | {r['target']} | {_fmt(r.get('regs'))} | "
                     f"{_fmt(r.get('spill_stores'))}/{_fmt(r.get('spill_loads'))} | {_fmt(r.get('stack'))} | "
                     f"{shared} | {_fmt(r.get('num_warps'))}/{_fmt(r.get('num_stages'))} | {r['seconds']} | "
                     f"{r['status'].splitlines()[0][:120]} |")
    return "\n".join(lines)


def run(full, targets, jobs, only=None):
    specs = all_specs(full)
    todo, seen = [], set()
    for i, spec in enumerate(specs):
        if only and not re.search(only, f"{spec.kernel} {spec.label}"):
            continue
        for t in targets if full else quick_targets(spec, targets):
            key = _key(spec, t)
            if key not in seen:
                seen.add(key)
                todo.append((i, t, full))
    print(f"aot_compile: triton {triton.__version__}, {len(todo)} distinct compiles "
          f"({len(specs)} launch plans x {len(targets)} targets), {jobs} jobs", flush=True)
    if jobs <= 1:
        rows = [_compile(j) for j in todo]
    else:
        with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn")) as pool:
            rows = list(pool.map(_compile, todo))
    rows.sort(key=lambda r: (r["kernel"], r["target"], r["variant"]))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="the small subset run by pytest (default)")
    mode.add_argument("--full", action="store_true",
                      help="every kernel, launcher tile/stage config, dtype bf16/fp32, production flag sets (CI)")
    mode.add_argument("--all", action="store_true",
                      help="the whole cross product (fp16, every flag combination, more row counts; slow)")
    ap.add_argument("--targets", default="sm_90,sm_80")
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--only", help="regex over 'kernel variant' to compile a subset")
    ap.add_argument("--json", help="write the rows to this file")
    ap.add_argument("--shared-limit-kb", type=float,
                    help="override every target's shared-memory limit (tests use it to see the check fail)")
    a = ap.parse_args(argv)
    targets = [t.strip() for t in a.targets.split(",") if t.strip()]
    for t in targets:
        if t not in TARGETS:
            ap.error(f"unknown target {t!r}; known: {', '.join(TARGETS)}")
    if a.shared_limit_kb is not None:
        for t in TARGETS:
            TARGETS[t] = (TARGETS[t][0], int(a.shared_limit_kb * 1024))
        os.environ["FASTBICOT_AOT_SHARED_LIMIT"] = str(int(a.shared_limit_kb * 1024))  # for spawned workers
    t0 = time.time()
    try:
        rows = run(2 if a.all else 1 if a.full else 0, targets, a.jobs, a.only)
    finally:
        if _OWN_CACHE:
            shutil.rmtree(_OWN_CACHE, ignore_errors=True)
    print(table(rows))
    bad = [r for r in rows if r["status"] != "ok"]
    for r in bad:
        print(f"\nFAILED {r['kernel']} [{r['variant']}] on {r['target']}: {r['status']}", file=sys.stderr)
    spills = [r for r in rows if (r.get("spill_stores") or 0) > 0]
    print(f"\naot_compile: {len(rows)} compiles in {time.time() - t0:.0f} s, {len(bad)} failed, "
          f"{len(spills)} with register spills")
    if a.json:
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        with open(a.json, "w") as f:
            json.dump({"triton": triton.__version__, "rows": rows}, f, indent=1)
    return 1 if bad or not rows else 0


if __name__ == "__main__":
    sys.exit(main())
