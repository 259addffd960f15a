"""A training run that records what it generated, for tests/test_distributed.py.

    [torchrun --nproc_per_node N] python tests/dist_worker.py OUT.json [--resume DIR] [--hang-rank R]
        [--gated-reward] [--key=value ...]

Builds a Trainer from configs/toy.yaml plus the overrides, runs ``steps`` steps (saving checkpoints as
configured) and writes, from rank 0: per step the metrics and every sample of the global batch
(global prompt index, generation, CoT ids, image tokens, reward), and the trained parameters.
--gated-reward replaces the toy rewards by ``gated_reward`` (most groups without a reward spread).
"""

import json
import os
import sys
import zlib

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def gated_reward(images, prompts, metadata, cots):
    """The mean red level for prompts whose CRC-32 is 0 mod 3, 0 for every sample of the others: those
    groups have no reward spread, so DAPO's filter drops them and the refill has to generate more."""
    gate = torch.tensor([zlib.crc32(p.encode()) % 3 == 0 for p in prompts], dtype=torch.float64)
    return images[..., 0].double().mean((1, 2)) / 255 * gate


def main(argv):
    from fastbicot.trainer import Trainer, TrainerConfig
    from fastbicot.trainer.config import cli_overrides

    out, rest = argv[0], argv[1:]
    resume = hang = None
    if rest[:1] == ["--resume"]:
        resume, rest = rest[1], rest[2:]
    if rest[:1] == ["--hang-rank"]:  # that rank stops answering before the first step (a stuck GPU)
        hang, rest = int(rest[1]), rest[2:]
    rewards = None
    if rest[:1] == ["--gated-reward"]:
        from fastbicot.rewards import FunctionReward

        rewards, rest = [FunctionReward("gated", gated_reward)], rest[1:]
    cfg = TrainerConfig.from_yaml(os.path.join(ROOT, "configs", "toy.yaml"), cli_overrides(rest))
    trainer = Trainer(cfg, rewards=rewards)
    if resume:
        trainer.load_checkpoint(resume)
    world = trainer.world
    if hang == world.rank:
        import time

        time.sleep(3600)
    steps = []
    while trainer.step_idx < cfg.steps:
        m = trainer.step()
        b, s = trainer.last_batch, trainer.last_scores
        G = b.num_generations
        mine = [(int(b.group_index[smp.prompt_index]), i % G, list(map(int, smp.cot_ids)),
                 smp.image_tokens.tolist(), float(s.total[i])) for i, smp in enumerate(b.samples)]
        samples = sorted(x for part in world.gather_objects(mine) for x in part)
        steps.append({"metrics": m, "samples": samples})
        if cfg.checkpoint.every and trainer.step_idx % cfg.checkpoint.every == 0:
            trainer.save_checkpoint()
    names = trainer.optim_names
    full = world.full_state_dict(trainer.policy)
    if full is None:
        full = {k: v.detach() for k, v in trainer.policy.hf_model.state_dict().items()}
    if world.is_main:
        prefix = "hf_model."
        params = {n: full[n[len(prefix):]].double().flatten().tolist()[:64] for n in names}
        norms = {n: float(full[n[len(prefix):]].double().norm()) for n in names}
        with open(out, "w") as f:
            json.dump({"world_size": world.world_size, "steps": steps, "params": params, "norms": norms}, f)
    world.close()


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1:])
