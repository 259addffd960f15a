"""Checkpoints that survive a crash and a change of world size.

    checkpoint-000400/
      config.json, model.safetensors, tokenizer files   the policy in transformers' format (compute dtype),
                                                          loadable by JanusPolicy.from_pretrained and plain
                                                          transformers; written by rank 0 from a gathered
                                                          state dict
      optim/                                              torch.distributed.checkpoint (DCP): per trainable
                                                          parameter its fp32 master weight and AdamW moments,
                                                          keyed by name -- sharded under FSDP, resharded on
                                                          load to any world size
      rng/rank-00000.pt                                   each rank's torch RNG states
      trainer_state.pt                                    step (hence the data position and the rollout's
                                                          random stream), scheduler, optimizer hyper-
                                                          parameters, world size, the run's config

Every file is written under ``.tmp-checkpoint-000400`` and the directory is renamed when complete:
a write that fails or is killed leaves the previous checkpoints untouched (the temporary directory
is removed by the next save). Only directories holding ``trainer_state.pt`` count as checkpoints.
Resuming from the fp32 masters (not the exported weights, which are in the compute dtype) makes the
continuation exact. A config whose change would break the resume (model, G, data) is refused with
the key named.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import warnings

import torch

from .config import ConfigError

FORMAT = 2
UNREADABLE = (OSError, EOFError, RuntimeError, ValueError, pickle.UnpicklingError)  # truncated / foreign files
# keys whose change makes a resume meaningless: the checkpoint's weights, samples or data order differ
RESUME_KEYS = ("model.path", "model.preset", "model.builder", "model.seed", "rollout.num_generations",
               "data.prompts", "data.prompts_per_step", "data.shuffle", "data.seed", "lora")
STATE = "trainer_state.pt"


def _dcp(fn, state, path, world):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # DCP's "assuming a single process" notices
        fn(state, checkpoint_id=path, no_dist=not world.enabled)


def _flat(config_dict: dict, prefix="") -> dict:
    out = {}
    for k, v in config_dict.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and k != "options":
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def check_resumable(saved: dict, current: dict) -> None:
    """Refuse a resume whose config differs from the checkpoint's in a key that breaks it."""
    a, b = _flat(saved), _flat(current)
    for key in RESUME_KEYS:
        keys = sorted(k for k in set(a) | set(b) if k == key or k.startswith(key + "."))
        for k in keys:
            if a.get(k) != b.get(k):
                raise ConfigError(f"--resume: {k} is {b.get(k)!r} but the checkpoint was trained with {a.get(k)!r}; "
                                  "a resume must keep the model, num_generations and the data (start a new "
                                  "output_dir instead)")


def optimizer_state(optim, names) -> dict:
    """{"master::name", "exp_avg::name", "exp_avg_sq::name", "step::name"} of every trainable
    parameter (the masters are the parameters themselves when they are fp32 -- under FSDP, DTensor
    shards, which DCP stores sharded)."""
    out = {}
    for name, m in zip(names, optim.masters):
        out[f"master::{name}"] = m.detach()
        for k, v in optim.optimizer.state.get(m, {}).items():
            out[f"{k}::{name}"] = v
    return out


def save(trainer, final: bool = False) -> str:
    """The trainer's checkpoint (see the module docstring); every rank calls it. -> its directory."""
    import torch.distributed.checkpoint as dcp

    world, c = trainer.world, trainer.config
    out = c.output_dir
    name = "final" if final else f"checkpoint-{trainer.step_idx:06d}"
    dst = os.path.join(out, name)
    tmp = os.path.join(out, f".tmp-{name}")
    try:
        if world.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(os.path.join(tmp, "rng"))
        world.barrier()
        # 1. the policy in transformers' format (gathered: a collective on every rank)
        full = world.full_state_dict(trainer.policy)
        if world.is_main:
            if getattr(trainer, "lora", None) is not None:  # the adapter (peft format); `fastbicot merge` -> full model
                from .lora import save_adapter

                save_adapter(trainer.lora, tmp, full)
            else:
                from .trainer import save_policy

                save_policy(trainer.policy, tmp, state_dict=full, dtype=getattr(trainer, "compute_dtype", None))
        # 2. masters and AdamW moments, sharded (DCP)
        names = trainer.optim_names
        _dcp(dcp.save, optimizer_state(trainer.optim, names), os.path.join(tmp, "optim"), world)
        # 3. RNG of each rank; 4. the small state, last (its presence marks a complete checkpoint)
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        torch.save(rng, os.path.join(tmp, "rng", f"rank-{world.rank:05d}.pt"))
        world.barrier()
        if world.is_main:
            opt, bonus = trainer.optim.optimizer, getattr(trainer, "entropy_bonus", None)
            torch.save({"format": FORMAT, "step": trainer.step_idx, "world_size": world.world_size,
                        "scheduler": trainer.optim.scheduler.state_dict(),
                        "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups],
                        "config": c.to_dict(), "entropy_bonus": bonus.state_dict() if bonus is not None else None},
                       os.path.join(tmp, STATE))
            _publish(tmp, dst)
            if not final:
                ckpts = sorted(d for d in os.listdir(out) if d.startswith("checkpoint-") and not d.endswith(".old"))
                for d in ckpts[: -c.checkpoint.keep]:
                    shutil.rmtree(os.path.join(out, d), ignore_errors=True)
        world.barrier()
    except OSError as e:  # a full disk, a vanished directory: the previous checkpoints stay as they are
        shutil.rmtree(tmp, ignore_errors=True)
        from .trainer import TrainingError

        raise TrainingError(f"step {trainer.step_idx}: writing the checkpoint {dst!r} failed ({e}); nothing was "
                            "replaced, the previous checkpoints are intact") from e
    return dst


def _publish(tmp: str, dst: str) -> None:
    """Rename the complete ``tmp`` to ``dst``; an existing ``dst`` is moved aside first and removed
    only once the new one is in place."""
    if os.path.exists(dst):
        old = dst + ".old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dst, old)
        os.replace(tmp, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, dst)


def load(trainer, path: str) -> None:
    """Continue from ``path``: policy weights, fp32 masters, AdamW moments, scheduler, step, RNG.
    The checkpoint may come from another world size (DCP reshards)."""
    import torch.distributed.checkpoint as dcp

    world, c = trainer.world, trainer.config
    state_path = os.path.join(path, STATE)
    if not os.path.isfile(state_path):
        raise FileNotFoundError(f"{path!r} is not a fastbicot checkpoint (no {STATE})")
    try:
        state = torch.load(state_path, map_location="cpu", weights_only=False)
    except UNREADABLE as e:
        raise ValueError(f"{state_path!r} cannot be read ({type(e).__name__}: {e}); the checkpoint is corrupt") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{state_path!r} is not a fastbicot checkpoint of format {FORMAT}")
    from .lora import is_adapter_dir, load_adapter

    lora = getattr(trainer, "lora", None)
    if lora is not None or is_adapter_dir(path):  # a LoRA / full-weight mismatch either way: ConfigError
        load_adapter(lora, path, c.lora, weights=not world.sharded(trainer.policy))
    check_resumable(state["config"], c.to_dict())
    if lora is None:  # every parameter from the exported model, then the trainable ones exactly from the masters
        from .trainer import load_policy_weights

        load_policy_weights(trainer.policy, path, world=world)
    names = trainer.optim_names
    reader = dcp.FileSystemReader(os.path.join(path, "optim"))
    try:
        saved = set(reader.read_metadata().state_dict_metadata)
    except UNREADABLE as e:
        raise ValueError(f"{path!r}: the optimizer state (optim/) cannot be read ({e})") from None
    missing = [n for n in names if f"master::{n}" not in saved]
    if missing:
        raise ValueError(f"{path!r} does not match this run's trainable parameters: no state for {missing[:3]}")
    target, slots = {}, []
    opt = trainer.optim.optimizer
    for name, m in zip(names, trainer.optim.masters):
        target[f"master::{name}"] = m.detach()
        st = {}
        for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            if f"{k}::{name}" in saved:
                st[k] = target[f"{k}::{name}"] = torch.zeros_like(m.detach(), memory_format=torch.preserve_format)
        if f"step::{name}" in saved:
            st["step"] = target[f"step::{name}"] = torch.zeros((), dtype=torch.float32)
        slots.append((m, st))
    with torch.no_grad():
        _dcp(dcp.load, target, os.path.join(path, "optim"), world)
    for m, st in slots:
        if st:
            opt.state[m] = st
    for g, saved_g in zip(opt.param_groups, state["param_groups"]):
        g.update(saved_g)
    trainer.optim.scheduler.load_state_dict(state["scheduler"])
    if trainer.optim.use_master:
        with torch.no_grad():
            for p, m in zip(trainer.optim.params, trainer.optim.masters):
                p.copy_(m)
    trainer.step_idx = int(state["step"])
    if getattr(trainer, "entropy_bonus", None) is not None and state.get("entropy_bonus"):
        trainer.entropy_bonus.load_state_dict(state["entropy_bonus"])  # the adaptive coefficients (trainer/entropy.py)
    rng_path = os.path.join(path, "rng", f"rank-{world.rank:05d}.pt")
    if os.path.isfile(rng_path):  # a rank the checkpoint did not have keeps its seeded state
        rng = torch.load(rng_path, map_location="cpu", weights_only=False)
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(rng["cuda"])
    if world.is_main:
        truncate_metrics(os.path.join(c.output_dir, "metrics.jsonl"), trainer.step_idx)
    world.barrier()


def truncate_metrics(path: str, step: int) -> None:
    """Drop metrics.jsonl lines of steps after ``step`` (a crash between checkpoints), atomically."""
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as f:
        keep = []
        for ln in f:
            if not ln.strip():
                continue
            try:
                if json.loads(ln)["step"] <= step:
                    keep.append(ln if ln.endswith("\n") else ln + "\n")
            except (ValueError, KeyError):  # a line cut by the crash
                continue
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(keep)
    os.replace(tmp, path)


def find(output_dir: str, which: str = "latest") -> str:
    """``output_dir``'s latest complete checkpoint (``which="latest"``) or the one of step ``which``."""
    if not os.path.isdir(output_dir):
        raise FileNotFoundError(f"--resume: output_dir {output_dir!r} does not exist")
    ckpts = sorted(d for d in os.listdir(output_dir) if d.startswith("checkpoint-") and not d.endswith(".old")
                   and os.path.isfile(os.path.join(output_dir, d, STATE)))
    if which == "latest":
        if not ckpts:
            raise FileNotFoundError(f"--resume: no checkpoint in {output_dir!r}")
        return os.path.join(output_dir, ckpts[-1])
    if not str(which).isdigit():
        raise ValueError(f"--resume: expected 'latest' or a step number, got {which!r}")
    name = f"checkpoint-{int(which):06d}"
    if name not in ckpts:
        raise FileNotFoundError(f"--resume: no checkpoint of step {which} in {output_dir!r} (have {ckpts})")
    return os.path.join(output_dir, name)


__all__ = ["RESUME_KEYS", "check_resumable", "find", "load", "save", "truncate_metrics"]
