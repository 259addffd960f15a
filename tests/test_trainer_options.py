"""Trainer options against independent float64 formulas: aggregations and segment weights, GSPO,
TRL's bias-corrected KL, mu > 1 with old log-probs from the training forward, mini-batches (several
optimizer steps per rollout), CFG-scaled log-probs, the DAPO zero-variance filter, advantages."""

import copy

import pytest
import torch
from helpers import make_trainer, seed_logps

from fastbicot.trainer import aggregation_weights, group_advantages, pack
from fastbicot.trainer import trainer as trainer_mod
from fastbicot.trainer.batch import IMAGE, TEXT
from fastbicot.trainer.logprobs import sample_logprobs
from fastbicot.trainer.step import grpo_objective

pytestmark = pytest.mark.usefixtures("one_thread")


def random_tokens(gen, n_groups=3, G=4):
    """Per-token seq ids, groups and segments of ragged samples (1-token samples included)."""
    seq, grp, seg = [], [], []
    s = 0
    for g in range(n_groups):
        for _ in range(G):
            nt = int(torch.randint(1, 6, (), generator=gen))
            ni = int(torch.randint(1, 9, (), generator=gen))
            seq += [s] * (nt + ni)
            grp += [g] * (nt + ni)
            seg += [TEXT] * nt + [IMAGE] * ni
            s += 1
    return torch.tensor(seq), torch.tensor(grp), torch.tensor(seg)


@pytest.mark.parametrize("aggregation", ["group_token_mean", "token_mean", "seq_mean", "dr_grpo"])
@pytest.mark.parametrize("tw,iw", [(1.0, 1.0), (2.0, 0.5), (0.0, 1.0)])
def test_aggregation_weights_equal_their_formulas(seed, aggregation, tw, iw):
    gen = torch.Generator().manual_seed(seed)
    seq, grp, seg = random_tokens(gen)
    loss_tok = torch.randn(seq.numel(), generator=gen, dtype=torch.float64)
    w = aggregation_weights(seq, seg, grp, aggregation=aggregation, text_weight=tw, image_weight=iw)
    s = torch.where(seg == TEXT, tw, iw).double()
    if aggregation == "group_token_mean":  # the seed: token mean per prompt group, mean over groups
        want = torch.stack([(s * loss_tok)[grp == g].sum() / s[grp == g].sum() for g in grp.unique()]).mean()
    elif aggregation == "token_mean":
        want = (s * loss_tok).sum() / s.sum()
    elif aggregation == "seq_mean":
        terms = [(s * loss_tok)[seq == q].sum() / s[seq == q].sum() for q in seq.unique() if s[seq == q].sum() > 0]
        want = torch.stack(terms).mean()
    else:
        longest = max(int((seq == q).sum()) for q in seq.unique())
        want = (s * loss_tok).sum() / (seq.unique().numel() * longest)
    torch.testing.assert_close((w * loss_tok).sum(), want, rtol=1e-12, atol=1e-12)


def test_gspo_and_bias_corrected_kl_equal_their_formulas(seed):
    gen = torch.Generator().manual_seed(seed)
    seq, grp, seg = random_tokens(gen)
    n, S = seq.numel(), int(seq.max()) + 1
    logp = (-torch.rand(n, generator=gen, dtype=torch.float64) * 3).requires_grad_(True)
    old = logp.detach() + 0.3 * torch.randn(n, generator=gen, dtype=torch.float64)
    ref = logp.detach() + 0.5 * torch.randn(n, generator=gen, dtype=torch.float64)
    adv = torch.randn(S, generator=gen, dtype=torch.float64)
    w = aggregation_weights(seq, seg, grp, aggregation="seq_mean")
    beta, lo, hi = 0.05, 0.2, 0.28

    loss, _ = grpo_objective(logp, adv, seq, w, old=old, ref=ref, beta=beta, eps_low=lo, eps_high=hi,
                             importance_sampling="sequence")
    (g_ours,) = torch.autograd.grad(loss, logp)
    # GSPO (arXiv 2507.18071, token form): s_i = exp(mean_t(logp - old)); s_it = sg[s_i] pi_t / sg[pi_t]
    x = logp.clone().detach().requires_grad_(True)
    terms = []
    for q in range(S):
        m = seq == q
        s_i = torch.exp((x[m].detach() - old[m]).mean())
        s_it = s_i * torch.exp(x[m] - x[m].detach())
        a = adv[q]
        ell = -torch.minimum(s_it * a, s_it.clamp(1 - lo, 1 + hi) * a)
        d = ref[m] - x[m]
        ell = ell + beta * (torch.exp(d) - d - 1)
        terms.append((w[m] * ell).sum())
    want = torch.stack(terms).sum()
    (g_want,) = torch.autograd.grad(want, x)
    torch.testing.assert_close(loss.double(), want, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(g_ours.double(), g_want, rtol=1e-6, atol=1e-9)

    # TRL's use_bias_correction_kl: the k3 term times the importance ratio r = exp(logp - old)
    loss, _ = grpo_objective(logp, adv, seq, w, old=old, ref=ref, beta=beta, eps_low=lo, eps_high=hi,
                             kl_bias_correction=True)
    (g_ours,) = torch.autograd.grad(loss, logp)
    r = torch.exp(x - old)
    a = adv[seq]
    d = ref - x
    ell = -torch.minimum(r * a, r.clamp(1 - lo, 1 + hi) * a) + beta * (torch.exp(d) - d - 1) * r
    want = (w * ell).sum()
    (g_want,) = torch.autograd.grad(want, x)
    torch.testing.assert_close(loss.double(), want, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(g_ours.double(), g_want, rtol=1e-6, atol=1e-9)


def test_advantages_and_dapo_filter(seed):
    gen = torch.Generator().manual_seed(seed)
    r = torch.randn(12, generator=gen)
    r[4:8] = 0.25  # a group whose rewards are all equal
    ids = torch.arange(12) // 4
    adv, keep, stats = group_advantages(r, ids, filter_zero_std=True)
    for g in range(3):
        x = r[ids == g].double()
        torch.testing.assert_close(adv[ids == g].double(), (x - x.mean()) / (x.std() + 1e-4), rtol=1e-5, atol=1e-6)
    assert keep.tolist() == [True] * 4 + [False] * 4 + [True] * 4 and stats["groups/filtered"] == 1
    adv_b, _, _ = group_advantages(r, ids, scale="batch")
    torch.testing.assert_close(adv_b.double(), (r.double() - torch.stack([r[ids == g].double().mean()
                               for g in range(3)])[ids]) / (r.double().std() + 1e-4), rtol=1e-5, atol=1e-6)
    adv_n, _, _ = group_advantages(r, ids, scale="none")
    assert float(adv_n[ids == 1].abs().max()) == 0
    with pytest.raises(ValueError, match="not finite"):
        group_advantages(torch.tensor([1.0, float("nan")]), torch.tensor([0, 0]))
    # a group of one: nothing to compare with -> 0 (the seed's torch.std of one value is NaN)
    adv1, _, _ = group_advantages(torch.tensor([3.0, 1.0, 2.0]), torch.tensor([0, 1, 1]))
    assert adv1[0] == 0


def test_dapo_filtered_groups_leave_the_loss(seed, tmp_path):
    tr = make_trainer(seed, tmp_path, loss={"beta": 0.0}, advantage={"filter_zero_std": True})
    batch = tr.rollout()
    keep = torch.tensor([s.prompt_index != 1 for s in batch.samples])
    train = pack(batch, torch.randn(len(batch)), tr.config.loss, keep)
    assert {s.group for s in train.samples} == {0, 2}
    # every filtered: the update is skipped, the weights do not move
    before = [p.detach().clone() for p in tr.policy.parameters()]
    out = tr.update(batch, torch.zeros(len(batch)), torch.zeros(len(batch), dtype=torch.bool))
    assert out["update/skipped"] == 1
    assert all(torch.equal(a, b) for a, b in zip(before, tr.policy.parameters()))


def test_mu_gt_1_old_logprobs_come_from_the_training_forward(seed, tmp_path, monkeypatch):
    tr = make_trainer(seed, tmp_path, loss={"num_iterations": 2, "beta": 0.0}, optim={"lr": 1e-2},
                      data={"prompts_per_step": 2}, rollout={"num_generations": 3})
    calls = []
    real = trainer_mod.grpo_objective

    def spy(logp, *a, old=None, **kw):
        calls.append((logp.detach().clone(), None if old is None else old.clone()))
        return real(logp, *a, old=old, **kw)

    monkeypatch.setattr(trainer_mod, "grpo_objective", spy)
    batch = tr.rollout()
    scores = tr.score(batch)
    adv, _, _ = tr.advantages(batch, scores)
    out = tr.update(batch, adv)
    n_micro = 2  # micro_batch_prompts = 1
    assert len(calls) == 2 * n_micro and tr.optim.scheduler.last_epoch == 2
    for m in range(n_micro):
        first, second = calls[m], calls[n_micro + m]
        assert first[1] is None  # r = exp(logp - logp.detach()) == 1 at the first pass
        torch.testing.assert_close(second[1], first[0], rtol=0, atol=0)  # old = the first pass's log-probs
        assert not torch.equal(second[0], first[0])  # the weights moved between the passes
    rollout_lp = torch.cat([torch.cat([s.cot_logprobs, s.image_logprobs]) for s in batch.samples[:3]])
    assert not torch.allclose(calls[0][0].float(), rollout_lp, atol=1e-3)  # top-k / CFG: not the same
    assert 0 <= out["clip_fraction"] <= 1 and out["loss"] == out["loss"]


def test_mini_batches_are_sequential_clipped_updates(seed, tmp_path, monkeypatch):
    """optim.mini_batches=2: groups 0, 2 then 1, 3, one optimizer step each; each mini-batch's gradient is
    the seed-style objective over its own groups (the mean of each group's token mean), the second with
    clipped ratios against the policy that generated the rollout and the reference log-probs taken before
    the first step. Checked against materialised logits in float64, at the weights each step saw."""
    eps = 0.05
    tr = make_trainer(seed, tmp_path, data={"prompts_per_step": 4}, optim={"mini_batches": 2, "lr": 3e-2},
                      loss={"beta": 0.01, "eps_low": eps, "eps_high": eps})
    batch = tr.rollout()
    scores = tr.score(batch)
    adv, _, _ = tr.advantages(batch, scores)
    names = [n for n, p in tr.policy.hf_model.named_parameters() if p.requires_grad]
    before = copy.deepcopy(tr.policy)  # the policy that generated the rollout
    seen = []  # (gradients, weights) at each optimizer step
    real = tr.optim.step

    def spy(gn):
        params = dict(tr.policy.hf_model.named_parameters())
        seen.append(({n: params[n].grad.detach().clone() for n in names},
                     {n: params[n].detach().clone() for n in names}))
        return real(gn)

    monkeypatch.setattr(tr.optim, "step", spy)
    out = tr.update(batch, adv)
    assert len(seen) == 2 and tr.optim.scheduler.last_epoch == 2
    G, hand = batch.num_generations, copy.deepcopy(before)
    hp = dict(hand.hf_model.named_parameters())
    clipped = 0
    for j, (grads, weights) in enumerate(seen):
        with torch.no_grad():
            for n in names:
                hp[n].copy_(weights[n])
        for p in hp.values():
            p.grad = None
        per_group = []
        for g in (g for g in range(4) if g % 2 == j):
            toks = []
            for i in range(g * G, (g + 1) * G):
                s = batch.samples[i]
                lp = seed_logps(hand, hand, s)
                with torch.no_grad():
                    old = seed_logps(before, before, s)
                    ref = seed_logps(tr.ref_policy, before, s)
                r = torch.exp(lp - old)
                a = adv[i].double()
                clipped += int(((r - 1).abs() > eps).sum())
                kl = torch.exp(ref - lp) - (ref - lp) - 1
                toks.append(-(torch.minimum(r * a, r.clamp(1 - eps, 1 + eps) * a) - 0.01 * kl))
            tok = torch.cat(toks)
            per_group.append(tok.sum() / tok.numel())
        torch.stack(per_group).mean().backward()
        scale = max(float(hp[n].grad.abs().max()) for n in names if hp[n].grad is not None)
        for n in names:
            want = hp[n].grad if hp[n].grad is not None else torch.zeros_like(grads[n])
            torch.testing.assert_close(grads[n].double(), want, rtol=1e-4, atol=1e-6 * scale, msg=f"{j}: {n}")
    assert any(not torch.equal(seen[0][1][n], seen[1][1][n]) for n in names)  # the first step moved the weights
    assert clipped > 0 and out["clip_fraction"] > 0  # the second mini-batch is off-policy and clipped
    with pytest.raises(Exception, match="optim.mini_batches"):
        make_trainer(seed, tmp_path / "bad", data={"prompts_per_step": 3}, optim={"mini_batches": 2})


def test_cfg_scaled_logprobs_divide_the_guided_logits_by_w(seed, tmp_path):
    w = 2.5
    tr = make_trainer(seed, tmp_path, rollout={"guidance_scale": w}, loss={"cfg_logprobs": "cfg_scaled"},
                      data={"prompts_per_step": 1}, )
    batch = tr.rollout()
    with torch.no_grad():
        train = pack(batch, torch.zeros(len(batch)), tr.config.loss)
        lp = sample_logprobs(tr.policy, train.samples, loss=tr.config.loss, guidance_scale=w).logprobs
        p = tr.policy
        for k, s in enumerate(batch.samples):
            n, b = len(s.image_tokens), len(s.image_context_ids)

            def hid(ctx, s=s, b=b, n=n):
                e = torch.cat([p.embed_text(torch.tensor([ctx])), p.embed_image(s.image_tokens[None, :-1])], 1)
                return p.trunk(e)[0][0, b - 1 : b - 1 + n]

            c, u = p.image_logits(hid(s.image_context_ids)), p.image_logits(hid(s.uncond_context_ids))
            want = torch.log_softmax((u + w * (c - u)) / w, -1).gather(-1, s.image_tokens[:, None])[:, 0]
            got = lp[train.offsets[k] + len(s.cot_ids) : train.offsets[k + 1]]
            torch.testing.assert_close(got.double(), want, rtol=0, atol=2e-6)
