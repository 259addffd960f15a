"""AdamW over fp32 master weights, the LR schedule, gradient clipping.

The seed trains bf16 weights under DeepSpeed ZeRO-3, which keeps fp32 master weights and fp32
Adam states: at lr 1e-6 a bf16 weight (8 bits of mantissa) would drop almost every update. Here,
when the model computes in a lower precision than ``master_dtype``, each trainable parameter gets
an fp32 master copy; gradients are copied onto the masters, AdamW steps the masters, and the
model's weights are refreshed from them. When the model already holds fp32 (CPU runs), the
optimizer steps the parameters directly.
"""

from __future__ import annotations

import math

import torch


class MasterOptimizer:
    """AdamW (+ schedule + clipping) for ``params``, through master copies when their dtype is lower."""

    def __init__(self, params, optim, total_updates: int):
        self.params = [p for p in params if p.requires_grad]
        if not self.params:
            raise ValueError("no trainable parameters: model.trainable matched nothing that requires grad")
        master_dtype = getattr(torch, optim.master_dtype)
        self.use_master = any(p.dtype != master_dtype for p in self.params)
        if self.use_master:
            self.masters = [p.detach().to(master_dtype).clone().requires_grad_(True) for p in self.params]
        else:
            self.masters = self.params
        self.optimizer = torch.optim.AdamW(self.masters, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps,
                                           weight_decay=optim.weight_decay)
        self.max_grad_norm = optim.max_grad_norm
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(optim.schedule, optim.warmup_steps, total_updates))

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def zero_grad(self):
        for p in self.params:
            p.grad = None
        if self.use_master:
            for m in self.masters:
                m.grad = None

    def grad_norm(self) -> torch.Tensor:
        """The global L2 norm of the gradients (float32 0-dim; non-finite when any grad is)."""
        grads = [p.grad for p in self.params if p.grad is not None]
        if not grads:
            return torch.zeros(())
        return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))

    def step(self, grad_norm: torch.Tensor):
        """Clip by the precomputed ``grad_norm`` (the caller checks it is finite), step, schedule."""
        if self.use_master:
            for p, m in zip(self.params, self.masters):
                m.grad = None if p.grad is None else p.grad.to(m.dtype)
        if self.max_grad_norm > 0:
            coef = (self.max_grad_norm / (float(grad_norm) + 1e-6))
            if coef < 1:
                for m in self.masters:
                    if m.grad is not None:
                        m.grad.mul_(coef)
        self.optimizer.step()
        self.scheduler.step()
        if self.use_master:
            with torch.no_grad():
                for p, m in zip(self.params, self.masters):
                    p.copy_(m)
        self.zero_grad()

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "masters": [m.detach() for m in self.masters] if self.use_master else None}

    def load_state_dict(self, state: dict):
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.use_master and state.get("masters") is not None:
            with torch.no_grad():
                for p, m, saved in zip(self.params, self.masters, state["masters"]):
                    m.copy_(saved)
                    p.copy_(saved)


def lr_lambda(schedule: str, warmup: int, total: int):
    """HF Trainer's schedules: linear warmup over ``warmup`` updates, then linear / cosine decay to 0
    at ``total`` (the seed: linear, no warmup) or constant."""
    total = max(1, total)

    def f(t: int) -> float:
        if warmup and t < warmup:
            return t / warmup  # as transformers' get_*_schedule_with_warmup: 0 at the first update
        if schedule == "constant":
            return 1.0
        frac = (t - warmup) / max(1, total - warmup)
        if schedule == "linear":
            return max(0.0, 1.0 - frac)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, frac)))

    return f
