"""Group advantages (DESIGN.md §3): A = (r - mean_g) / (std_g + eps), unbiased std, as the seed.

The seed (grpo_trainer.py:739-748) views the summed rewards as [groups, G], takes ``mean`` and
``std`` (torch's unbiased std) per group and divides by ``std + 1e-4``. Options: the std of the
whole batch instead of each group's ("batch"), no scaling ("none", Dr.GRPO), and DAPO's filter of
groups whose rewards are all equal (they carry no signal; the filter marks them for the loss to skip).
"""

from __future__ import annotations

import torch


def group_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, *, scale: str = "group", eps: float = 1e-4,
                     filter_zero_std: bool = False):
    """rewards float [N], group_ids int [N] -> (advantages float32 [N], keep bool [N], stats dict).

    A group of one sample has std NaN in the seed (torch.std of one element); here its advantage is 0
    (it has nothing to be compared with). ``keep`` is False for samples of filtered groups.
    """
    if rewards.dim() != 1 or group_ids.shape != rewards.shape:
        raise ValueError(f"rewards [N] and group_ids [N] expected, got {tuple(rewards.shape)} and "
                         f"{tuple(group_ids.shape)}")
    if not torch.isfinite(rewards).all():
        bad = (~torch.isfinite(rewards)).nonzero().flatten().tolist()
        raise ValueError(f"rewards are not finite at samples {bad[:8]}: {rewards[bad[:8]].tolist()}")
    r = rewards.double().cpu()
    _, g = torch.unique(group_ids.cpu(), return_inverse=True)
    n_groups = int(g.max()) + 1 if g.numel() else 0
    count = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, g, torch.ones_like(r))
    mean = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, g, r) / count
    dev = r - mean[g]
    var = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, g, dev * dev) / (count - 1).clamp(min=1)
    std_g = var.sqrt()
    if scale == "group":
        adv = dev / (std_g[g] + eps)
    elif scale == "batch":
        adv = dev / (r.std() + eps if r.numel() > 1 else 1.0 + eps)
    elif scale == "none":
        adv = dev
    else:
        raise ValueError(f"scale must be 'group', 'batch' or 'none', got {scale!r}")
    adv = torch.where(count[g] > 1, adv, torch.zeros_like(adv))
    # all rewards of the group equal: exactly zero spread (no tolerance: rewards are often discrete)
    spread = torch.zeros(n_groups, dtype=torch.long).index_add_(0, g, (dev != 0).long())
    flat = spread == 0
    keep = ~flat[g] if filter_zero_std else torch.ones_like(g, dtype=torch.bool)
    stats = {"reward/group_std": float(std_g[count > 1].mean()) if (count > 1).any() else 0.0,
             "groups/zero_std": float(flat.sum()), "groups/filtered": float(flat.sum()) if filter_zero_std else 0.0}
    return adv.float(), keep, stats
