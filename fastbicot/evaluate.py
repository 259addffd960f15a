"""``fastbicot eval``: N images per prompt with fixed seeds, scored by the config's rewards, tabled per task type.

    fastbicot eval --config configs/toy.yaml --checkpoint runs/toy/final --prompts configs/toy/prompts.jsonl \\
        [--out DIR] [--num 10] [--no-cot] [--seed 0] [--batch 8] [--task-types a,b,...] [--overwrite] \\
        [--section.key=value ...]
    python -m fastbicot.evaluate ...   (the same arguments)

Writes into ``--out``: ``results.md`` + ``results.json`` (mean ± std and count of the total and every reward
component, per ``task_type`` and overall), ``grids/<task_type>.png`` (image + prompt + plan + reward),
``samples.jsonl`` (one line per image: prompt, task_type, plan, image file, scores), ``images/`` and
``manifest.json`` (every sampling setting: the resolved config, checkpoint, prompt file and its sha256, N,
the seed of every batch, --no-cot, library versions). The same command twice gives the same images: batch
``k`` (prompts ``[k*batch, (k+1)*batch)``) is sampled with seed ``batch_seed(seed, k*batch)``; the images
depend on ``--batch`` too (it fixes which prompts share a random stream), which the manifest records.

Python: ``evaluate(config, prompts=..., out_dir=..., checkpoint=None, num_per_prompt=10, use_cot=True,
seed=0, batch=8, overwrite=False) -> dict`` (the content of results.json). See docs/eval.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import sys
import time
from types import SimpleNamespace

# T2I-CompBench's task types, plus the two the T2I-R1 data also uses ("non" for non-spatial, "object");
# the built-in rule rewards accept exactly rewards.rules.KNOWN_TASK_TYPES.
COMPBENCH_TASK_TYPES = ("color", "shape", "texture", "spatial", "non-spatial", "complex", "numeracy")
DEFAULT_TASK_TYPES = COMPBENCH_TASK_TYPES + ("non", "object")
NO_TASK = "all"  # the bucket of prompts without a task_type
OVERALL = "overall"
# what an eval writes; an out dir holding any of the first three already holds an eval
MARKERS = ("manifest.json", "results.json", "samples.jsonl")
OUTPUTS = MARKERS + ("results.md", "images", "grids")
GRID_CELLS = 8  # images per task type grid: one of each of the first 8 prompts (more per prompt when fewer)
FORMAT_VERSION = 1


class EvalError(ValueError):
    """An evaluation that cannot run as asked (bad task type, a reused out dir, bad arguments)."""


def batch_seed(seed: int, start: int) -> int:
    """The random stream of the batch whose first prompt is ``start``: a function of (seed, start) only,
    so batches of different seeds never share a stream."""
    h = hashlib.blake2b(f"fastbicot/eval/{seed}/{start}".encode(), digest_size=7).digest()
    return int.from_bytes(h, "little")


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _record_lines(path: str, n: int) -> list:
    """The line number of each of the ``n`` records ``load_prompts`` read (one record per non-blank line),
    or None where the file cannot be re-read the same way."""
    try:
        from .data import _decode, _read_regular_file

        text = _decode(path, _read_regular_file(path))
        lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
        nums = [i for i, line in enumerate(lines, start=1) if line.strip()]
        if len(nums) == n:
            return nums
    except Exception:  # noqa: BLE001 -- only a nicer error message depends on it
        return [None] * n
    return [None] * n


def check_task_types(records, path: str, known) -> list:
    """The bucket of every record: its ``task_type`` (one of ``known``) or "all" when it has none. An
    unknown or non-string task type is an EvalError naming the file and the line."""
    known = list(known)
    lines = None
    out = []
    for i, r in enumerate(records):
        task = r.metadata.get("task_type")
        if task is None:
            out.append(NO_TASK)
            continue
        if not isinstance(task, str) or task not in known:
            lines = lines or _record_lines(path, len(records))
            where = f"{path}:{lines[i]}" if lines[i] is not None else f"{path} (record {i + 1})"
            raise EvalError(f"{where}: unknown task_type {task!r}; known task types are {known} (pass "
                            f"--task-types to allow others, or drop the field to put the prompt in the "
                            f"{NO_TASK!r} bucket)")
        out.append(task)
    return out


def _finite(v) -> float | None:
    v = float(v)
    return v if math.isfinite(v) else None


def _stats(values) -> dict:
    """mean, std (population, ddof=0) and count of the finite values; ``nonfinite`` counts the others."""
    xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    n = len(xs)
    mean = math.fsum(xs) / n if n else None
    std = math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / n) if n else None
    return {"mean": mean, "std": std, "count": n, "nonfinite": len(values) - n}


def summarize(samples: list, keys: list, order: list) -> dict:
    """Per bucket (in ``order``, then "overall"): prompts, images and _stats of every key of the
    samples' ``scores``. ``samples``: dicts as written to samples.jsonl."""
    buckets = {}
    for name in list(order) + [OVERALL]:
        rows = samples if name == OVERALL else [s for s in samples if s["task_type"] == name]
        if not rows:
            continue
        entry = {"prompts": len({s["prompt_index"] for s in rows}), "images": len(rows)}
        for k in keys:
            entry[k] = _stats([s["scores"].get(k) for s in rows])
        buckets[name] = entry
    return buckets


def _fmt(st: dict) -> str:
    if st["mean"] is None:
        return "n/a"
    cell = f"{st['mean']:.3f} ± {st['std']:.3f}"
    return cell + (f" ({st['nonfinite']} non-finite)" if st["nonfinite"] else "")


def results_markdown(results: dict) -> str:
    keys = results["keys"]
    s = results["settings"]
    lines = [
        "# fastbicot eval",
        "",
        (f"checkpoint `{s['checkpoint'] or '(config model)'}`, prompts `{s['prompts']}`, "
         f"{s['num_per_prompt']} images per prompt, semantic CoT {'on' if s['semantic_cot'] else 'off'}, "
         f"seed {s['seed']}, batch {s['batch']}. Cells: mean ± std (population) over images."),
        "",
        "| task type | prompts | images | " + " | ".join(keys) + " |",
        "| --- | ---: | ---: | " + " | ".join("---:" for _ in keys) + " |",
    ]
    for name, b in results["buckets"].items():
        label = f"**{name}**" if name == OVERALL else name
        lines.append(f"| {label} | {b['prompts']} | {b['images']} | " + " | ".join(_fmt(b[k]) for k in keys) + " |")
    return "\n".join(lines) + "\n"


def _write_text(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def _write_json(path: str, obj) -> None:
    _write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, allow_nan=False) + "\n")


def prepare_out_dir(out_dir: str, overwrite: bool) -> None:
    """Refuse an out dir that already holds an eval unless ``overwrite`` (then only the eval's own files
    are removed); create it otherwise."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise EvalError(f"--out {out_dir!r} exists and is not a directory")
    if os.path.isdir(out_dir):
        found = [m for m in MARKERS if os.path.exists(os.path.join(out_dir, m))]
        if found and not overwrite:
            raise EvalError(f"--out {out_dir!r} already holds an eval ({', '.join(found)}); pass --overwrite to "
                            f"replace it, or choose another --out")
        if found:
            for name in OUTPUTS:
                p = os.path.join(out_dir, name)
                if os.path.isdir(p) and not os.path.islink(p):
                    shutil.rmtree(p)
                elif os.path.lexists(p):
                    os.remove(p)
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    os.makedirs(os.path.join(out_dir, "grids"), exist_ok=True)


def _versions() -> dict:
    import platform

    import torch

    out = {"python": platform.python_version(), "torch": torch.__version__}
    for mod in ("transformers", "fastbicot", "numpy", "PIL"):
        try:
            out[mod] = getattr(__import__(mod), "__version__", "unknown")
        except ImportError:
            out[mod] = None
    return out


def _git_commit() -> str | None:
    import subprocess

    here = os.path.dirname(os.path.abspath(__file__))
    try:
        r = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], check=False, capture_output=True, text=True,
                           timeout=5)
        return (r.stdout.strip() or None) if r.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def _checkpoint_files(path: str) -> list:
    out = []
    for name in sorted(os.listdir(path)):
        p = os.path.join(path, name)
        if os.path.isfile(p):
            out.append({"file": name, "bytes": os.path.getsize(p)})
    return out


def _check_int(name: str, v, low: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        raise EvalError(f"{name} must be an integer >= {low}, got {v!r}")
    return v


def evaluate(config, *, prompts, out_dir, checkpoint=None, num_per_prompt=10, use_cot=True, seed=0, batch=8,
             overwrite=False, task_types=DEFAULT_TASK_TYPES, progress=True, command=None) -> dict:
    """Generate ``num_per_prompt`` images per prompt of the file ``prompts`` with fixed seeds, score them with
    ``config.rewards`` and write the tables, grids, samples, images and manifest into ``out_dir``.

    config: a TrainerConfig (its model, rollout and rewards sections are used). checkpoint: a
    transformers-format policy directory that replaces ``config.model`` (path, preset, builder); None uses
    the config's model. use_cot=False sets rollout.semantic_cot=False (empty plans). Returns the content
    of results.json: ``{"keys", "buckets": {task_type|"all"|"overall": {"prompts", "images", key: {"mean",
    "std", "count", "nonfinite"}}}, "settings"}``. Every check (arguments, prompt file, task types, out
    dir, checkpoint) runs before the model loads.
    """
    import torch

    from .data import load_prompts
    from .trainer.config import TrainerConfig

    if not isinstance(config, TrainerConfig):
        raise TypeError(f"config must be a TrainerConfig, got {type(config).__name__}")
    num_per_prompt = _check_int("num_per_prompt (--num)", num_per_prompt, 1)
    batch = _check_int("batch (--batch)", batch, 1)
    seed = _check_int("seed (--seed)", seed, 0)
    if isinstance(task_types, str):
        task_types = [t for t in task_types.split(",") if t.strip()]
    task_types = [t.strip() for t in task_types]
    if not task_types:
        raise EvalError("task_types is empty")
    prompts_path = os.fspath(prompts)
    out_dir = os.fspath(out_dir)

    records = load_prompts(prompts_path)
    buckets = check_task_types(records, prompts_path, task_types)
    model = config.model
    if checkpoint is not None:
        checkpoint = os.fspath(checkpoint)
        if not os.path.isdir(checkpoint):
            raise FileNotFoundError(f"--checkpoint {checkpoint!r} is not a directory (expected a transformers-format "
                                    f"policy directory such as OUTPUT_DIR/final)")
        model = model.replace(path=checkpoint, preset=None, builder=None)
    config = config.replace(model=model, rollout=config.rollout.replace(semantic_cot=bool(use_cot)))
    prepare_out_dir(out_dir, overwrite)

    starts = list(range(0, len(records), batch))
    seeds = [batch_seed(seed, s) for s in starts]
    order = [t for t in task_types if t in buckets] + ([NO_TASK] if NO_TASK in buckets else [])
    manifest = {
        "format": f"fastbicot-eval/{FORMAT_VERSION}",
        "complete": False,
        "command": command,
        "checkpoint": os.path.abspath(checkpoint) if checkpoint else None,
        "checkpoint_files": _checkpoint_files(checkpoint) if checkpoint else None,
        "prompts": {"path": os.path.abspath(prompts_path), "sha256": sha256_file(prompts_path),
                    "records": len(records)},
        "num_per_prompt": num_per_prompt,
        "semantic_cot": bool(use_cot),
        "no_cot": not use_cot,
        "seed": seed,
        "batch": batch,
        "batch_seeds": [{"prompts": [s, min(s + batch, len(records))], "seed": bs} for s, bs in zip(starts, seeds)],
        "seed_rule": "batch_seed(seed, first prompt index) = blake2b('fastbicot/eval/{seed}/{start}', 7 bytes) LE",
        "task_types": list(task_types),
        "buckets": order,
        "versions": _versions(),
        "git_commit": _git_commit(),
        "config": _plain(config),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    _write_json(os.path.join(out_dir, "manifest.json"), manifest)

    from PIL import Image
    from tqdm.auto import tqdm

    from .rewards import RewardOutput
    from .rollout import RolloutEngine
    from .trainer.rewards import build_rewards
    from .trainer.trainer import build_policy

    if config.threads:
        torch.set_num_threads(config.threads)
    t0 = time.perf_counter()
    policy = build_policy(config.model)
    policy.eval()
    rewards = build_rewards(config.rewards, policy.device)
    engine = RolloutEngine(policy, config.rollout, progress=False)
    manifest["device"] = str(policy.device)
    manifest["dtype"] = str(policy.dtype).replace("torch.", "")

    G = num_per_prompt
    rows: list[dict] = []
    keys: list[str] | None = None
    # the grid of a bucket: its first gp prompts, gs images of each (gp * gs >= GRID_CELLS when it can)
    grid_keep: dict = {name: [] for name in order}  # bucket -> [(prompt, plan, image, {key: score})]
    grid_pick: dict = {}  # bucket -> (set of prompt indices, images per prompt)
    for name in order:
        ps = [i for i, b in enumerate(buckets) if b == name][:GRID_CELLS]
        grid_pick[name] = (set(ps), min(G, math.ceil(GRID_CELLS / len(ps))))
    timing = {"generate": 0.0, "score": 0.0}
    bar = tqdm(list(zip(starts, seeds)), desc="eval", unit="batch", disable=not progress, dynamic_ncols=True)
    for start, bs in bar:
        chunk = records[start:start + batch]
        t = time.perf_counter()
        out = engine.generate(chunk, num_generations=G, seed=bs)
        timing["generate"] += time.perf_counter() - t
        t = time.perf_counter()
        extra = {"group_ids": out.group_ids} if config.rewards.normalize == "group" else {}
        scores = rewards(**out.reward_inputs(), **extra)
        timing["score"] += time.perf_counter() - t
        if keys is None:
            keys = ["total"] + list(scores.components)
        for s_idx, (s, img) in enumerate(zip(out.samples, out.images)):
            p = start + s.prompt_index
            g = s_idx % G
            name = f"images/{p:05d}_{g:02d}.png"
            Image.fromarray(img.cpu().numpy()).save(os.path.join(out_dir, name))
            sc = {"total": _finite(scores.total[s_idx])}
            sc.update({k: _finite(v[s_idx]) for k, v in scores.components.items()})
            rows.append({"prompt_index": p, "sample": g, "prompt": s.prompt, "task_type": buckets[p],
                         "plan": s.cot_text, "image": name, "scores": sc, "seed": bs})
            b = buckets[p]
            if p in grid_pick[b][0] and g < grid_pick[b][1]:
                grid_keep[b].append((s.prompt, s.cot_text, img.cpu().clone(), sc))
        if rows:
            bar.set_postfix(total=f"{math.fsum(r['scores']['total'] or 0.0 for r in rows) / len(rows):.3f}")
    bar.close()

    with open(os.path.join(out_dir, "samples.jsonl.tmp"), "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    os.replace(os.path.join(out_dir, "samples.jsonl.tmp"), os.path.join(out_dir, "samples.jsonl"))

    settings = {"checkpoint": manifest["checkpoint"], "prompts": os.path.abspath(prompts_path),
                "prompts_sha256": manifest["prompts"]["sha256"], "num_per_prompt": G, "semantic_cot": bool(use_cot),
                "seed": seed, "batch": batch, "reward_mode": config.rewards.mode,
                "reward_normalize": config.rewards.normalize}
    results = {"keys": keys, "buckets": summarize(rows, keys, order), "settings": settings}
    _write_json(os.path.join(out_dir, "results.json"), results)
    _write_text(os.path.join(out_dir, "results.md"), results_markdown(results))

    from .trainer.metrics import save_sample_grid

    grids = {}
    for name, kept in grid_keep.items():
        if not kept:
            continue
        gb = SimpleNamespace(samples=[SimpleNamespace(prompt=k[0], cot_text=k[1]) for k in kept],
                             images=torch.stack([k[2] for k in kept]), num_generations=grid_pick[name][1])
        ro = RewardOutput(torch.tensor([_nan(k[3]["total"]) for k in kept]),
                          {c: torch.tensor([_nan(k[3][c]) for k in kept]) for c in keys[1:]})
        path = os.path.join(out_dir, "grids", f"{_safe(name)}.png")
        save_sample_grid(gb, ro, path, max_samples=GRID_CELLS,
                         title=f"{name}: {'with' if use_cot else 'without'} semantic CoT, seed {seed}")
        grids[name] = os.path.relpath(path, out_dir)

    timing["total"] = time.perf_counter() - t0
    manifest.update(complete=True, images=len(rows), grids=grids, timing_s={k: round(v, 3) for k, v in timing.items()},
                    finished=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    _write_json(os.path.join(out_dir, "manifest.json"), manifest)
    return results


def _plain(obj):
    """Settings (nested, in lists too) -> plain dicts / lists for JSON."""
    import dataclasses

    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def _nan(v) -> float:
    return float("nan") if v is None else v


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name) or "_"


def default_out_dir(config, checkpoint, prompts, num, use_cot, seed) -> str:
    """``<checkpoint's parent>/eval/<checkpoint name>-<prompts stem>-n<N>-<cot|nocot>-seed<S>``, or under
    ``config.output_dir`` with ``model`` as the name when no checkpoint is given."""
    stem = os.path.splitext(os.path.basename(os.fspath(prompts)))[0] or "prompts"
    tag = f"{stem}-n{num}-{'cot' if use_cot else 'nocot'}-seed{seed}"
    if checkpoint:
        ck = os.path.normpath(os.fspath(checkpoint))
        return os.path.join(os.path.dirname(ck) or ".", "eval", f"{os.path.basename(ck)}-{tag}")
    return os.path.join(config.output_dir, "eval", f"model-{tag}")


def build_parser(prog: str = "fastbicot eval") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Generate N images per prompt with fixed seeds, score "
                                "them with the config's rewards, and table the scores per task type.")
    p.add_argument("--config", required=True, help="the YAML config (model, rollout and rewards sections)")
    p.add_argument("--prompts", required=True, help="prompt file (T2I-CompBench JSONL or plain text)")
    p.add_argument("--checkpoint", help="transformers-format policy directory (e.g. OUTPUT_DIR/final); "
                   "replaces the config's model")
    p.add_argument("--out", help="output directory (default: <checkpoint's parent>/eval/<name>-<prompts>-n<N>-"
                   "<cot|nocot>-seed<S>)")
    p.add_argument("--num", type=int, default=10, help="images per prompt (T2I-CompBench: 10)")
    p.add_argument("--no-cot", action="store_true", help="skip the semantic CoT (rollout.semantic_cot=False)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=8, help="prompts per rollout")
    p.add_argument("--task-types", default=",".join(DEFAULT_TASK_TYPES),
                   help="comma-separated task types allowed in the prompt file (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace an eval already in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def cli(argv=None, prog: str = "fastbicot eval") -> int:
    """The command line (argv without the program name); returns the exit status: 0 done, 2 a bad
    argument, config, prompt file, task type or out dir (one line on stderr)."""
    from .settings import ConfigError
    from .trainer.config import TrainerConfig, cli_overrides

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(prog)
    args, rest = parser.parse_known_args(argv)
    for name in ("num", "batch"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.seed < 0:
        parser.error(f"--seed must be >= 0, got {args.seed}")
    try:
        config = TrainerConfig.from_yaml(args.config, cli_overrides(rest))
        use_cot = not args.no_cot
        out = args.out or default_out_dir(config, args.checkpoint, args.prompts, args.num, use_cot, args.seed)
        results = evaluate(config, prompts=args.prompts, out_dir=out, checkpoint=args.checkpoint,
                           num_per_prompt=args.num, use_cot=use_cot, seed=args.seed, batch=args.batch,
                           overwrite=args.overwrite, task_types=args.task_types, progress=not args.no_progress,
                           command=[prog] + argv)
    except ConfigError as e:
        if os.environ.get("FASTBICOT_DEBUG") == "1":
            raise
        print(f"{prog}: config error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError, TypeError) as e:
        if os.environ.get("FASTBICOT_DEBUG") == "1":
            raise
        print(f"{prog}: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    print(results_markdown(results), end="")
    print(f"{prog}: wrote {out}/results.md, results.json, samples.jsonl, manifest.json, grids/ and "
          f"{results['buckets'][OVERALL]['images']} images")
    return 0


__all__ = ["DEFAULT_TASK_TYPES", "EvalError", "batch_seed", "cli", "evaluate", "summarize"]


if __name__ == "__main__":
    sys.exit(cli(prog="python -m fastbicot.evaluate"))
