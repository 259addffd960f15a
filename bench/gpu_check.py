"""One prepared GPU run: build with CUDA, run the gpu tests, benchmark at real shapes.

    python3 bench/gpu_check.py [--out DIR] [--budget-s 450] [--only NAME,...] [--smoke]

Meant for a session that is lent an H100/H200 for a few minutes (docs/gpu_check.md): one command,
about 8 minutes of wall time, every stage in its own subprocess with its own timeout, a failure or
timeout in one stage never stopping the rest. Stages, in priority order (a stage that no longer fits
the remaining --budget-s is skipped, and says so):

    env             nvidia-smi, torch / triton / transformers versions
    build           pip install -e . --no-deps --no-build-isolation (fastbicot._C with its CUDA
                    kernels; without network: nothing is downloaded); falls back to no extension
    gpu-tests       pytest -m gpu (every gpu-marked test)
    kernel-tests    the kernel test files on CUDA (their Triton cases run compiled, not interpreted)
    rollout-1b-16, rollout-1b-64, rollout-7b-16, rollout-7b-64
                    bench/rollout_throughput.py, seed loop vs transformers generate vs fastbicot
    sampler-16384, sampler-102400
                    bench/cfg_sampling.py (fastbicot vs torch eager / compile / FlashInfer if installed)
    grpo-loss       bench/grpo_loss.py (token_logprobs + grpo_loss vs torch eager / compile / Liger)
    vq-decode       bench/vq_decode.py
    train-step      bench/train_step.py --preset janus-pro-1b --device cuda --rounds 1 --repeats 2 (when the file exists)
    train-step-7b   bench/train_step.py --preset janus-pro-7b --layers 8 --device cuda --rounds 1 --repeats 2

Writes under --out (default $OUT when set, else bench/out/gpu_check) three files, so that they fit
what a device call brings back (8 files at most): summary.md (a device/commit header, a table of the
stages and each benchmark's printed table) ready to append to bench/RESULTS.md; summary.json (every
stage's status and each benchmark's whole JSON result inline, rewritten after every stage, so a run
cut short keeps what it measured); files.tar.gz (each benchmark's JSON file and each stage's log,
which are written to --out/files/ while the stages run and packed at the end). Without a CUDA device every stage
that needs one is skipped, saying so (exit status 0); --smoke then runs the same stages on tiny CPU
shapes to check the plumbing. Exit status 1 when any stage that ran failed.
"""

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _py(*args):
    return [sys.executable, *args]


def stages(out, smoke):
    """(name, command, timeout_s, needs_gpu, json file or None). --smoke swaps in tiny CPU shapes."""

    def j(name):
        return os.path.join(out, f"{name}.json")

    kernel_tests = ["tests/test_cfg_sample.py", "tests/test_decode_attention.py", "tests/test_token_logprobs.py",
                    "tests/test_grpo_loss.py"]
    env_cmd = ("nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv || true; "
               f"{sys.executable} -c \"import torch, triton, transformers, platform; "
               "print('python', platform.python_version(), 'torch', torch.__version__, 'cuda', torch.version.cuda, "
               "'triton', triton.__version__, 'transformers', transformers.__version__); "
               "print('device', torch.cuda.get_device_name() if torch.cuda.is_available() else 'none')\"; "
               "git log -1 --format='commit %H %s' 2>/dev/null || true")
    build_cmd = (f"{sys.executable} -m pip install -q --no-deps --no-build-isolation -e . "
                 f"|| FASTBICOT_NO_EXT=1 {sys.executable} -m pip install -q --no-deps --no-build-isolation -e .; "
                 f"{sys.executable} -c \"import fastbicot._C as c; print('fastbicot._C', c.__file__)\" "
                 "|| echo 'fastbicot._C not built: the torch fallbacks run'")
    if smoke:
        return [
            ("env", ["bash", "-c", env_cmd], 60, False, None),
            ("rollout-tiny", _py("bench/rollout_throughput.py", "--preset", "tiny", "--device", "cpu", "--batch",
                                 "2", "--repeats", "1", "--json", j("rollout-tiny")), 300, False, j("rollout-tiny")),
            ("sampler-16384", _py("bench/cfg_sampling.py", "--device", "cpu", "--no-compile", "--batch", "4",
                                  "--reps", "2", "--json", j("sampler-16384")), 300, False, j("sampler-16384")),
            ("sampler-102400", _py("bench/cfg_sampling.py", "--device", "cpu", "--no-compile", "--batch", "2",
                                   "--vocab", "102400", "--configs", "topk_topp", "--reps", "1", "--json",
                                   j("sampler-102400")), 300, False, j("sampler-102400")),
            ("grpo-loss", _py("bench/grpo_loss.py", "--device", "cpu", "--reps", "1", "--json", j("grpo-loss")),
             300, False, j("grpo-loss")),
            ("train-step", _py("bench/train_step.py", "--preset", "tiny", "--device", "cpu", "--rounds", "1",
                               "--repeats", "2", "--json", j("train-step")), 300, False, j("train-step")),
        ]
    rollout = []
    for preset, short in (("janus-pro-1b", "1b"), ("janus-pro-7b", "7b")):
        for batch, timeout in ((16, 75 if short == "1b" else 110), (64, 90 if short == "1b" else 150)):
            name = f"rollout-{short}-{batch}"
            rollout.append((name, _py("bench/rollout_throughput.py", "--preset", preset, "--device", "cuda",
                                      "--batch", str(batch), "--repeats", "2", "--json", j(name)),
                            timeout, True, j(name)))
    r1b16, r1b64, r7b16, r7b64 = rollout
    return [
        ("env", ["bash", "-c", env_cmd], 30, False, None),
        ("build", ["bash", "-c", build_cmd], 240, True, None),
        ("gpu-tests", _py("-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests"), 150, True, None),
        r1b16,
        ("sampler-16384", _py("bench/cfg_sampling.py", "--vocab", "16384", "--batch", "16", "64", "256",
                              "--json", j("sampler-16384")), 90, True, j("sampler-16384")),
        ("sampler-102400", _py("bench/cfg_sampling.py", "--vocab", "102400", "--batch", "16", "64",
                               "--json", j("sampler-102400")), 90, True, j("sampler-102400")),
        ("grpo-loss", _py("bench/grpo_loss.py", "--json", j("grpo-loss")), 90, True, j("grpo-loss")),
        r1b64,
        r7b16,
        ("train-step", _py("bench/train_step.py", "--preset", "janus-pro-1b", "--device", "cuda", "--rounds", "1",
                           "--repeats", "2", "--json", j("train-step")), 150, True, j("train-step")),
        ("vq-decode", _py("bench/vq_decode.py", "--batches", "1,16", "--json", j("vq-decode")), 90, True,
         j("vq-decode")),
        ("kernel-tests", _py("-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *kernel_tests), 150, True, None),
        r7b64,
        # 7B's layer shapes, 8 of its 30 layers: fastbicot's fp32 masters + AdamW of all 30 (~170 GiB
        # at the step, fastbicot plan) do not fit one GPU; each implementation runs in its own process
        ("train-step-7b", _py("bench/train_step.py", "--preset", "janus-pro-7b", "--layers", "8", "--device", "cuda",
                              "--rounds", "1", "--repeats", "2", "--json", j("train-step-7b")), 150, True,
         j("train-step-7b")),
    ]


def run_stage(name, cmd, timeout, log_path):
    """Run cmd in its own process group; kill the whole group on timeout. -> (status, seconds, tail)."""
    t0 = time.time()
    with open(log_path, "w") as log:
        log.write(f"$ {' '.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env=dict(os.environ, PYTHONUNBUFFERED="1"))
        try:
            rc = proc.wait(timeout=timeout)
            status = "ok" if rc == 0 else f"failed (exit {rc})"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            status = f"timeout ({timeout} s)"
    with open(log_path, errors="replace") as f:
        tail = f.read().splitlines()[-30:]
    return status, time.time() - t0, tail


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT") or os.path.join(ROOT, "bench", "out", "gpu_check"))
    ap.add_argument("--budget-s", type=float, default=450.0,
                    help="wall-clock budget for all stages; a stage whose timeout no longer fits is skipped")
    ap.add_argument("--only", help="comma-separated stage names")
    ap.add_argument("--smoke", action="store_true", help="no GPU: run the stages on tiny CPU shapes")
    a = ap.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    files = os.path.join(a.out, "files")
    logs = files
    os.makedirs(files, exist_ok=True)
    try:
        import torch

        gpu = torch.cuda.is_available()
        device_name = torch.cuda.get_device_name() if gpu else "no CUDA device"
    except ImportError:
        gpu, device_name = False, "torch not importable"
    if not gpu:
        print(f"gpu_check: {device_name}: the GPU stages are skipped"
              + (" (--smoke: tiny CPU shapes instead)" if a.smoke else ""), flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                            check=False).stdout.strip() or "unknown"
    only = set(a.only.split(",")) if a.only else None
    t_start = time.time()
    results = []
    for name, cmd, timeout, needs_gpu, json_path in stages(files, a.smoke and not gpu):
        if only and name not in only:
            continue
        row = {"stage": name, "command": " ".join(cmd), "timeout_s": timeout, "json": json_path}
        left = a.budget_s - (time.time() - t_start)
        if needs_gpu and not gpu:
            row.update(status="skipped: no CUDA device", seconds=0.0, tail=[])
        elif name.startswith("train-step") and not os.path.exists(os.path.join(ROOT, "bench", "train_step.py")):
            row.update(status="skipped: bench/train_step.py does not exist yet", seconds=0.0, tail=[])
        elif timeout > left and name != "env":
            row.update(status=f"skipped: {left:.0f} s of the budget left, timeout {timeout} s", seconds=0.0,
                       tail=[])
        else:
            if json_path and os.path.exists(json_path):
                os.remove(json_path)
            status, secs, tail = run_stage(name, cmd, timeout, os.path.join(logs, f"{name}.log"))
            row.update(status=status, seconds=round(secs, 1), tail=tail)
            if json_path and os.path.exists(json_path):
                try:
                    with open(json_path) as f:
                        row["result"] = json.load(f)
                except (OSError, ValueError) as exc:
                    row["result"] = f"unreadable: {exc}"
            elif json_path:
                row["json"] = None
        if row["status"].startswith("skipped"):
            row["json"] = None
        print(f"gpu_check: {name:<15} {row['status']:<40} {row['seconds']:7.1f} s", flush=True)
        results.append(row)
        with open(os.path.join(a.out, "summary.json"), "w") as f:
            json.dump({"device": device_name, "commit": commit, "stages": results}, f, indent=1)
    md = summary_markdown(device_name, commit, results, time.time() - t_start)
    with open(os.path.join(a.out, "summary.md"), "w") as f:
        f.write(md)
    with tarfile.open(os.path.join(a.out, "files.tar.gz"), "w:gz") as tar:
        tar.add(files, arcname="gpu_check")
    shutil.rmtree(files, ignore_errors=True)
    print("\n" + md)
    if shutil.which("nvidia-smi") is None and gpu:
        print("gpu_check: nvidia-smi not found (env stage)", file=sys.stderr)
    failed = [r for r in results if not (r["status"] == "ok" or r["status"].startswith("skipped"))]
    return 1 if failed else 0


def summary_markdown(device_name, commit, results, total_s):
    title = f"### GPU check: {device_name}, commit {commit} (`python3 bench/gpu_check.py`, {total_s:.0f} s wall)"
    lines = [title, "",
             "| stage | status | s | output |", "| --- | --- | --- | --- |"]
    for r in results:
        out = os.path.basename(r["json"]) if r.get("json") else ""
        lines.append(f"| {r['stage']} | {r['status']} | {r['seconds']} | {out} |")
    for r in results:
        if r["tail"] and r["stage"] != "build":
            lines += ["", f"<details><summary>{r['stage']}: last lines of output</summary>", "", "```",
                      *r["tail"], "```", "", "</details>"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
