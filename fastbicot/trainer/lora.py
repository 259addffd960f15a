"""LoRA adapters on the policy's language model (``lora:`` in the config; peft is an optional extra).

    handle = add_adapters(policy, config.lora)      peft LoRA layers in place of the targeted Linears;
                                                     every other parameter frozen
    with handle.disable_adapter(): ...               the base model (the GRPO reference: no second copy)
    save_adapter(handle, DIR)                        adapter_model.safetensors + adapter_config.json
    load_adapter(handle, DIR, config.lora)           the adapter of a checkpoint (resume)
    merge_adapter(BASE_DIR, ADAPTER_DIR, OUT_DIR)    a merged transformers-format checkpoint

The adapters are injected into ``policy.hf_model`` in place (``peft.get_peft_model``; the returned
PeftModel is only a handle): ``policy.hf_model`` stays a ``JanusForConditionalGeneration``, its
projections become peft ``lora.Linear`` layers whose forward is ``W x + (alpha / r) B (A x)``, so the
training forward needs nothing special. The rollout's fused CPU decode reads weights directly; it
reads the adapted ones through ``rollout.trunk.effective_weight`` (see there why adapters are not
merged for the rollout). peft is imported here only, and only when LoRA is used.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import warnings

import torch

from ..settings import ConfigError

INSTALL = "pip install 'fastbicot[lora]' (or: pip install peft==0.21.2)"
LM_PREFIX = "model.language_model."  # transformers' Janus: the decoder trunk's modules
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def require_peft(key: str = "lora.enabled"):
    """The peft module, or a ConfigError naming ``key`` and the install command."""
    try:
        import peft
    except ImportError:
        raise ConfigError(f"{key}: LoRA needs the optional package peft, which is not installed; {INSTALL}") from None
    return peft


def resolve_targets(policy, patterns) -> list:
    """Full names (relative to ``policy.hf_model``) of the language model's Linear modules that
    ``patterns`` select. A pattern matches a module's last name (``q_proj``, ``*_proj``) or, as an
    fnmatch pattern, its full name (``model.language_model.layers.1?.mlp.*``). A pattern that
    matches nothing is a ConfigError naming ``lora.target_modules``."""
    cands = [n for n, m in policy.hf_model.named_modules()
             if n.startswith(LM_PREFIX) and type(m) is torch.nn.Linear]
    return match_targets(cands, patterns)


def match_targets(cands: list, patterns) -> list:
    """The names in ``cands`` (the language model's Linear modules) that ``patterns`` select, in order
    (see ``resolve_targets``; the memory plan applies the same rule to a model on the meta device)."""
    if not cands:
        raise ConfigError("lora.target_modules: the policy's language model (model.language_model) has no "
                          "plain Linear module to adapt (adapters already injected?)")
    out = set()
    for pat in patterns:
        hit = [n for n in cands if fnmatch.fnmatchcase(n, pat) or fnmatch.fnmatchcase(n.rsplit(".", 1)[-1], pat)]
        if not hit:
            leaves = sorted({n.rsplit(".", 1)[-1] for n in cands})
            raise ConfigError(f"lora.target_modules: {pat!r} matches no Linear module of the language model "
                              f"(last names: {leaves}; full names look like {cands[0]!r})")
        out.update(hit)
    return [n for n in cands if n in out]  # module order


def add_adapters(policy, lora, base_path: str | None = None):
    """Inject LoRA adapters (``lora``: a LoRAConfig) into ``policy.hf_model`` in place; freeze every
    other parameter. Returns the peft handle (``disable_adapter()``, ``save_pretrained``).
    ``base_path``: the directory of the base weights, recorded in adapter_config.json for merging."""
    peft = require_peft()
    targets = resolve_targets(policy, lora.target_modules)
    config = peft.LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets,
                             bias="none")
    with warnings.catch_warnings():  # peft probes transformers' deprecated is_gradient_checkpointing
        warnings.simplefilter("ignore", FutureWarning)
        handle = peft.get_peft_model(policy.hf_model, config)
    if handle.base_model.model is not policy.hf_model:  # peft wraps in place; anything else would desync
        raise RuntimeError("peft.get_peft_model did not adapt policy.hf_model in place")
    handle.peft_config["default"].base_model_name_or_path = base_path  # get_peft_model resets it
    return handle


def setup(trainer, ref_policy=None, built: bool = True):
    """The Trainer's LoRA setup (``lora.enabled``): adapters on ``trainer.policy`` -> (handle,
    trainable names). ``built``: the Trainer built the policy from the config, so the base
    directory (model.path, or the SFT warm start) is recorded in the adapter for merging."""
    c = trainer.config
    if ref_policy is not None:
        raise ValueError("ref_policy: with lora.enabled the reference is the policy with its adapters disabled; "
                         "pass no ref_policy")
    base = None
    if built and c.sft.steps > 0:
        from .sft import sft_cache_key

        base = os.path.abspath(os.path.join(c.sft.cache_dir, sft_cache_key(c), "final"))
    elif built and c.model.path is not None:
        base = os.path.abspath(c.model.path)
    handle = add_adapters(trainer.policy, c.lora, base)
    return handle, adapter_names(trainer.policy)


def reference_logprobs(handle, logprobs, policy, samples, loss, guidance_scale, reuse=None):
    """The KL reference's per-token log-probs: the policy with its adapters disabled, i.e. the base
    weights (no grad). Only decoder projections carry adapters, so the text embeddings are the
    base's either way (loss.ref_text_embeddings changes nothing). ``logprobs``: the Trainer's
    ``world.logprobs`` (``sample_logprobs``, through the FSDP root when sharded); ``reuse``: the
    micro-batch's MicroBatch.reuse."""
    with torch.no_grad(), handle.disable_adapter():
        return logprobs(policy, samples, loss=loss, guidance_scale=guidance_scale, reuse=reuse).logprobs


def adapter_names(policy) -> list:
    """Names of the trainable adapter parameters of an adapted policy."""
    return [n for n, p in policy.hf_model.named_parameters() if p.requires_grad and ".lora_" in n]


def save_adapter(handle, path: str, full_state_dict: dict | None = None) -> None:
    """peft's format: ``adapter_model.safetensors`` + ``adapter_config.json`` (loads with
    ``peft.PeftModel.from_pretrained(JanusForConditionalGeneration.from_pretrained(BASE), path)``).
    ``full_state_dict``: the policy's gathered state dict (names relative to ``hf_model``) when its
    parameters are FSDP shards, whose own state dict would hold each rank's piece only."""
    os.makedirs(path, exist_ok=True)
    state = None
    if full_state_dict is not None:  # peft's names: the PeftModel wraps hf_model as base_model.model
        state = {f"base_model.model.{k}": v for k, v in full_state_dict.items() if ".lora_" in k}
    handle.save_pretrained(path, state_dict=state)
    readme = os.path.join(path, "README.md")  # peft's empty model card template: nothing of ours
    if os.path.isfile(readme):
        os.remove(readme)


def is_adapter_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, ADAPTER_CONFIG))


def read_adapter_config(path: str) -> dict:
    try:
        with open(os.path.join(path, ADAPTER_CONFIG), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path!r}: cannot read {ADAPTER_CONFIG} ({e})") from None


def load_adapter(handle, path: str, lora, weights: bool = True) -> None:
    """Load a checkpoint's adapter into the adapted policy of ``handle``. ``handle`` None (a run
    without LoRA) or a checkpoint without an adapter, or an adapter of other settings
    (r, alpha, target modules): a ConfigError naming the lora key. ``weights=False``: the checks
    only (under FSDP the adapter parameters are the fp32 masters, which the checkpoint's optim/
    restores exactly)."""
    if handle is None:
        if is_adapter_dir(path):
            raise ConfigError(f"lora.enabled: {path!r} holds a LoRA adapter ({ADAPTER_CONFIG}) but lora.enabled is "
                              "false; resume with --lora.enabled=true and the run's lora settings")
        return
    if not is_adapter_dir(path):
        raise ConfigError(f"lora.enabled: is true but {path!r} is a full-weight checkpoint (no {ADAPTER_CONFIG}); "
                          "resume it with --lora.enabled=false, or start the LoRA run in another output_dir")
    saved = read_adapter_config(path)
    want = handle.peft_config["default"]
    for key, ours, theirs in (("r", want.r, saved.get("r")), ("alpha", want.lora_alpha, saved.get("lora_alpha")),
                              ("target_modules", sorted(want.target_modules), sorted(saved.get("target_modules") or []))):
        if ours != theirs:
            raise ConfigError(f"lora.{key}: the checkpoint {path!r} was trained with {theirs!r}, the config says "
                              f"{ours!r}; resume with the run's lora settings")
    if not weights:
        return
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = os.path.join(path, ADAPTER_WEIGHTS)
    if not os.path.isfile(weights):
        raise FileNotFoundError(f"{path!r} has {ADAPTER_CONFIG} but no {ADAPTER_WEIGHTS}")
    state = load_file(weights)
    result = set_peft_model_state_dict(handle, state)
    missing = [k for k in result.missing_keys if ".lora_" in k]
    if missing or result.unexpected_keys:
        raise ValueError(f"{path!r}: the adapter does not match the policy: missing {missing[:4]}, "
                         f"unexpected {list(result.unexpected_keys)[:4]}")


def _saved_dtype(base_dir: str) -> torch.dtype:
    with open(os.path.join(base_dir, "config.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    name = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
    dtype = getattr(torch, str(name), None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def merge_adapter(adapter_dir: str, out_dir: str, base_dir: str | None = None) -> str:
    """``base_dir`` (transformers-format Janus; default: the adapter's ``base_model_name_or_path``)
    + the LoRA adapter in ``adapter_dir`` -> ``out_dir``: a merged checkpoint in transformers' format
    (``W + alpha / r * B A``; loads with JanusPolicy.from_pretrained and plain transformers), in the
    base's saved dtype, with the base's tokenizer. The merge itself is computed in float32 (float64
    for a float64 base). Returns ``out_dir``."""
    peft = require_peft("merge")
    from ..models import JanusPolicy
    from .trainer import save_policy

    if not os.path.isdir(adapter_dir) or not is_adapter_dir(adapter_dir):
        raise FileNotFoundError(f"--adapter {adapter_dir!r} is not a LoRA adapter directory (no {ADAPTER_CONFIG})")
    if base_dir is None:
        base_dir = read_adapter_config(adapter_dir).get("base_model_name_or_path")
        if not base_dir:
            raise ValueError(f"--base: {adapter_dir!r} does not record its base model (it was trained from a preset "
                             "or builder); pass --base DIR, a transformers-format copy of the base weights")
    if not os.path.isdir(base_dir):
        raise FileNotFoundError(f"--base {base_dir!r} is not a directory")
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise ValueError(f"--out {out_dir!r} already exists and is not an empty directory; choose another")
    saved = _saved_dtype(base_dir)
    work = torch.float64 if saved == torch.float64 else torch.float32
    policy = JanusPolicy.from_pretrained(base_dir, dtype=work, device="cpu")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            adapted = peft.PeftModel.from_pretrained(policy.hf_model, adapter_dir)
    except Exception as e:  # a target module the base does not have, shapes that differ, ...
        raise ValueError(f"--adapter {adapter_dir!r} does not fit --base {base_dir!r} ({type(e).__name__}: {e})") from e
    policy.hf_model = adapted.merge_and_unload()
    policy.hf_model.to(saved)
    tmp = out_dir.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    save_policy(policy, tmp)
    if os.path.isdir(out_dir):
        os.rmdir(out_dir)
    os.replace(tmp, out_dir)
    return out_dir


__all__ = [
    "adapter_names",
    "add_adapters",
    "is_adapter_dir",
    "load_adapter",
    "match_targets",
    "merge_adapter",
    "reference_logprobs",
    "require_peft",
    "resolve_targets",
    "save_adapter",
    "setup",
]
