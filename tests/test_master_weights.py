"""The optimizer over fp32 master weights (trainer/optim.py): the path every bf16 run takes (the GPU
default), checked on CPU in bf16 against AdamW written out in float64.

At the recipe's lr 1e-6 a bf16 weight cannot move (its spacing near 1 is 2**-7): only the fp32
masters carry the updates, and the bf16 weights must be exactly the masters rounded."""

import math

import pytest
import torch
from helpers import make_trainer

from fastbicot.trainer.config import OptimConfig
from fastbicot.trainer.optim import MasterOptimizer


def adamw_reference(w0, grads, *, lr, betas, eps, weight_decay, max_grad_norm, total):
    """float64 AdamW steps of the weights ``w0`` (list of tensors) on ``grads`` (one list per step):
    global-norm clipping, decoupled weight decay, bias correction, linear decay of lr to 0 over ``total``."""
    w = [x.double().clone() for x in w0]
    m = [torch.zeros_like(x) for x in w]
    v = [torch.zeros_like(x) for x in w]
    b1, b2 = betas
    for t, gs in enumerate(grads, 1):
        gs = [g.double() for g in gs]
        norm = math.sqrt(sum(float((g * g).sum()) for g in gs))
        coef = max_grad_norm / (norm + 1e-6)
        if max_grad_norm > 0 and coef < 1:
            gs = [g * coef for g in gs]
        step_lr = lr * max(0.0, 1 - (t - 1) / total)
        for i, g in enumerate(gs):
            w[i] *= 1 - step_lr * weight_decay
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            mhat, vhat = m[i] / (1 - b1**t), v[i] / (1 - b2**t)
            w[i] -= step_lr * mhat / (vhat.sqrt() + eps)
    return w


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("lr,clip", [(1e-6, 1.0), (3e-3, 0.05), (2e-2, 0.0)])
def test_bf16_weights_step_through_fp32_masters(seed, lr, clip):
    g = torch.Generator().manual_seed(seed)
    shapes = [(1,), (3, 5), (7,), (2, 1, 3)]  # awkward sizes, a length-1 parameter
    params = [torch.nn.Parameter((torch.randn(s, generator=g) * 2).to(torch.bfloat16)) for s in shapes]
    w0 = [p.detach().float().clone() for p in params]
    cfg = OptimConfig(lr=lr, max_grad_norm=clip, weight_decay=0.1 if seed == 1 else 0.0, betas=[0.9, 0.999])
    total = 3
    opt = MasterOptimizer(params, cfg, total_updates=total)
    assert opt.use_master and all(m.dtype == torch.float32 for m in opt.masters)
    grads = []
    for _ in range(3):
        gs = [(torch.randn(s, generator=g) * 10.0 ** float(torch.randint(-3, 3, (), generator=g))).to(
            torch.bfloat16) for s in shapes]
        for p, x in zip(params, gs):
            p.grad = x.clone()
        grads.append(gs)
        opt.step(opt.grad_norm())
        assert all(p.grad is None for p in params)  # zeroed after the step
    ref = adamw_reference(w0, grads, lr=lr, betas=(0.9, 0.999), eps=cfg.eps, weight_decay=cfg.weight_decay,
                          max_grad_norm=clip, total=total)
    for p, m, r, start in zip(params, opt.masters, ref, w0):
        # the masters follow float64 AdamW (fp32 rounding of the weights themselves: ~1e-7 relative)
        torch.testing.assert_close(m.detach().double(), r, rtol=0, atol=4e-7 * float(r.abs().max()) + lr * 1e-3)
        assert torch.equal(p.detach(), m.detach().to(torch.bfloat16))  # the model's weights: masters rounded
    if lr == 1e-6:  # updates far below bf16's spacing: only the masters moved
        moved = [not torch.equal(m.detach(), s) for m, s in zip(opt.masters, w0)]
        assert all(moved)
        assert all(torch.equal(p.detach().float(), s) for p, s in zip(params, w0))


def test_fp32_model_steps_its_own_parameters():
    p = torch.nn.Parameter(torch.randn(4, 3))
    opt = MasterOptimizer([p], OptimConfig(lr=1e-2), total_updates=2)
    assert not opt.use_master and opt.masters[0] is p


def _masters(tr):
    return [m.detach().clone() for m in tr.optim.masters]


def test_trainer_in_bf16_uses_masters_and_resumes_them_exactly(tmp_path):
    """A bf16 Trainer on CPU (the GPU's compute dtype): the weights are bf16, the optimizer holds fp32
    masters, every step leaves the weights equal to the rounded masters, and a checkpoint restores the
    masters bit for bit (a resume from the bf16 weights alone would lose the sub-bf16 updates)."""
    small = dict(dtype="bfloat16", loss=dict(beta=0.0), optim=dict(lr=1e-5),
                 rollout=dict(num_generations=2, cot=dict(max_new_tokens=3)))
    straight = make_trainer(0, tmp_path / "a", **small)
    assert straight.policy.dtype == torch.bfloat16 and straight.optim.use_master
    trainable = [p for p in straight.policy.parameters() if p.requires_grad]
    start = [p.detach().float().clone() for p in trainable]
    for _ in range(2):
        straight.step()
    for p, m in zip(straight.optim.params, straight.optim.masters):
        assert m.dtype == torch.float32 and torch.equal(p.detach(), m.detach().to(torch.bfloat16))
    moved = sum(int((m.detach() != s).sum()) for m, s in zip(straight.optim.masters, start))
    assert moved > 0.5 * sum(s.numel() for s in start)  # most masters moved at lr 1e-5 ...
    stuck = sum(int((p.detach().float() == s).sum()) for p, s in zip(trainable, start))
    assert stuck > 0.5 * sum(s.numel() for s in start)  # ... while most bf16 weights could not

    first = make_trainer(0, tmp_path / "b", **small)
    first.step()
    ckpt = first.save_checkpoint()
    resumed = make_trainer(0, tmp_path / "b", output_dir=str(tmp_path / "c"), **small)  # the same data file
    resumed.load_checkpoint(ckpt)
    assert all(torch.equal(a, b) for a, b in zip(_masters(resumed), _masters(first)))
    resumed.step()
    assert all(torch.equal(a, b) for a, b in zip(_masters(resumed), _masters(straight)))
    assert all(torch.equal(a.detach(), b.detach()) for a, b in zip(resumed.optim.params, straight.optim.params))
