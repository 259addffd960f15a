"""Per-GPU memory plan of a training recipe (fastbicot/trainer/memory.py; docs/memory_plan.md).

    python bench/memory_plan.py                                   # the T2I-R1 recipe: 7B and 1B, 1 and 8 GPUs
    python bench/memory_plan.py --markdown                        # the same as docs/memory_plan.md's tables
    python bench/memory_plan.py --config X.yaml --gpus 8 [--gpu-memory 80] [--section.key=value ...]

With ``--config`` it is ``fastbicot plan`` (``fastbicot.trainer.memory.cli``). Without, it plans the
T2I-R1 recipe (TrainerConfig's defaults: G = 8, 16 prompts per step, one prompt group per micro-batch,
bf16 compute with fp32 master weights and AdamW states, gradient checkpointing, beta = 0.01 with a
replicated or sharded reference; rewards HPS + GIT + GroundingDINO + ORM on the policy's GPU) on Janus-Pro-7B and
-1B shapes (meta device: nothing is loaded), for the worst case (every CoT 1024 tokens) and a typical
one (128-token CoTs), beside the seed's own recipe (DeepSpeed ZeRO-3 + HF eager generation).
"""

from __future__ import annotations

import argparse
import sys

REWARDS = ["hps", "git", "gdino", "orm"]


def recipe(preset: str):
    from fastbicot.trainer import TrainerConfig

    return TrainerConfig.from_dict(dict(model=dict(preset=preset)))


def tables(gpu_memory: float, markdown: bool) -> None:
    from fastbicot.trainer.memory import GiB, model_shapes, plan_memory, plan_seed_memory

    rows = []
    full = seed_full = None
    for preset in ("janus-pro-7b", "janus-pro-1b"):
        cfg = recipe(preset)
        s = model_shapes(cfg)
        variants = [(1, "replicated"), (8, "replicated"), (8, "sharded")]
        for cot in (None, 128):
            for gpus, ref in variants:
                p = plan_memory(cfg, gpus=gpus, gpu_memory_gib=gpu_memory, shapes=s, rewards=REWARDS,
                                cot_tokens=cot, reference=ref)
                if preset == "janus-pro-7b" and gpus == 8 and cot is None and ref == "sharded":
                    full = p
                pk = p.peaks
                rows.append((preset, "1024 (max)" if cot is None else str(cot), gpus,
                             f"fastbicot, ref {ref}", pk["rollout"][0] / GiB, pk["reward"][0] / GiB,
                             pk["update"][0] / GiB, p.peak_phase, p.fits))
            sp = plan_seed_memory(cfg, gpus=8, gpu_memory_gib=gpu_memory, shapes=s, rewards=REWARDS, cot_tokens=cot)
            pk = sp.peaks
            rows.append((preset, "1024 (max)" if cot is None else str(cot), 8, "seed: ZeRO-3 + HF generate",
                         pk["rollout"][0] / GiB, pk["reward"][0] / GiB, pk["update"][0] / GiB, sp.peak_phase, sp.fits))
            if preset == "janus-pro-7b" and cot is None:
                seed_full = sp
    head = ("model", "CoT tokens", "GPUs", "recipe", "rollout GiB", "reward GiB", "update GiB", "peak in",
            f"fits {gpu_memory:g} GiB - 10%")
    if markdown:
        print("| " + " | ".join(head) + " |")
        print("|" + "---|" * len(head))
        for r in rows:
            print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} | {r[4]:.1f} | {r[5]:.1f} | {r[6]:.1f} | {r[7]} | "
                  f"{'yes' if r[8] else '**no**'} |")
    else:
        for r in rows:
            print(f"{r[0]:<13} cot {r[1]:<10} {r[2]} GPU(s)  {r[3]:<42} rollout {r[4]:6.1f}  reward {r[5]:6.1f}  "
                  f"update {r[6]:6.1f}  peak in {r[7]:<7}  {'fits' if r[8] else 'DOES NOT FIT'}")
    print()
    print(full.format())
    print()
    print(seed_full.format())


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--config" in argv or any(a.startswith("--config=") for a in argv):
        from fastbicot.trainer.memory import cli

        return cli(argv)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gpu-memory", type=float, default=80.0)
    p.add_argument("--markdown", action="store_true")
    args = p.parse_args(argv)
    tables(args.gpu_memory, args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
