"""``fastbicot`` command line: train | sft | generate | eval | plan | convert.

    fastbicot train --config configs/t2i_r1.yaml --optim.lr=2e-6 --output_dir=runs/x [--resume [STEP]] [--overwrite]
    torchrun --nproc_per_node 8 -m fastbicot train --config configs/t2i_r1.yaml   (FSDP2; trainer/distributed.py)
    fastbicot sft --config configs/toy.yaml                  (the supervised stage alone -> OUTPUT_DIR/sft/final)
    fastbicot generate --config configs/t2i_r1.yaml --prompts prompts.jsonl --out samples/ [--checkpoint DIR]
    fastbicot eval --config X.yaml --checkpoint DIR --prompts FILE [--num 10] [--no-cot]   (fastbicot/evaluate.py)
    fastbicot plan --config X.yaml --gpus 8 [--gpu-memory 80]                 (fastbicot/trainer/memory.py)
    fastbicot convert janus SRC DST | convert orm SRC DST
    fastbicot merge --adapter DIR --out DIR [--base DIR]     (a LoRA run's adapter + its base -> one model)

Settings come from the YAML file; ``--section.key=value`` overrides any of them. A bad key, type or
value exits with status 2 and one line naming it; nothing is written before the config is valid.
"""

from __future__ import annotations

import argparse
import os
import sys


def _config(args, rest):
    from .trainer.config import TrainerConfig, cli_overrides

    return TrainerConfig.from_yaml(args.config, cli_overrides(rest))


def cmd_train(args, rest) -> int:
    from .trainer import Trainer
    from .trainer.trainer import check_output_dir

    config = _config(args, rest)
    check_output_dir(config.output_dir, overwrite=args.overwrite, resume=args.resume is not None)
    trainer = Trainer(config)
    if args.resume is not None:
        from .trainer.trainer import find_checkpoint

        ckpt = find_checkpoint(config.output_dir, args.resume)
        trainer.load_checkpoint(ckpt)
        if trainer.world.is_main:
            print(f"fastbicot: resumed from {ckpt} at step {trainer.step_idx}", file=sys.stderr)
    out = trainer.train(overwrite=args.overwrite)
    trainer.world.close()
    if not trainer.world.is_main:  # torchrun: rank 0 reports
        return 0
    print(f"fastbicot: done. metrics: {os.path.join(out, 'metrics.jsonl')}\n"
          f"  reward curve: {os.path.join(out, 'reward_curve.png')}\n"
          f"  sample grids: {os.path.join(out, 'grids')}/\n"
          f"  final policy: {os.path.join(out, 'final')} "
          + ("(LoRA adapter, peft format; full model: fastbicot merge --adapter DIR --out DIR)"
             if config.lora.enabled else "(transformers format)"))
    return 0


def cmd_sft(args, rest) -> int:
    from .trainer.sft import SFTTrainer

    config = _config(args, rest)
    if config.sft.steps < 1:
        raise ValueError("sft.steps is 0: set --sft.steps=N (and sft.data) to run the SFT stage")
    final = SFTTrainer(config).train()
    print(f"fastbicot: SFT done. policy: {final} (transformers format); metrics: "
          f"{os.path.join(os.path.dirname(final), 'metrics.jsonl')}")
    return 0


def cmd_generate(args, rest) -> int:
    import json

    import torch
    from PIL import Image

    from .data import load_prompts
    from .rollout import RolloutEngine
    from .trainer.metrics import save_sample_grid
    from .trainer.trainer import build_policy

    config = _config(args, rest)
    model = config.model
    if args.checkpoint:
        model = model.replace(path=args.checkpoint, preset=None, builder=None)
    records = load_prompts(args.prompts)
    os.makedirs(os.path.join(args.out, "images"), exist_ok=True)
    policy = build_policy(model)
    engine = RolloutEngine(policy, config.rollout, progress=True)
    G = args.num if args.num is not None else config.rollout.num_generations
    lines, grid_batch = [], None
    from tqdm.auto import tqdm

    for start in tqdm(range(0, len(records), args.batch), desc="generate", unit="batch"):
        chunk = records[start:start + args.batch]
        batch = engine.generate(chunk, num_generations=G, seed=args.seed + start)
        grid_batch = grid_batch or batch
        for s, img in zip(batch.samples, batch.images):
            name = f"{start + s.prompt_index:05d}_{len(lines) % G}.png"
            Image.fromarray(img.cpu().numpy()).save(os.path.join(args.out, "images", name))
            lines.append({"prompt": s.prompt, "cot": s.cot_text, "image": f"images/{name}", **s.metadata})
    with open(os.path.join(args.out, "samples.jsonl"), "w", encoding="utf-8") as f:
        f.writelines(json.dumps(line, ensure_ascii=False) + "\n" for line in lines)
    save_sample_grid(grid_batch, None, os.path.join(args.out, "grid.png"), max_samples=8, title="fastbicot generate")
    with open(os.path.join(args.out, "config.yaml"), "w", encoding="utf-8") as f:
        f.write(config.replace(model=model.to_dict()).to_yaml())
    del torch
    print(f"fastbicot: wrote {len(lines)} images to {args.out}/images, samples.jsonl and grid.png")
    return 0


def cmd_merge(args, rest) -> int:
    if rest:
        raise SystemExit(f"fastbicot merge: unexpected arguments {rest}")
    from .trainer.lora import merge_adapter

    out = merge_adapter(args.adapter, args.out, base_dir=args.base)
    print(f"fastbicot: wrote {out} (transformers format: JanusPolicy.from_pretrained / "
          "JanusForConditionalGeneration.from_pretrained)")
    return 0


def cmd_convert(args, rest) -> int:
    if rest:
        raise SystemExit(f"fastbicot convert: unexpected arguments {rest}")
    from . import convert

    fn = {"janus": convert.convert_janus, "orm": convert.convert_orm}[args.kind]
    out = fn(args.src, args.dst)
    print(f"fastbicot: wrote {out or args.dst}")
    return 0


# subcommands whose own module parses the arguments: name -> (module, help)
DELEGATED = {
    "eval": ("fastbicot.evaluate", "generate N images per prompt with fixed seeds, score them, tables per task type"),
    "plan": ("fastbicot.trainer.memory", "per-GPU memory of a recipe from the model config alone"),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastbicot", description="Fast BiCoT-GRPO (T2I-R1) training")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="BiCoT-GRPO training from a YAML config (+ --section.key=value overrides)")
    t.add_argument("--config", required=True)
    t.add_argument("--resume", nargs="?", const="latest", default=None,
                   help="continue the run in output_dir from its latest (or the given step's) checkpoint")
    t.add_argument("--overwrite", action="store_true", help="replace a run already in output_dir")
    t.set_defaults(fn=cmd_train)
    f = sub.add_parser("sft", help="supervised fine-tuning on (prompt, CoT, image tokens) examples (config.sft)")
    f.add_argument("--config", required=True)
    f.set_defaults(fn=cmd_sft)
    g = sub.add_parser("generate", help="images + CoTs for a prompt file, and a grid")
    g.add_argument("--config", required=True)
    g.add_argument("--prompts", required=True)
    g.add_argument("--out", required=True)
    g.add_argument("--checkpoint", help="a transformers-format policy directory (e.g. OUTPUT_DIR/final)")
    g.add_argument("--num", type=int, help="images per prompt (default: rollout.num_generations)")
    g.add_argument("--batch", type=int, default=8, help="prompts per rollout")
    g.add_argument("--seed", type=int, default=0)
    g.set_defaults(fn=cmd_generate)
    c = sub.add_parser("convert", help="convert the seed's checkpoints to transformers' format")
    c.add_argument("kind", choices=["janus", "orm"])
    c.add_argument("src")
    c.add_argument("dst")
    c.set_defaults(fn=cmd_convert)
    m = sub.add_parser("merge", help="merge a LoRA adapter (a LoRA run's final/ or checkpoint) into its base")
    m.add_argument("--adapter", required=True, help="a directory with adapter_config.json + "
                   "adapter_model.safetensors (OUTPUT_DIR/final of a LoRA run)")
    m.add_argument("--out", required=True, help="where the merged transformers-format policy goes (new)")
    m.add_argument("--base", help="the base policy (transformers format); default: the directory the "
                   "adapter records (model.path or the SFT warm start of the run)")
    m.set_defaults(fn=cmd_merge)
    return p


def main(argv=None) -> int:
    from .settings import ConfigError
    from .trainer.trainer import TrainingError

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in DELEGATED:
        import importlib

        return importlib.import_module(DELEGATED[argv[0]][0]).cli(argv[1:])
    parser = build_parser()
    for name, (_, text) in DELEGATED.items():
        parser._subparsers._group_actions[0].add_parser(name, help=text + " (see its --help)")
    args, rest = parser.parse_known_args(argv)
    for name in ("num", "batch"):
        v = getattr(args, name, None)
        if v is not None and v < 1:
            parser.error(f"--{name} must be >= 1, got {v}")
    try:
        return args.fn(args, rest)
    except ConfigError as e:
        if os.environ.get("FASTBICOT_DEBUG") == "1":
            raise
        print(f"fastbicot: config error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError, TypeError, TrainingError) as e:
        if os.environ.get("FASTBICOT_DEBUG") == "1":  # the full traceback
            raise
        print(f"fastbicot: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2 if not isinstance(e, TrainingError) else 1


if __name__ == "__main__":
    sys.exit(main())
