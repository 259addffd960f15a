"""The picture in docs/toy.md: decoded SFT examples with their prompt, plan, mistake and reward.

Regenerate with ``python -m fastbicot.toy.figure docs/img/toy_samples.png``.
"""

from __future__ import annotations

import sys
import textwrap

import torch


def save_samples_png(path, n: int = 12, seed: int = 0, error_rate: float = 0.35, cols: int = 4) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fastbicot.vq import vq_decode

    from .policy import build_policy
    from .rewards import toy_reward_ensemble
    from .sft import sft_examples

    policy = build_policy(seed=0)
    exs = sft_examples(n, seed, error_rate=error_rate)
    images = vq_decode(policy.vqmodel, torch.tensor([ex["image_tokens"] for ex in exs]), output="uint8")
    out = toy_reward_ensemble()(images, [ex["prompt"] for ex in exs], [ex["metadata"] for ex in exs])
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.3 * cols, 4.6 * rows))
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i >= n:
            continue
        ex = exs[i]
        ax.imshow(images[i].numpy(), interpolation="nearest")
        parts = " ".join(f"{k[4:]} {v[i]:.2f}" for k, v in out.components.items())
        caption = "\n".join(
            [*textwrap.wrap("prompt: " + ex["prompt"], 36), *textwrap.wrap("plan: " + ex["cot"], 36),
             f"mistake: {ex['mistake'] or 'none'}", parts]
        )
        ax.set_title(caption, fontsize=7, loc="left", family="monospace")
    fig.tight_layout(h_pad=1.5)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return str(path)


if __name__ == "__main__":
    print(save_samples_png(sys.argv[1] if len(sys.argv) > 1 else "toy_samples.png"))
