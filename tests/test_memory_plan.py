"""The memory plan (fastbicot/trainer/memory.py) against memory measured on CPU.

How it is measured: ``MemoryTracker``, a TorchDispatchMode that counts every tensor storage an
aten op creates (``nbytes``) and drops it when a C++ weak reference (``StorageWeakRef``) says the
storage was freed; its ``peak`` is the high-water mark of live bytes, op by op. torch keeps no
allocator statistics on CPU, and the profiler's memory events attribute allocations to ops without
a timeline of frees, so this is the CPU-side equivalent of ``torch.cuda.max_memory_allocated``
(minus an op's internal scratch). The plan runs with ``device="cpu"`` (the CPU code paths: fp32,
flattened KV, the chunked log-prob kernel, per-tensor AdamW) and the rows' real lengths.

Factors: the KV caches, weights, gradients and AdamW states are exact formulas (equal bytes); the
activations saved for backward within 0.8-1.25x; every peak (rollout, backward, the whole update,
VQ decode) within 0.67-1.5x -- tight enough that dropping or doubling any big term fails.
"""

import os

import pytest
import torch

from fastbicot.models import janus as janus_mod
from fastbicot.models.janus import PRESETS, JanusPolicy, Preset
from fastbicot.rewards import FunctionReward
from fastbicot.trainer import Trainer, TrainerConfig
from fastbicot.trainer.batch import pack
from fastbicot.trainer.memory import (
    GiB,
    Lengths,
    MemoryTracker,
    cli,
    model_shapes,
    plan_memory,
    plan_seed_memory,
    uncond_blocks,
)

SHORT = dict(template="{system} {instruction}", system="Plan.", instruction="Draw {prompt}:")
PROMPTS = ["a red cube", "two green dogs left of a cat"]
# A custom size a few times the tiny preset: 3 layers, H=128, 12x12 = 144 image tokens.
SMALL = Preset(
    hidden_size=128, num_layers=3, num_heads=4, intermediate_size=352, vocab_size=264,
    special_ids=PRESETS["tiny"].special_ids, image_size=48, vq_base_channels=32, vq_channel_multiplier=(1, 1, 2),
    vq_latent_channels=32, vq_num_embeddings=128, vision_hidden=32, vision_layers=1, vision_heads=2,
    max_position_embeddings=2048,
)
EXACT = (0.999, 1.001)
SAVED = (0.8, 1.25)
PEAK = (0.67, 1.5)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def small_preset(monkeypatch):
    monkeypatch.setitem(janus_mod.PRESETS, "small", SMALL)


def make(seed, tmp_path, size="tiny", ckpt=True, beta=0.01, micro=2, lora=None, passes=0):
    cfg = TrainerConfig.from_dict(dict(
        output_dir=str(tmp_path / "run"), steps=2, seed=seed,
        model=dict(preset=size, dtype="float32", gradient_checkpointing=ckpt),
        data=dict(prompts_per_step=2), optim=dict(micro_batch_prompts=micro), loss=dict(beta=beta),
        rollout=dict(num_generations=4, cot=dict(max_new_tokens=12), prompts_per_pass=passes, **SHORT),
        log=dict(progress=False, entropy=False), **({"lora": lora} if lora else {}),
    ))
    policy = JanusPolicy.from_preset(size, seed=seed % 1000, dtype=torch.float32)
    reward = FunctionReward("red", lambda im, p, m, c: im[..., 0].double().mean((1, 2)))
    return cfg, Trainer(cfg, policy=policy, rewards=[reward])


def lengths(batch) -> Lengths:
    s = batch.samples
    groups = {}
    for x in s:
        groups.setdefault(x.prompt_index, []).append(list(x.image_context_ids))
    shared = min(len(os.path.commonprefix(g)) for g in groups.values())  # the image contexts' common head
    return Lengths(max(len(x.cot_context_ids) for x in s), max(len(x.cot_ids) for x in s),
                   max(len(x.image_context_ids) for x in s), min(len(x.image_context_ids) for x in s),
                   image_shared=shared)


def plan_for(cfg, trainer, batch, **kw):
    return plan_memory(cfg, gpus=1, device="cpu", lengths=lengths(batch), policy=trainer.policy, rewards=[], **kw)


def ratio(measured, planned, bounds, what):
    r = planned / measured
    print(f"{what}: planned/measured {r:.3f}")
    assert bounds[0] <= r <= bounds[1], f"{what}: planned {planned} / measured {measured} = {r:.3f} not in {bounds}"
    return r


def rollout_measured(trainer, seed):
    """Run a rollout under a MemoryTracker, watching every KV cache it allocates, each prefill_rows call
    (its own peak above what was live when it started) and what is still alive when the image cache is
    allocated and when the pixels are decoded."""
    import weakref

    from fastbicot.rollout import engine, kv_cache, runner

    m = MemoryTracker()
    caches, prefills, seen = [], [], {}
    real_init, real_prefill, real_decode = kv_cache.KVCache.__init__, runner.prefill_rows, engine.decode_images

    def init(self, *a, **k):
        seen.setdefault("alive_at_alloc", []).append([r() is not None for r in seen.get("refs", [])])
        real_init(self, *a, **k)
        caches.append(self.prefix_kv.nbytes + self.suffix_kv.nbytes)
        seen.setdefault("refs", []).append(weakref.ref(self))

    def prefill(*a, **k):
        with m.window() as w:
            out = real_prefill(*a, **k)
        prefills.append(w.peak)
        return out

    def decode(*a, **k):
        seen["alive_at_vq"] = [r() is not None for r in seen["refs"]]
        return real_decode(*a, **k)

    with pytest.MonkeyPatch.context() as mp:  # undone on return: a second call wraps the real functions
        mp.setattr(kv_cache.KVCache, "__init__", init)
        mp.setattr(runner, "prefill_rows", prefill)
        mp.setattr(engine, "decode_images", decode)
        with m:
            batch = trainer.engine.generate(PROMPTS, seed=seed)
    return batch, m.peak, caches, prefills, seen


@pytest.mark.parametrize("size", ["tiny", "small"])
@pytest.mark.parametrize("flatten", [True, False])
def test_rollout_kv_caches_and_peak(seed, tmp_path, size, flatten):
    """Both layouts: flattened (the CPU default) and grouped (prefixes kept in blocks, as on CUDA)."""
    cfg, tr = make(seed, tmp_path, size)
    tr.engine.flat = flatten
    batch, peak, caches, prefills, seen = rollout_measured(tr, seed)
    plan = plan_for(cfg, tr, batch, flatten=flatten)
    assert len(caches) == 2  # reprompt: the CoT cache, then the image cache
    ratio(caches[0], plan.bytes("kv.cot"), EXACT, f"CoT KV cache ({size}, flatten={flatten})")
    if flatten:
        ratio(caches[1], plan.bytes("kv.image"), EXACT, f"image KV cache ({size})")
    else:  # the plan's bound over any lengths in [shortest, longest]; the engine picks its blocks for the rows
        ratio(caches[1], plan.bytes("kv.image"), (1.0, 1.5), f"grouped image KV cache ({size})")
    # no moment holds both caches; the image cache is gone before the pixels are decoded
    assert seen["alive_at_alloc"] == [[], [False]]
    assert seen["alive_at_vq"] == [False, False]
    assert "CoT -> image cache switch" not in plan.moments["rollout"]
    # the image prefill: one layer of the batch and its K/V on top of the cache (no K/V staged per layer)
    ratio(prefills[-1], plan.bytes("prefill.image"), PEAK, f"image prefill ({size}, flatten={flatten})")
    # everything the rollout allocates: the plan's rollout peak less what existed before it
    before = sum(plan.bytes(k) for k in ("params.trainable", "params.frozen", "reference", "adam", "master"))
    ratio(peak, plan.peaks["rollout"][0] - before, PEAK, f"rollout peak ({size}, flatten={flatten})")


def test_rollout_in_passes(seed, tmp_path):
    """rollout.prompts_per_pass=1: each pass allocates caches for one prompt group, as planned, and the
    planned and the measured rollout peaks both drop below those of one pass."""
    cfg1, tr1 = make(seed, tmp_path / "one", "small")
    batch1, peak1, _, _, _ = rollout_measured(tr1, seed)
    cfg, tr = make(seed, tmp_path / "passes", "small", passes=1)
    batch, peak, caches, _, _ = rollout_measured(tr, seed)
    plan, plan1 = plan_for(cfg, tr, batch), plan_for(cfg1, tr1, batch1)
    assert len(caches) == 4  # per pass: the CoT cache, then the image cache
    ratio(max(caches[0::2]), plan.bytes("kv.cot"), EXACT, "CoT KV cache of a pass")
    ratio(max(caches[1::2]), plan.bytes("kv.image"), EXACT, "image KV cache of a pass")
    before = sum(plan.bytes(k) for k in ("params.trainable", "params.frozen", "reference", "adam", "master"))
    ratio(peak, plan.peaks["rollout"][0] - before, PEAK, "rollout peak in passes")
    assert plan.peaks["rollout"][0] < plan1.peaks["rollout"][0] and peak < peak1


# 12 narrow layers: one layer's K/V is small next to all layers' K/V, so staging every layer's K/V
# before the cache copy (what Trunk.prefill did) reads as 2-3x the planned prefill and fails.
DEEP = Preset(
    hidden_size=64, num_layers=12, num_heads=4, intermediate_size=96, vocab_size=264,
    special_ids=PRESETS["tiny"].special_ids, image_size=32, vq_base_channels=32, vq_channel_multiplier=(1, 1, 2),
    vq_latent_channels=32, vq_num_embeddings=64, vision_hidden=32, vision_layers=1, vision_heads=2,
    max_position_embeddings=2048,
)


@pytest.mark.parametrize("budget", [None, 40])
def test_prefill_holds_one_layer(seed, tmp_path, monkeypatch, budget):
    """The prefill's measured peak above the cache, on a deep narrow model: the plan's one layer of
    activations + its K/V (per batch of at most PREFILL_TOKENS positions; 40: a row or two per batch)."""
    from fastbicot.rollout import runner as gen_mod

    monkeypatch.setitem(janus_mod.PRESETS, "deep", DEEP)
    if budget is not None:
        monkeypatch.setattr(gen_mod, "PREFILL_TOKENS", budget)
    for flatten in (True, False):
        cfg, tr = make(seed, tmp_path / str(flatten), "deep")
        tr.engine.flat = flatten
        batch, _, _, prefills, _ = rollout_measured(tr, seed)
        plan = plan_for(cfg, tr, batch, flatten=flatten)
        ratio(prefills[0], plan.bytes("prefill.cot"), PEAK, f"CoT prefill (deep, flatten={flatten})")
        ratio(prefills[-1], plan.bytes("prefill.image"), PEAK, f"image prefill (deep, flatten={flatten})")


def test_uncond_blocks_bound_the_engine_layout(seed):
    """The plan's bound (uncond_blocks) is never below what layout_rows picks for BOS pad ... pad rows of any
    lengths within the span, conditional rows alongside."""
    from fastbicot.rollout.kv_cache import layout_rows

    gen = torch.Generator().manual_seed(seed)
    for _ in range(40):
        R = int(torch.randint(1, 12, (), generator=gen))
        lo = int(torch.randint(2, 30, (), generator=gen))
        hi = lo + int(torch.randint(0, 300, (), generator=gen))
        lens = torch.randint(lo, hi + 1, (R,), generator=gen).tolist()
        lens[0] = hi
        cond = [[1] + torch.randint(3, 9, (n - 2,), generator=gen).tolist() + [2] for n in lens]
        uncond = [[1] + [0] * (n - 2) + [2] for n in lens]
        lay = layout_rows(cond + uncond, list(range(R)) + [R] * R, split=True)
        K, S = uncond_blocks(2 * R, R, max(lens) - min(lens), hi - 1)
        assert lay.num_prefixes * (hi - 1) + 2 * R * lay.max_remainder <= (R + K) * (hi - 1) + 2 * R * S


@pytest.mark.parametrize("size,ckpt", [("tiny", True), ("tiny", False), ("small", True), ("small", False)])
def test_update_activations(seed, tmp_path, monkeypatch, size, ckpt):
    cfg, tr = make(seed, tmp_path, size, ckpt=ckpt)
    batch = tr.engine.generate(PROMPTS, seed=seed)
    plan = plan_for(cfg, tr, batch)
    scores = tr.score(batch)
    adv, _, _ = tr.advantages(batch, scores)
    train = pack(batch, adv, cfg.loss)
    idx = train.micro_batches(cfg.optim.micro_batch_prompts)[0]
    ref = tr._ref_logprobs(train, idx)
    tr.policy.train()
    with MemoryTracker() as m:
        loss, _, _ = tr._micro(train, idx, ref=ref, old=None, entropy=False)
        saved = m.current
        loss.backward()
    ratio(saved, plan.bytes("act.saved"), SAVED, f"saved activations ({size}, checkpointing={ckpt})")
    bwd = max(plan.bytes("act.recompute") + plan.bytes("act.work"), plan.bytes("logprob")) + plan.bytes("grads")
    # one packed forward per micro-batch (trainer/logprobs.py), in one process as under FSDP: the plan's model
    ratio(m.peak, plan.bytes("act.saved") + bwd, PEAK, f"forward+backward peak ({size}, checkpointing={ckpt})")
    if ckpt:  # the recomputed layer dominates the backward
        ratio(m.peak - saved, bwd, PEAK, f"backward peak above the saved activations ({size})")
    grads = sum(p.grad.nbytes for p in tr.policy.parameters() if p.grad is not None)
    ratio(grads, plan.bytes("grads"), EXACT, "gradients")


def test_checkpointing_saves_what_the_plan_says(seed, tmp_path):
    """The planned saving of gradient checkpointing is the measured one (within the saved factor)."""
    got = {}
    for ckpt in (True, False):
        cfg, tr = make(seed, tmp_path / str(ckpt), "tiny", ckpt=ckpt, beta=0)
        batch = tr.engine.generate(PROMPTS, seed=seed)
        plan = plan_for(cfg, tr, batch)
        adv, _, _ = tr.advantages(batch, tr.score(batch))
        train = pack(batch, adv, cfg.loss)
        idx = train.micro_batches(2)[0]
        tr.policy.train()
        with MemoryTracker() as m:
            tr._micro(train, idx, ref=None, old=None, entropy=False)
            got[ckpt] = (m.current, plan.bytes("act.saved"))
    measured = got[False][0] / got[True][0]
    planned = got[False][1] / got[True][1]
    assert 0.8 <= planned / measured <= 1.25, (measured, planned)
    assert measured > 3  # checkpointing matters at this size: the check is not vacuous


def test_whole_update_and_optimizer_states(seed, tmp_path):
    cfg, tr = make(seed, tmp_path, "tiny")
    batch = tr.engine.generate(PROMPTS, seed=seed)
    plan = plan_for(cfg, tr, batch)
    adv, _, _ = tr.advantages(batch, tr.score(batch))
    with MemoryTracker() as m:
        tr.update(batch, adv)
    existing = sum(plan.bytes(k) for k in ("params.trainable", "params.frozen", "reference", "rope", "fused"))
    ratio(m.peak, plan.peaks["update"][0] - existing, PEAK, "update peak")
    states = sum(t.nbytes for st in tr.optim.optimizer.state.values() for t in st.values()
                 if isinstance(t, torch.Tensor) and t.dim() > 0)
    ratio(states, plan.bytes("adam"), EXACT, "AdamW states")
    assert plan.bytes("master") == 0  # fp32 model: the optimizer steps the parameters directly


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], ["*_proj"]])
def test_lora_adapters_optimizer_and_update(seed, tmp_path, targets):
    """LoRA (lora.enabled): the plan counts the adapters exactly, from the config alone (a meta model) and
    from the adapted policy; the AdamW states and gradients are the adapters' (exact); no reference copy;
    the whole update's measured peak within the peak factor."""
    pytest.importorskip("peft")
    lora = dict(enabled=True, r=4, alpha=8.0, target_modules=targets)
    cfg, tr = make(seed, tmp_path, "small", lora=lora)
    adapters = sum(p.numel() for n, p in tr.policy.hf_model.named_parameters() if ".lora_" in n)
    assert adapters > 0
    shapes = model_shapes(cfg)  # from the config: the preset built on the meta device
    assert shapes.lora and shapes.trainable == adapters
    assert model_shapes(cfg, tr.policy).trainable == adapters
    assert shapes.total == sum(p.numel() for p in tr.policy.hf_model.parameters())
    batch = tr.engine.generate(PROMPTS, seed=seed)
    plan = plan_for(cfg, tr, batch)
    assert "reference" not in plan.items and plan.bytes("master") == 0 and "LoRA r=4" in plan.title
    assert plan.bytes("params.trainable") == 4 * adapters  # peft keeps adapters in fp32
    adv, _, _ = tr.advantages(batch, tr.score(batch))
    with MemoryTracker() as m:
        tr.update(batch, adv)
    existing = sum(plan.bytes(k) for k in ("params.trainable", "params.frozen", "rope", "fused"))
    ratio(m.peak, plan.peaks["update"][0] - existing, PEAK, "LoRA update peak")
    states = sum(t.nbytes for st in tr.optim.optimizer.state.values() for t in st.values()
                 if isinstance(t, torch.Tensor) and t.dim() > 0)
    ratio(states, plan.bytes("adam"), EXACT, "AdamW states of the adapters")
    assert plan.bytes("grads") == 4 * adapters  # fp32 gradients of the adapters only
    # 8 GPUs: the base inside the FSDP2 units is sharded with the adapters; the rollout gathers it all
    p8 = plan_memory(cfg, gpus=8, device="cpu", lengths=lengths(batch), shapes=shapes, rewards=[], advise=False)
    assert p8.bytes("params.trainable") == pytest.approx(4 * adapters / 8)
    assert p8.bytes("params.frozen") == pytest.approx(4 * shapes.unit_frozen / 8 + 4 * (shapes.frozen - shapes.unit_frozen))
    assert p8.bytes("rollout.unsharded") == 4 * (shapes.unit_frozen + adapters)


@pytest.mark.parametrize("size", ["tiny", "small"])
def test_vq_decode(seed, tmp_path, size):
    from fastbicot.rollout.engine import decode_images

    cfg, tr = make(seed, tmp_path, size)
    p = tr.policy
    R = cfg.data.prompts_per_step * cfg.rollout.num_generations
    tokens = torch.randint(0, p.image_vocab_size, (R, p.num_image_tokens))
    plan = plan_memory(cfg, gpus=1, device="cpu", lengths=Lengths(20, 12, 30), policy=p, rewards=[])
    with MemoryTracker() as m:
        decode_images(p, tokens, cfg.rollout.pixel_rounding)
    ratio(m.peak, plan.bytes("vq") + plan.bytes("images"), PEAK, f"VQ decode ({size})")


def test_weights_from_meta_equal_the_real_model(seed):
    cfg = TrainerConfig.from_dict(dict(model=dict(preset="small")))
    meta = model_shapes(cfg)  # built on the meta device
    real = JanusPolicy.from_preset("small", seed=seed % 1000)
    s = model_shapes(cfg, real)
    assert (meta.trainable, meta.frozen) == (s.trainable, s.frozen)
    n_train = sum(p.numel() for n, p in real.hf_model.named_parameters()
                  if n.startswith(("model.language_model.", "lm_head.")))
    assert s.trainable == n_train
    assert s.total == sum(p.numel() for p in real.parameters())


def test_model_from_path_and_builder(seed, tmp_path):
    """config.model.path: config.json only (no weights in the directory); builder: the real model."""
    policy = JanusPolicy.from_preset("small", seed=seed % 1000)
    policy.hf_model.config.save_pretrained(tmp_path)
    by_path = model_shapes(TrainerConfig.from_dict(dict(model=dict(path=str(tmp_path)))))
    by_preset = model_shapes(TrainerConfig.from_dict(dict(model=dict(preset="small"))))
    assert (by_path.trainable, by_path.frozen, by_path.image_tokens) == (
        by_preset.trainable, by_preset.frozen, by_preset.image_tokens)
    cfg = TrainerConfig.from_dict(dict(model=dict(builder="fastbicot.toy.policy:build_policy")))
    from fastbicot.toy.policy import build_policy

    toy = build_policy(seed=0)
    s = model_shapes(cfg)
    assert s.total == sum(p.numel() for p in toy.parameters())
    assert plan_memory(cfg, gpus=1, device="cpu", rewards=[]).peak > 0


def test_advice_is_the_largest_prompts_per_pass_that_fits():
    """T2I-R1 on Janus-Pro-1B, one 80 GB GPU: the whole rollout does not fit; the advice names the most
    prompt groups per pass that fits (a balanced split), and one more group per pass would not fit."""
    import re

    cfg = TrainerConfig.from_dict(dict(model=dict(preset="janus-pro-1b")))
    s = model_shapes(cfg)
    plan = plan_memory(cfg, gpus=1, shapes=s, rewards=[])
    assert not plan.fits and plan.peak_phase == "rollout"
    (line,) = [a for a in plan.advice if a.startswith("rollout.prompts_per_pass=")]
    k = int(re.match(r"rollout.prompts_per_pass=(\d+)", line).group(1))

    def fits(k):
        return plan_memory(cfg.replace(rollout=cfg.rollout.replace(prompts_per_pass=k)), gpus=1, shapes=s,
                           rewards=[], advise=False).fits

    P = cfg.data.prompts_per_step
    assert 1 < k < P and fits(k)
    bigger = [j for j in {-(-P // c) for c in range(1, P + 1)} if j > k]  # the balanced splits above k
    assert bigger and not any(fits(j) for j in bigger)


def test_7b_recipe_numbers():
    """Janus-Pro-7B shapes (meta device): DESIGN.md's 480 KiB of KV per token, 16 bytes per trainable
    parameter of sharded state (bf16 weight + fp32 master + two fp32 Adam states), sharding 1/N."""
    cfg = TrainerConfig.from_dict(dict(model=dict(preset="janus-pro-7b")))
    s = model_shapes(cfg)
    assert 6.8e9 < s.trainable < 7.0e9 and 7.3e9 < s.total < 7.5e9
    p8 = plan_memory(cfg, gpus=8, shapes=s, rewards=[], reference="replicated")
    p1 = plan_memory(cfg, gpus=1, shapes=s, rewards=[], advise=False)
    assert "reference replicated" in p1.title  # the defaults are the trainer's: one process deep-copies it,
    assert "reference sharded" in plan_memory(cfg, gpus=8, shapes=s, rewards=[], advise=False).title  # FSDP2
    off = cfg.replace(distributed=cfg.distributed.replace(reference="cpu_offload"))
    assert plan_memory(off, gpus=8, shapes=s, rewards=[], advise=False).bytes("reference") == 0
    kv, a = 480 * 1024, p8.assumptions
    Lc, Li, R = a["cot_context"], a["image_context"], a["rows"]
    assert R == 16 and a["layout"] == "grouped"
    # 2 prompts/GPU: 2 template blocks; 16 rows of the template's last token + 1024 CoT tokens
    assert p8.bytes("kv.cot") == kv * (2 * (Lc - 1) + 16 * (1 + 1024))
    # 16 conditional blocks + K unconditional ones; 32 rows of S + 1 + 576 (S: the spread's bound)
    K, S = a["uncond_blocks"], a["remainder"]
    assert (K, S) == uncond_blocks(32, 16, Li - a["image_context_min"], Li - 1)
    assert p8.bytes("kv.image") == kv * ((16 + K) * (Li - 1) + 32 * (S + 1 + 576))
    equal = plan_memory(cfg, gpus=8, shapes=s, rewards=[], advise=False, lengths=Lengths(Lc, 1024, Li, Li))
    assert equal.bytes("kv.image") == kv * (17 * (Li - 1) + 32 * (1 + 576))  # rows of one length: no spread
    flat = plan_memory(cfg, gpus=8, shapes=s, rewards=[], advise=False, flatten=True)
    assert flat.bytes("kv.image") == kv * (17 * (Li - 1) + 32 * (Li + 576))
    for moment, keys in p8.moments["rollout"].items():  # the CoT cache is freed before the image cache
        assert not {"kv.cot", "kv.image"} <= set(keys), moment
    assert p8.peaks["rollout"][1] == "image prefill"
    state = sum(p8.bytes(k) for k in ("params.trainable", "master", "adam"))
    assert state == pytest.approx(14 * s.trainable / 8, rel=1e-6)
    assert p8.bytes("grads") == pytest.approx(2 * s.trainable / 8, rel=1e-6)
    assert p1.bytes("adam") == pytest.approx(8 * p8.bytes("adam"), rel=1e-6)
    assert p1.bytes("reference") == p8.bytes("reference") == 2 * s.total  # replicated
    assert not p1.fits and p1.advice == []
    text = p8.format()
    assert "peak rollout" in text and "KV cache, image phase" in text
    sharded = plan_memory(cfg, gpus=8, shapes=s, rewards=[], reference="sharded", advise=False)
    assert sharded.bytes("reference") == pytest.approx(p8.bytes("reference") / 8, rel=1e-6)
    # the recipe (ORM, HPS, GIT, GroundingDINO on every GPU; every CoT 1024 tokens, lengths spread as far as
    # they can): a replicated reference does not fit 80 GB - 10 %, a sharded one does
    rewards = ["hps", "git", "gdino", "orm"]
    rec = plan_memory(cfg, gpus=8, shapes=s, rewards=rewards, reference="replicated")
    assert not rec.fits and rec.bytes("rewards") > 17 * GiB
    assert any(a.startswith("shard the reference") and "(fits)" in a for a in rec.advice), rec.advice
    rec_sharded = plan_memory(cfg, gpus=8, shapes=s, rewards=rewards, reference="sharded")
    assert rec_sharded.fits and rec_sharded.peak < 70 * GiB
    seed_plan = plan_seed_memory(cfg, gpus=8, shapes=s, rewards=[])
    assert seed_plan.bytes("reference") == 2 * s.total and seed_plan.peak > 20 * GiB


def test_cli(tmp_path, capsys):
    path = tmp_path / "x.yaml"
    path.write_text("model:\n  preset: tiny\nrollout:\n  cot:\n    max_new_tokens: 16\n")
    assert cli(["--config", str(path), "--gpus", "2", "--gpu-memory", "1", "--optim.micro_batch_prompts=2"]) == 0
    out = capsys.readouterr().out
    assert "FITS" in out and "2 GPU(s)" in out and "micro-batch 2" in out
    assert cli(["--config", str(path), "--gpus", "1", "--gpu-memory", "0.001"]) == 1
    assert "DOES NOT FIT" in capsys.readouterr().out
    assert cli(["--config", str(path), "--gpus", "1", "--optim.nope=1"]) == 2
    assert cli(["--config", str(path), "--gpus", "0"]) == 2


def test_bad_arguments():
    cfg = TrainerConfig.from_dict(dict(model=dict(preset="tiny")))
    for kw in (dict(gpus=0), dict(gpus=True), dict(gpus=1, gpu_memory_gib=0), dict(gpus=1, reference="disk"),
               dict(gpus=1, device="tpu")):
        with pytest.raises(ValueError):
            plan_memory(cfg, **kw)
