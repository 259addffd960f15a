"""DAPO's dynamic sampling: groups whose rewards are all equal are dropped and the step's batch is refilled
with freshly generated groups until it holds ``data.prompts_per_step`` groups with a reward spread.

As ReasonGen-R1 (``verl/trainer/ppo/ray_trainer.py:931-1003``, ``algorithm.filter_groups``): after
scoring, keep the groups with a spread (a group of one sample is kept); while fewer than P groups are
kept, generate and score another batch and keep its spread groups; after ``max_gen_batches`` generation
batches (the first included) without reaching P, stop with an error (<= 0: no limit); the step trains on
the first P kept groups, in order.

``advantage.refill``: "new_prompts" (the original: the next prompts of the data) or "same_prompts" (the
filtered prompts again, with fresh samples). Refill prompts are drawn per (data.seed, step, round) from
the whole prompt set -- the original consumes the next batches of its data loader instead -- so the data
position stays a function of the step (exact resume). ``advantage.refill_size``: "missing" (generate as
many groups as are missing) or "pow2" (the original: ``min(P, 2 ** (bit_length(missing) + 1))``).

Under torchrun the counts are global: every rank agrees on the groups kept so far (a sum over ranks), on
the size and prompts of each refill batch, and so on the number of rounds (each round one unshard of the
policy on every rank). Each rank generates a contiguous share of a refill batch, keyed by its position in
the batch (``generate(group_index=)``), so the samples are the ones one process draws. At the end the kept
groups are gathered in the one-process order (round by round, ranks in order) and each rank takes its
``local_slice`` of the first P: N ranks train on exactly the batch one process would.
"""

from __future__ import annotations

import dataclasses
import hashlib

import torch

from ..rewards import RewardOutput
from ..rollout import RolloutBatch
from .batch import subset_groups


def _seed(seed: int, step: int, round_: int) -> int:
    h = hashlib.blake2b(f"fastbicot/{seed}/{step}/refill/{round_}".encode(), digest_size=7).digest()
    return int.from_bytes(h, "little")


def spread_groups(batch, total: torch.Tensor) -> list[int]:
    """The prompt indices (in order) of ``batch``'s groups whose rewards are not all equal, or of one sample."""
    by_group: dict[int, list[float]] = {}
    for s, r in zip(batch.samples, total.tolist()):
        by_group.setdefault(s.prompt_index, []).append(r)
    return [g for g, rs in by_group.items() if len(rs) == 1 or any(r != rs[0] for r in rs)]


def select_groups(batch, scores, groups: list[int]):
    """(batch, scores) restricted to the samples of ``groups`` (prompt indices), renumbered 0..len-1."""
    batch, idx = subset_groups(batch, groups)
    return batch, RewardOutput(scores.total[idx], {k: v[idx] for k, v in scores.components.items()})


def _timing(parts) -> dict:
    """The summed timings (seconds per phase) of several rollouts."""
    out = {}
    for b, _ in parts:
        for k, v in b.timing.items():
            out[k] = out.get(k, 0.0) + v
    return out


def concat(parts):
    """One (batch, scores) from several, prompt indices renumbered in order (group indices local)."""
    if len(parts) == 1:
        return parts[0]
    batch = RolloutBatch.concat([b for b, _ in parts])
    if parts[0][0].group_index is not None:
        batch = dataclasses.replace(batch, group_index=list(range(len({s.prompt_index for s in batch.samples}))))
    keys = parts[0][1].components.keys()
    scores = RewardOutput(torch.cat([s.total for _, s in parts]),
                          {k: torch.cat([s.components[k] for _, s in parts]) for k in keys})
    return batch, scores


def refill_size(missing: int, P: int, rule: str) -> int:
    if rule == "pow2":  # ray_trainer.py:848-851 (one process: world size 1)
        return min(P, 1 << (missing.bit_length() + 1))
    return missing


def _share(n: int, rank: int, world: int) -> range:
    """Rank ``rank``'s contiguous share of ``n`` refill groups (shares differ by at most one; some may be empty)."""
    return range(n * rank // world, n * (rank + 1) // world)


def _all(world, local: list) -> list:
    """The concatenation over ranks (rank order) of each rank's list."""
    return [x for part in world.gather_objects(local) for x in part]


def _moved(part, device_of):
    """(batch, scores) with every tensor moved by ``device_of(name, tensor)`` (to the CPU to cross ranks:
    a pickled CUDA tensor would come back on the sender's device index)."""
    batch, scores = part

    def mv(name, t):
        return t.to(device_of(name, t)) if torch.is_tensor(t) else t

    samples = [dataclasses.replace(s, **{f.name: mv(f.name, getattr(s, f.name)) for f in dataclasses.fields(s)
                                         if torch.is_tensor(getattr(s, f.name))}) for s in batch.samples]
    batch = dataclasses.replace(batch, samples=samples, image_tokens=mv("image_tokens", batch.image_tokens),
                                images=mv("images", batch.images))
    return batch, RewardOutput(mv("total", scores.total), {k: mv("total", v) for k, v in scores.components.items()})


def _redistribute(world, parts, own: range, like):
    """Every rank's kept groups in the one-process order (round-major, then rank order), cut to this rank's
    ``own`` share of the first ``len(own) * world_size``. ``like``: a (batch, scores) of this rank whose
    tensors' devices the result takes."""
    devices = {f.name: getattr(like[0].samples[0], f.name).device for f in dataclasses.fields(like[0].samples[0])
               if torch.is_tensor(getattr(like[0].samples[0], f.name))}
    devices.update(image_tokens=like[0].image_tokens.device, total=like[1].total.device)
    if like[0].images is not None:
        devices["images"] = like[0].images.device
    cpu = [_moved(p, lambda name, t: "cpu") for p in parts]
    everyone = world.gather_objects(cpu)  # [rank][round]
    ordered = [everyone[r][k] for k in range(len(parts)) for r in range(world.world_size)]
    batch, scores = concat(ordered)
    batch, scores = select_groups(batch, scores, list(own))
    batch = dataclasses.replace(batch, timing=_timing(parts))  # this rank's own generation time
    return _moved((batch, scores), lambda name, t: devices.get(name, t.device))


def refill(trainer, batch, scores, records):
    """DAPO dynamic sampling for one step (see the module docstring): -> (batch, scores, stats) with exactly
    ``len(records)`` spread groups over all ranks. ``records``: the step's prompt records (all ranks');
    ``batch``/``scores``: this rank's share of them (``local_slice``)."""
    from .trainer import TrainingError

    c, W = trainer.config, trainer.world
    a = c.advantage
    P, step = len(records), trainer.step_idx
    own = W.local_slice(P, "the step's prompt count")
    first = (batch, scores)
    kept_groups = spread_groups(batch, scores.total)
    parts = [select_groups(batch, scores, kept_groups)]
    kept_all = set(_all(W, [own[g] for g in kept_groups]))  # global prompt positions
    n_kept, gen_batches, refilled = len(kept_all), 1, 0
    first_kept = n_kept
    flat = [records[g] for g in range(P) if g not in kept_all]
    while n_kept < P:
        if a.max_gen_batches > 0 and gen_batches >= a.max_gen_batches:
            raise TrainingError(f"step {step + 1}: {n_kept} of {P} prompt groups have a reward spread after "
                                f"{gen_batches} generation batches (advantage.max_gen_batches); every other group "
                                "scored equal rewards -- check the rewards and the data")
        size = refill_size(P - n_kept, P, a.refill_size)
        if a.refill == "same_prompts":
            src = flat or records
            todo = (src * (size // len(src) + 1))[:size]
        else:
            g = torch.Generator().manual_seed(_seed(c.data.seed, step, gen_batches))
            pool = trainer.prompts if trainer.prompts is not None else records
            todo = [pool[int(i)] for i in torch.randperm(len(pool), generator=g)[:size]]
        mine = _share(len(todo), W.rank, W.world_size)
        trainer.policy.eval()
        with W.unsharded(trainer.policy):  # every rank, even one with an empty share: it is a collective
            more = (trainer.engine.generate([todo[i] for i in mine], seed=_seed(c.seed, step, gen_batches),
                                            group_index=list(mine)) if len(mine) else None)
        good = []
        if more is not None:
            more_scores = trainer.score(more)
            good = spread_groups(more, more_scores.total)
            parts.append(select_groups(more, more_scores, good))
        else:
            parts.append(select_groups(first[0], first[1], []))  # an empty part keeps the rounds aligned
        good_all = set(_all(W, [mine[i] for i in good]))
        gen_batches += 1
        refilled += len(todo)
        n_kept += len(good_all)
        flat = [todo[i] for i in range(len(todo)) if i not in good_all]
    if W.enabled:
        batch, scores = _redistribute(W, parts, own, first)
    else:
        batch, scores = concat(parts)
        if n_kept > P:  # the first P kept groups, as the original's truncation to train_batch_size * n
            batch, scores = select_groups(batch, scores, list(range(P)))
    return batch, scores, {"groups/gen_batches": float(gen_batches), "groups/refilled": float(refilled),
                           "groups/first_batch_kept": float(first_kept)}


__all__ = ["concat", "refill", "refill_size", "select_groups", "spread_groups"]
