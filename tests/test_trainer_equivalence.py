"""The Trainer's loss and gradients equal a straightforward implementation of the seed's objective.

The reference below is written from CaraJ7/T2I-R1 src/t2i-r1/src/open_r1/trainer/grpo_trainer.py:
  _get_per_token_logps (:378-414)  materialised logits -> log_softmax -> gather, lm_head for CoT
                                   tokens, gen_head for image tokens, conditional rows only
  the ref model (:511-529, :677-683) fed the policy's own input embeddings
  advantages (:739-748)            (r - mean_g) / (std_g + 1e-4), torch's unbiased std
  loss (:763-772)                  -(exp(lp - lp.detach()) * A - beta * k3) summed over [CoT | image]
                                   tokens of the micro-batch / their count; the micro-batch is one
                                   prompt x G samples, averaged over ranks and accumulation steps
so the effective loss is the mean over prompt groups of each group's token mean.
"""

import pytest
import torch
from helpers import make_trainer, seed_logps

pytestmark = pytest.mark.usefixtures("one_thread")


def seed_loss(trainer, batch, rewards, beta):
    r = rewards.double()
    G = batch.num_generations
    grouped = r.view(-1, G)
    adv = ((grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-4)).flatten()
    per_group = []
    for g in range(len(r) // G):
        losses = []
        for s_i in range(g * G, (g + 1) * G):
            s = batch.samples[s_i]
            lp = seed_logps(trainer.policy, trainer.policy, s)
            with torch.no_grad():
                ref = seed_logps(trainer.ref_policy, trainer.policy, s) if beta > 0 else torch.zeros_like(lp)
            kl = torch.exp(ref - lp) - (ref - lp) - 1
            losses.append(-(torch.exp(lp - lp.detach()) * adv[s_i] - beta * kl))
        tok = torch.cat(losses)
        per_group.append(tok.sum() / tok.numel())
    return torch.stack(per_group).mean(), adv


@pytest.mark.parametrize("beta", [0.01, 0.0])
def test_loss_and_gradients_equal_the_seed_objective(seed, tmp_path, beta):
    tr = make_trainer(seed, tmp_path, loss=dict(beta=beta))
    assert (tr.ref_policy is None) == (beta == 0)  # beta = 0 loads no reference model
    batch = tr.rollout()
    scores = tr.score(batch)
    adv, _, _ = tr.advantages(batch, scores)
    params = dict(tr.policy.hf_model.named_parameters())
    trainable = {n for n, p in params.items() if p.requires_grad}
    assert trainable and all(n.startswith(("model.language_model.", "lm_head.")) for n in trainable)
    assert any(n.startswith("model.language_model.embed_tokens") for n in trainable)
    assert not any(n.startswith(("model.generation_", "model.vqmodel", "model.vision_model", "model.aligner"))
                   for n in trainable)

    tr.policy.train()
    loss, stats = tr.compute_loss(batch, adv)
    loss.backward()
    ours = {n: params[n].grad.clone() for n in trainable}
    for p in params.values():
        p.grad = None

    ref_loss, ref_adv = seed_loss(tr, batch, scores.total, beta)
    torch.testing.assert_close(adv.double(), ref_adv, rtol=1e-5, atol=1e-6)
    ref_loss.backward()
    # token_logprobs returns float32 by contract (DESIGN §4): agreement to fp32 rounding, not 1e-12
    torch.testing.assert_close(loss.double(), ref_loss.detach(), rtol=2e-5, atol=1e-6)  # terms are O(1)
    scale = max(float(params[n].grad.abs().max()) for n in trainable if params[n].grad is not None)
    for n in trainable:
        g = params[n].grad
        if g is None:
            assert ours[n].abs().max() == 0, n
            continue
        torch.testing.assert_close(ours[n].double(), g, rtol=1e-4, atol=1e-6 * scale, msg=n)
    assert any(float(ours[n].abs().max()) > 0 for n in trainable)
    if beta > 0:
        assert float(stats["kl"]) > 1e-6
    else:
        assert float(stats["kl"]) == 0


@pytest.mark.parametrize("image_mode", ["reprompt", "continue"])
def test_training_forward_reproduces_rollout_logprobs(seed, tmp_path, image_mode):
    """Guidance 1 and no filtering: the rollout's sampling distribution is the training one."""
    tr = make_trainer(seed, tmp_path, rollout=dict(guidance_scale=1.0, image_mode=image_mode, cot=dict(top_k=0)))
    batch = tr.rollout()
    with torch.no_grad():
        adv = torch.zeros(len(batch))
        from fastbicot.trainer import pack
        from fastbicot.trainer.logprobs import sample_logprobs

        train = pack(batch, adv, tr.config.loss)
        lp = sample_logprobs(tr.policy, train.samples, loss=tr.config.loss).logprobs
    want = torch.cat([torch.cat([s.cot_logprobs, s.image_logprobs]) for s in batch.samples])
    torch.testing.assert_close(lp.float(), want, rtol=0, atol=2e-5)


def test_cfg_logprobs_reproduce_the_guided_rollout(seed, tmp_path):
    """loss.cfg_logprobs=cfg combines the image head's inputs: equal to the rollout's guided log-probs."""
    tr = make_trainer(seed, tmp_path, rollout=dict(guidance_scale=3.0, cot=dict(top_k=0)),
                      loss=dict(cfg_logprobs="cfg"))
    batch = tr.rollout()
    from fastbicot.trainer import pack
    from fastbicot.trainer.logprobs import sample_logprobs

    with torch.no_grad():
        train = pack(batch, torch.zeros(len(batch)), tr.config.loss)
        lp = sample_logprobs(tr.policy, train.samples, loss=tr.config.loss, guidance_scale=3.0).logprobs
    want = torch.cat([torch.cat([s.cot_logprobs, s.image_logprobs]) for s in batch.samples])
    torch.testing.assert_close(lp.float(), want, rtol=0, atol=2e-5)
