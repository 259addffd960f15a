"""fastbicot: fast BiCoT-GRPO (T2I-R1) training for autoregressive text-to-image models.

Top-level names are imported lazily so that ``import fastbicot`` stays cheap and a user who only
wants one kernel does not pay for transformers.
"""

import importlib

__version__ = "0.1.0"

_LAZY = {
    "JanusPolicy": "fastbicot.models",
    "load_prompts": "fastbicot.data",
    "vq_decode": "fastbicot.vq",
    "generate_images": "fastbicot.rollout",
    "RolloutEngine": "fastbicot.rollout",
    "RolloutConfig": "fastbicot.rollout",
    "SamplingParams": "fastbicot.rollout",
    "Trainer": "fastbicot.trainer",
    "TrainerConfig": "fastbicot.trainer",
    "SFTTrainer": "fastbicot.trainer",
}

__all__ = list(_LAZY) + ["__version__"]


def __getattr__(name):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'fastbicot' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
