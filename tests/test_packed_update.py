"""The packed training forward (trainer/logprobs.py) and token-budget micro-batches (trainer/batch.py).

Packed: the rows of a forward laid end to end with shared prefixes stored once; every row's hidden
states and every parameter's gradient must equal those of separate, unpadded forwards of each row
through transformers' own model (an untouched copy). Token budget (``optim.micro_batch_tokens``):
the update's loss and gradients must equal the unsplit update's (float64 model; the log-probs are
float32 by token_logprobs' contract, hence fp32-rounding tolerances).
"""

import copy
import random

import pytest
import torch
from helpers import make_trainer, random_policy

from fastbicot.trainer import TrainerConfig, pack
from fastbicot.trainer.batch import Row, _PackedCount, packed_size, row_key
from fastbicot.trainer.config import ConfigError
from fastbicot.trainer.logprobs import PackedRows, embed_packed, packed_hidden

pytestmark = pytest.mark.usefixtures("one_thread")


def kv_heads_policy(kv_heads, seed):
    """random_policy with ``kv_heads`` key/value heads (grouped-query attention when < 5)."""
    base = random_policy(seed=seed)
    cfg = copy.deepcopy(base.hf_model.config)
    cfg.text_config.num_key_value_heads = kv_heads
    from transformers import JanusForConditionalGeneration

    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        torch.manual_seed(seed)
        model = JanusForConditionalGeneration(cfg).eval()
    finally:
        torch.set_default_dtype(old)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3.0)  # as random_policy: attention far from uniform
    return type(base)(model, base.tokenizer)


def random_rows(rng):
    """Rows with shared prefixes of several depths, image tokens, a row that is a prefix of another,
    a duplicate, a text/image id collision and rows that share nothing."""
    def text(n):
        return [rng.randrange(256) for _ in range(n)]

    sys_prompt, group = text(rng.randrange(2, 6)), text(rng.randrange(3, 9))
    rows = []
    for _ in range(rng.randrange(3, 6)):  # a prompt group: system + group prefix, then its own tokens
        own = text(rng.randrange(1, 5))
        img = [rng.randrange(29) for _ in range(rng.randrange(0, 6))]
        ids = sys_prompt + group + own
        rows.append(Row(ids + img, len(ids), "cot", []))
    ids = sys_prompt + text(4)
    rows.append(Row(ids + [3, 4], len(ids), "image", []))
    rows.append(Row(ids + [3], len(ids), "image", []))  # a prefix of the row before
    rows.append(Row(list(rows[0].ids), rows[0].n_text, "cot", []))  # a duplicate
    rows.append(Row(ids + [3], len(ids) + 1, "cot", []))  # text id 3 where an image row has image id 3
    rows.append(Row([rng.randrange(29) for _ in range(rng.randrange(1, 4))], 0, "image", []))  # no text
    rows.append(Row(text(1), 1, "cot", []))
    rng.shuffle(rows)
    return rows


def row_embeddings(policy, row):
    ids = torch.tensor(row.ids)
    image = torch.arange(len(row.ids)) >= row.n_text
    e = policy.embed_text(torch.where(image, policy.pad_token_id, ids))
    if bool(image.any()):
        e = e.clone()
        e[image] = policy.embed_image(ids[image])
    return e


@pytest.mark.parametrize("kv_heads", [5, 1])
@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("max_waste", [0.25, float("inf")])
def test_packed_rows_equal_separate_forwards(seed, kv_heads, checkpointing, max_waste):
    rng = random.Random(seed)
    policy = kv_heads_policy(kv_heads, seed % 1000)
    ref = copy.deepcopy(policy)  # never packed: transformers' own attention
    if checkpointing:
        policy.language_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    policy.train()
    ref.train()
    rows = random_rows(rng)
    packed = PackedRows(rows, max_waste)
    assert packed.num_tokens == packed_size([row_key(r) for r in rows]) < sum(len(r.ids) for r in rows)
    hidden = packed_hidden(policy, embed_packed(policy, packed), packed)
    weights = [torch.randn(len(r.ids), hidden.shape[1], dtype=torch.float64) for r in rows]
    loss = sum((hidden[torch.tensor(packed.index[k])] * w).sum() for k, w in enumerate(weights))
    loss.backward()
    want_loss = 0.0
    for k, r in enumerate(rows):
        h = ref.trunk(row_embeddings(ref, r)[None], position_ids=torch.arange(len(r.ids))[None])[0][0]
        torch.testing.assert_close(hidden[torch.tensor(packed.index[k])], h, rtol=1e-10, atol=1e-10)
        want_loss = want_loss + (h * weights[k]).sum()
    want_loss.backward()
    torch.testing.assert_close(loss, want_loss, rtol=1e-12, atol=1e-10)
    mine = dict(policy.hf_model.named_parameters())
    n_grads = 0
    for name, p in ref.hf_model.named_parameters():
        if p.grad is None:
            assert mine[name].grad is None or float(mine[name].grad.abs().max()) == 0, name
            continue
        # a shared position's gradient is summed over its rows before its layer's backward, not after;
        # transformers' RMSNorm computes in float32 even in a float64 model, so the two orders agree
        # to float32 rounding (the forward, per token, is bit-identical: checked above)
        scale = float(p.grad.abs().max())
        torch.testing.assert_close(mine[name].grad, p.grad, rtol=1e-5, atol=1e-6 * scale, msg=name)
        n_grads += 1
    assert n_grads > 10


def test_other_callers_still_get_the_base_attention(seed):
    """After the switch, a padded forward with a mask (any caller but the packed forward) is exactly
    transformers' sdpa forward."""
    policy = random_policy(seed=seed % 1000)
    untouched = copy.deepcopy(policy)
    rows = random_rows(random.Random(seed))
    packed = PackedRows(rows)
    with torch.no_grad():
        packed_hidden(policy, embed_packed(policy, packed), packed)
        assert policy.language_model.config._attn_implementation == "fastbicot+sdpa"
        x = torch.randn(3, 7, policy.hidden_size, dtype=torch.float64)
        mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1] * 7, [0, 0, 0, 0, 0, 1, 1]])
        got = policy.trunk(x, attention_mask=mask)[0]
        want = untouched.trunk(x, attention_mask=mask)[0]
    assert torch.equal(got, want)


def test_packed_size_incremental_count(seed):
    rng = random.Random(seed)
    rows = random_rows(rng) + random_rows(rng)
    keys = [row_key(r) for r in rows]
    count = _PackedCount()
    for k in range(len(keys)):
        assert count.size_with(keys[k:k + 2]) == packed_size(keys[: k + 2])
        count.add([keys[k]])
        assert count.total == packed_size(keys[: k + 1]) == PackedRows(rows[: k + 1]).num_tokens


def split_loss_and_grads(tr, batch, adv, budget):
    """The update's accumulated loss and gradients for ``optim.micro_batch_tokens = budget`` (the
    loop of Trainer.update without the optimizer step)."""
    L = tr.config.loss
    train = pack(batch, adv, L)
    micros = train.split(tr.config.optim.micro_batch_prompts, budget, whole_samples=L.importance_sampling == "sequence")
    tr.policy.train()
    total = 0.0
    for m in micros:
        loss, _, _ = tr._micro(train, m, ref=tr._ref_logprobs(train, m), old=None, entropy=False)
        loss.backward()
        total += float(loss.detach())
    tr.policy.eval()
    grads = {n: p.grad.clone() for n, p in tr.policy.hf_model.named_parameters() if p.grad is not None}
    tr.optim.zero_grad()
    return total, grads, micros, train


@pytest.mark.parametrize("budget", [1, 40, 150])
@pytest.mark.parametrize("options", [
    {},
    {"loss": {"cfg_logprobs": "cfg", "aggregation": "seq_mean"}, "rollout": {"guidance_scale": 3.0}},
    {"loss": {"importance_sampling": "sequence", "aggregation": "dr_grpo"}},
], ids=["default", "cfg-seq_mean", "gspo-dr_grpo"])
def test_micro_batch_tokens_give_the_unsplit_loss_and_gradients(seed, tmp_path, budget, options):
    tr = make_trainer(seed, tmp_path, optim={"micro_batch_prompts": 3}, **options)
    batch = tr.rollout()
    adv, _, _ = tr.advantages(batch, tr.score(batch))
    loss0, grads0, micros0, train = split_loss_and_grads(tr, batch, adv, 0)
    loss, grads, micros, _ = split_loss_and_grads(tr, batch, adv, budget)
    assert len(micros0) == 1 and len(micros) > 1
    # every token exactly once, each micro-batch within the budget unless it holds a single unit
    assert sorted(torch.cat([m.tokens for m in micros]).tolist()) == list(range(len(train.seq_ids)))
    gspo = tr.config.loss.importance_sampling == "sequence"
    for m in micros:
        keys = [row_key(r) for s in m.samples for r in s.rows + ([s.uncond] if s.uncond is not None else [])]
        units = len(m.samples) if gspo else sum(len(s.rows) for s in m.samples)
        assert packed_size(keys) <= budget or units == 1
        if gspo:  # GSPO's sequence ratio: never a part of a sample
            assert all(s.num_tokens == train.samples[p].num_tokens for p, s in zip(m.positions, m.samples))
    # the loss: float32 sums of O(1) terms that cancel (sum of A over a group is 0) -> an absolute bound
    torch.testing.assert_close(loss, loss0, rtol=1e-5, atol=1e-6)
    assert grads.keys() == grads0.keys() and grads
    scale = max(float(g.abs().max()) for g in grads0.values())
    for n, g in grads0.items():
        torch.testing.assert_close(grads[n], g, rtol=1e-5, atol=1e-6 * scale, msg=n)


def test_token_budget_update_equals_the_unsplit_update(seed, tmp_path):
    """The whole update (mu = 2 with clipping, beta > 0, AdamW steps): same metrics, same weights."""
    out, lr = {}, 1e-3
    for budget in (0, 60):
        tr = make_trainer(seed, tmp_path / str(budget), optim={"micro_batch_tokens": budget, "lr": lr},
                          loss={"num_iterations": 2})
        before = [p.detach().clone() for p in tr.policy.parameters()]
        batch = tr.rollout()
        adv, _, _ = tr.advantages(batch, tr.score(batch))
        out[budget] = (tr.update(batch, adv), before, [p.detach().clone() for p in tr.policy.parameters()])
    (m0, init, w0), (m1, _, w1) = out[0], out[60]
    for k in ("loss", "kl", "grad_norm", "clip_fraction", "ratio_mean"):
        torch.testing.assert_close(m1[k], m0[k], rtol=1e-5, atol=1e-6, msg=k)
    assert max(float((a - b).abs().max()) for a, b in zip(w0, init)) > lr  # two AdamW steps moved the weights
    # vs lr: AdamW's step m / (sqrt(v) + eps) turns the fp32-level noise of a near-zero gradient
    # element into up to ~1e-4 of lr; a wrong split moves weights by O(lr)
    for a, b in zip(w0, w1):
        torch.testing.assert_close(b, a, rtol=0, atol=2e-3 * lr)


@pytest.mark.parametrize("value,message", [
    (-1, "optim.micro_batch_tokens: must be >= 0"),
    (2.5, "optim.micro_batch_tokens"),
    ("64", "optim.micro_batch_tokens"),
])
def test_micro_batch_tokens_is_validated(value, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        TrainerConfig.from_dict({"optim": {"micro_batch_tokens": value}})
    assert TrainerConfig.from_dict({"optim": {"micro_batch_tokens": 4096}}).optim.micro_batch_tokens == 4096


def test_memory_plan_follows_the_token_budget():
    """fastbicot plan (Janus-Pro-7B shapes): the update's tokens per forward are capped by
    optim.micro_batch_tokens, its activation items shrink with them, the gradient's size does not."""
    from fastbicot.trainer.memory import model_shapes, plan_memory

    cfg = TrainerConfig.from_dict({"model": {"preset": "janus-pro-7b"}, "optim": {"micro_batch_prompts": 4}})
    s = model_shapes(cfg)
    whole = plan_memory(cfg, gpus=8, shapes=s, rewards=[], advise=False)
    budget = plan_memory(cfg.replace(optim=cfg.optim.replace(micro_batch_tokens=4096)), gpus=8, shapes=s, rewards=[],
                         advise=False)
    assert whole.assumptions["update_tokens"] > 4 * 4096 and budget.assumptions["update_tokens"] == 4096
    ratio = 4096 / whole.assumptions["update_tokens"]
    for key in ("act.saved", "act.recompute", "act.work"):
        assert budget.bytes(key) == pytest.approx(ratio * whole.bytes(key), rel=0.05), key
    assert budget.bytes("grads") == whole.bytes("grads")
    assert budget.peaks["update"][0] < whole.peaks["update"][0]


@pytest.mark.parametrize("options", [
    {},
    {"loss": {"cfg_logprobs": "cfg", "num_iterations": 2}, "rollout": {"guidance_scale": 3.0}},
    {"optim": {"mini_batches": 3, "micro_batch_prompts": 1}},
], ids=["default", "cfg-mu2", "mini-batches"])
def test_forward_plan_is_built_once_per_micro_batch(seed, tmp_path, monkeypatch, options):
    """The reference's forward, the policy's forward(s) and the later mini-batches' old log-probs over
    one micro-batch share its packed layout (MicroBatch.reuse): one ForwardPlan per micro-batch, and
    the update equals one that builds every forward's plan afresh."""
    import fastbicot.trainer.logprobs as lp_mod
    from fastbicot.trainer.trainer import mini_batches

    built = []
    real = lp_mod.ForwardPlan

    class Counting(real):
        def __init__(self, *a, **k):
            built.append(1)
            super().__init__(*a, **k)

    out = {}
    for reuse in (True, False):
        tr = make_trainer(seed, tmp_path / str(reuse), loss={"beta": 0.05, **options.get("loss", {})},
                          **{k: v for k, v in options.items() if k != "loss"})
        batch = tr.rollout()
        adv, _, _ = tr.advantages(batch, tr.score(batch))
        if not reuse:  # every forward gets a fresh dict: nothing carried over
            monkeypatch.setattr(lp_mod, "ForwardPlan", real)
            def fresh(*a, _orig=lp_mod.sample_logprobs, **k):
                k["reuse"] = None
                return _orig(*a, **k)

            monkeypatch.setattr(lp_mod, "sample_logprobs", fresh)
        else:
            monkeypatch.setattr(lp_mod, "ForwardPlan", Counting)
        parts = tr.config.optim.mini_batches
        n_micro = sum(len(tr._micros(pack(p, a, tr.config.loss))[0])
                      for p, a, _ in mini_batches(batch, adv, None, parts))
        metrics = tr.update(batch, adv)
        out[reuse] = (metrics, [p.detach().clone() for p in tr.policy.parameters()])
        if reuse:
            assert len(built) == n_micro, (len(built), n_micro)
        monkeypatch.undo()
    for k in ("loss", "kl", "grad_norm"):
        assert out[True][0][k] == out[False][0][k], k
    for a, b in zip(out[True][1], out[False][1]):
        assert torch.equal(a, b)
