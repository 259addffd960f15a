"""What the user sees: metrics.jsonl (one line per step), a progress bar, sample grids, a reward
curve, and TensorBoard / wandb when they are installed (never required; the log says which ran)."""

from __future__ import annotations

import json
import math
import os
import textwrap


def _clean(v):
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else (1e308 if v > 0 else -1e308)  # JSON has no NaN/inf
    return v


class MetricsLogger:
    """Appends one JSON line per step to ``{output_dir}/metrics.jsonl`` (flushed, so a crash keeps
    every finished step) and mirrors scalars to TensorBoard / wandb when enabled and installed."""

    def __init__(self, output_dir: str, log, *, total_steps: int, start_step: int = 0, config_dict=None):
        self.output_dir = output_dir
        os.makedirs(output_dir, exist_ok=True)
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self.backends = ["jsonl"]
        self.bar = None
        if log.progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)
        self.tb = None
        if log.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(os.path.join(output_dir, "tensorboard"))
                self.backends.append("tensorboard")
            except ImportError:  # tensorboard not installed: jsonl only
                pass
        self.wandb = None
        if log.wandb:
            try:
                import wandb

                os.environ.setdefault("WANDB_MODE", "offline")
                self.wandb = wandb.init(dir=output_dir, config=config_dict or {}, reinit=True)
                self.backends.append(f"wandb ({os.environ['WANDB_MODE']})")
            except ImportError:
                pass

    def log(self, metrics: dict):
        line = {k: _clean(v) for k, v in metrics.items()}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(line) + "\n")
            f.flush()
            os.fsync(f.fileno())
        step = int(metrics["step"])
        if self.tb is not None:
            for k, v in line.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in line.items() if k != "step"}, step=step)
        if self.bar is not None:
            self.bar.update(1)
            show = {k: line[k] for k in ("reward/mean", "loss", "kl") if isinstance(line.get(k), (int, float))}
            self.bar.set_postfix({k.split("/")[-1] if k != "reward/mean" else "reward": f"{v:.4g}"
                                  for k, v in show.items()})

    def close(self):
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def read_metrics(path: str) -> list:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def save_reward_curve(metrics_path: str, out_path: str, window: int = 5) -> str:
    """PNG of reward/mean (raw and a moving average) and every reward/<name> component per step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    if not rows:
        raise ValueError(f"{metrics_path}: no metrics to plot")
    steps = [r["step"] for r in rows]
    skip = {"reward/mean", "reward/std", "reward/group_std"}
    keys = ["reward/mean"] + sorted({k for r in rows for k in r if k.startswith("reward/") and k not in skip})
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    for k in keys:
        ys = [r.get(k) for r in rows]
        pts = [(s, y) for s, y in zip(steps, ys) if isinstance(y, (int, float))]
        if not pts:
            continue
        xs, ys = zip(*pts)
        main = k == "reward/mean"
        ax.plot(xs, ys, lw=0.8 if main else 1.0, alpha=0.35 if main else 0.9,
                color="black" if main else None, label=None if main else k.split("/", 1)[1])
        if main:
            sm = [sum(ys[max(0, i - window + 1): i + 1]) / len(ys[max(0, i - window + 1): i + 1])
                  for i in range(len(ys))]
            ax.plot(xs, sm, lw=2.2, color="black", label=f"total (mean, {window}-step avg)")
    ax.set_xlabel("step")
    ax.set_ylabel("reward")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    ax.set_title("reward per step")
    fig.tight_layout()
    tmp = out_path + ".tmp.png"
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, out_path)
    return out_path


def save_sample_grid(batch, rewards, out_path: str, *, max_samples: int = 8, title: str = "") -> str:
    """PNG grid: each cell an image with its prompt, CoT (plan) and reward (total and components;
    ``rewards`` may be None for unscored samples)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = min(max_samples, len(batch.samples))
    if batch.images is None or n == 0:
        raise ValueError("the batch has no images to draw")
    cols = min(4, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 4.4 * rows), dpi=100, squeeze=False)
    # spread the cells over the prompts: every G-th sample first, so a grid shows many prompts
    G = max(1, batch.num_generations)
    order = sorted(range(len(batch.samples)), key=lambda i: (i % G, i))[:n]
    for ax, i in zip(axes.flat, order):
        s = batch.samples[i]
        ax.imshow(batch.images[i].cpu().numpy(), interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        parts = [] if rewards is None else [f"R={float(rewards.total[i]):.3f}"] + [
            f"{k}={float(v[i]):.2f}" for k, v in rewards.components.items()]
        text = "\n".join([
            textwrap.shorten(s.prompt, 60, placeholder="…"),
            "plan: " + textwrap.shorten(s.cot_text or "(empty)", 110, placeholder="…"),
            "  ".join(parts),
        ])
        text = "".join(ch if ch.isprintable() or ch == "\n" else "·" for ch in text)  # raw bytes of a young policy
        ax.set_title("\n".join(textwrap.fill(t, 38) for t in text.split("\n")), fontsize=7, loc="left")
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.97) if title else None)
    tmp = out_path + ".tmp.png"
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, out_path)
    return out_path
