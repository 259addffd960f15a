"""Reward presets: the reward sets of published recipes, wired with their parameters.

``t2i_r1_rewards`` is the T2I-R1 seed's ``--reward_funcs hps git gdino orm`` (``src/scripts/run_grpo.sh``
of CaraJ7/T2I-R1) summed with weight 1 each (``grpo_trainer.py:739``): HPS v2.1, GIT VQA, GroundingDINO
(SwinT-OGC = ``grounding-dino-tiny``) with the seed's rules, and the ORM, each with the seed's defaults.
"""

from __future__ import annotations

from .base import RewardEnsemble

_PER_REWARD = ("hps_kwargs", "git_kwargs", "gdino_kwargs", "orm_kwargs")


def t2i_r1_rewards(*, hps: str, git: str, gdino: str, orm: str, device="cpu", **options) -> RewardEnsemble:
    """The seed's four rewards from local checkpoint directories, summed unweighted.

    ``hps``: a converted HPS v2.1 CLIPModel directory (``convert_hps_checkpoint``); ``git``: a
    GitForCausalLM directory (microsoft/git-large-vqav2); ``gdino``: a GroundingDinoForObjectDetection
    directory (IDEA-Research/grounding-dino-tiny); ``orm``: a LlavaOnevisionForConditionalGeneration
    directory (``fastbicot.convert.convert_orm`` of ORM-T2I-R1). Each loads with its reward's
    ``from_pretrained``.

    Options: ``dtype`` (every model; default "auto": bf16 on CUDA, fp32 elsewhere), ``seed_exact=True``
    (switch off the GroundingDINO rule fixes ``fix_above``, ``fix_proximity``, ``fix_nms``: the seed's
    scoring exactly), and ``hps_kwargs`` / ``git_kwargs`` / ``gdino_kwargs`` / ``orm_kwargs`` (dicts passed
    to that reward's ``from_pretrained``, overriding the preset). The rewards are named hps, git, gdino,
    orm, as in the seed.
    """
    from .learned import GitVQAReward, GroundingDinoReward, HPSReward, ORMReward

    known = {"dtype", "seed_exact", *_PER_REWARD}
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(f"t2i_r1_rewards: unknown options {unknown}; known options are {sorted(known)}")
    for key in _PER_REWARD:
        if not isinstance(options.get(key, {}), dict):
            raise TypeError(f"t2i_r1_rewards: {key} must be a dict of from_pretrained arguments, "
                            f"got {type(options[key]).__name__}")
    for what, path in (("hps", hps), ("git", git), ("gdino", gdino), ("orm", orm)):
        if not isinstance(path, (str, bytes)) and not hasattr(path, "__fspath__"):
            raise TypeError(f"t2i_r1_rewards: {what} must be a local checkpoint directory, got {type(path).__name__}")
    dtype = options.get("dtype", "auto")
    fixes = not options.get("seed_exact", False)

    def load(cls, path, name, defaults, key):
        kwargs = {"device": device, "dtype": dtype, "name": name, **defaults, **options.get(key, {})}
        return cls.from_pretrained(path, **kwargs)

    rewards = [
        load(HPSReward, hps, "hps", {}, "hps_kwargs"),
        load(GitVQAReward, git, "git", {}, "git_kwargs"),
        load(GroundingDinoReward, gdino, "gdino",
             {"rules": "t2i_r1", "fix_above": fixes, "fix_proximity": fixes, "fix_nms": fixes}, "gdino_kwargs"),
        load(ORMReward, orm, "orm", {}, "orm_kwargs"),
    ]
    return RewardEnsemble(rewards, mode="sum")
