"""Rewards named in the config -> one RewardEnsemble.

Built-in names load a model reward from a local checkpoint directory (``path``); anything else
written ``module:callable`` is imported and called with the spec's ``options``.
"""

from __future__ import annotations

import importlib

from ..rewards import FunctionReward, Reward, RewardEnsemble

# name -> (class name in fastbicot.rewards, needs a checkpoint path)
BUILTIN = {
    "hps": ("HPSReward", True),
    "git": ("GitVQAReward", True),
    "gdino": ("GroundingDinoReward", True),
    "orm": ("ORMReward", True),
    "vlm_judge": ("VLMJudgeReward", True),
    "clip": ("CLIPScoreReward", True),
    "pickscore": ("PickScoreReward", True),
    "remote_judge": ("RemoteJudgeReward", False),
}


def load_callable(spec: str, what: str):
    """"package.module:attr" -> the object; errors name ``what``."""
    module, _, attr = spec.partition(":")
    if not module or not attr:
        raise ValueError(f"{what}: expected 'module:callable', got {spec!r}")
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        raise ValueError(f"{what}: cannot import module {module!r} ({e})") from None
    obj = mod
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{what}: module {module!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError(f"{what}: {spec!r} is not callable")
    return obj


def _as_rewards(obj, spec_name: str) -> list:
    if isinstance(obj, RewardEnsemble):
        return list(zip(obj.rewards, obj.weights))
    if isinstance(obj, Reward):
        return [(obj, None)]
    if isinstance(obj, (list, tuple)) and obj and all(isinstance(r, Reward) for r in obj):
        return [(r, None) for r in obj]
    if callable(obj):
        return [(FunctionReward(spec_name.rpartition(":")[2], obj), None)]
    raise TypeError(f"rewards: {spec_name!r} returned {type(obj).__name__}; expected a Reward, a list of "
                    "Rewards, a RewardEnsemble or a callable")


def build_rewards(config, device) -> RewardEnsemble:
    """``config``: RewardsConfig. Model rewards load on their spec's device (default ``device``)."""
    if not config.functions:
        raise ValueError("rewards.functions is empty: name at least one reward (see configs/t2i_r1.yaml)")
    rewards, weights = [], []
    for i, spec in enumerate(config.functions):
        where = f"rewards.functions[{i}] ({spec.name})"
        dev = spec.device or str(device)
        if spec.name in BUILTIN:
            cls_name, needs_path = BUILTIN[spec.name]
            import fastbicot.rewards as R

            cls = getattr(R, cls_name)
            options = {"name": spec.name, **spec.options}  # the component is logged as reward/<name>
            if needs_path:
                if not spec.path:
                    raise ValueError(f"{where}: needs path: a local checkpoint directory")
                obj = cls.from_pretrained(spec.path, device=dev, **options)
            else:
                obj = cls(**options)
            items = [(obj, None)]
        elif ":" in spec.name:
            fn = load_callable(spec.name, where)
            kwargs = dict(spec.options)
            if spec.path is not None:
                kwargs["path"] = spec.path
            items = _as_rewards(fn(**kwargs), spec.name)
        else:
            raise ValueError(f"{where}: unknown reward {spec.name!r}; built-in: {sorted(BUILTIN)}, "
                             "or 'module:callable'")
        for r, w in items:
            rewards.append(r)
            weights.append(spec.weight * (1.0 if w is None else w))
    return RewardEnsemble(rewards, weights, mode=config.mode, normalize=config.normalize)
