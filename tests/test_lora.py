"""LoRA (lora.enabled; trainer/lora.py): the loss and gradients against the full-weight trainer and
closed forms, the reference = adapters disabled, the rollout samples the adapted weights, save -> merge ->
load, resume, a toy run whose reward rises, and bad input. CPU, tiny random policies, float64 where the
comparison is numeric."""

import copy
import json
import os
import re
import shutil
import sys
import warnings

import pytest
import torch

pytest.importorskip("peft")  # the optional extra: pip install 'fastbicot[lora]' (in [dev])

from helpers import seed_logps

from fastbicot.models import JanusPolicy
from fastbicot.rewards import FunctionReward
from fastbicot.trainer import ConfigError, Trainer, TrainerConfig, pack
from fastbicot.trainer.logprobs import sample_logprobs
from fastbicot.trainer.trainer import find_checkpoint, save_policy

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHORT = dict(template="{system} {instruction}", system="Plan.", instruction="Draw {prompt}:")
PROMPTS = ["a red cube", "two green dogs left of a cat", "x"]
LM = "model.language_model."
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def red_reward():
    return FunctionReward("red", lambda im, p, m, c: im[..., 0].double().mean((1, 2)) / 255 + 0.1 * len(c[0]))


def config(seed, tmp_path, dtype="float64", lora=True, **sections):
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = tmp_path / "prompts.txt"
    data.write_text("\n".join(PROMPTS))
    d = dict(output_dir=str(tmp_path / "run"), steps=3, seed=seed,
             model=dict(preset="tiny", dtype=dtype, seed=seed),
             data=dict(prompts=str(data), prompts_per_step=3, shuffle=False),
             rollout=dict(num_generations=4, cot=dict(max_new_tokens=6), **SHORT),
             log=dict(progress=False))
    for k, v in sections.items():
        d[k] = {**d[k], **v} if isinstance(v, dict) and isinstance(d.get(k), dict) else v
    if lora:  # True, or a dict of lora settings on top of these
        d["lora"] = {"enabled": True, "r": 4, "alpha": 8.0, **(lora if isinstance(lora, dict) else {})}
    return TrainerConfig.from_dict(d)


def tiny(seed, dtype=torch.float64):
    return JanusPolicy.from_preset("tiny", seed=seed, dtype=dtype)


def lora_layers(policy):
    """{module name: peft lora.Linear} of an adapted policy."""
    return {n: m for n, m in policy.hf_model.named_modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")}


def randomize_adapters(policy, std=0.3):
    with torch.no_grad():
        for m in lora_layers(policy).values():
            m.lora_B["default"].weight.normal_(0.0, std)


def hf_logps(policy, s):
    """Per-token log-probs of one sample through transformers' own modules (materialised logits,
    log_softmax, gather; float64), independent of fastbicot's kernels."""
    return seed_logps(policy, policy, s)


# ---- (a) zero adapters: the full-weight loss, and dL/dB = dL/dW A^T * alpha / r --------------------------

def test_zero_adapters_equal_the_full_weight_loss_and_grad_of_B_is_closed_form(seed, tmp_path):
    base = tiny(seed)
    full = Trainer(config(seed, tmp_path / "f", lora=False, loss={"beta": 0.04}), policy=copy.deepcopy(base),
                   rewards=[red_reward()])
    tr = Trainer(config(seed, tmp_path / "l", loss={"beta": 0.04}), policy=copy.deepcopy(base), rewards=[red_reward()])
    assert tr.ref_policy is None  # no second copy of the weights
    layers = lora_layers(tr.policy)
    assert sorted({n.rsplit(".", 1)[1] for n in layers}) == sorted(TARGETS) and all(n.startswith(LM) for n in layers)
    assert len(layers) == 7 * base.num_layers  # every attention and MLP projection, nothing outside the LM
    trainable = {n for n, p in tr.policy.hf_model.named_parameters() if p.requires_grad}
    assert trainable == set(tr.trainable) and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert {id(p) for p in tr.optim.params} == {id(p) for n, p in tr.policy.hf_model.named_parameters()
                                                if n in trainable}  # the optimizer sees only adapters
    assert all(float(m.lora_B["default"].weight.detach().abs().max()) == 0 for m in layers.values())  # init

    batch = full.rollout()
    adv, _, _ = full.advantages(batch, full.score(batch))
    full.policy.train()
    tr.policy.train()
    loss_f, stats_f = full.compute_loss(batch, adv)
    loss_l, stats_l = tr.compute_loss(batch, adv)
    torch.testing.assert_close(loss_l, loss_f, rtol=1e-12, atol=0)
    assert float(stats_l["kl"]) == float(stats_f["kl"]) == 0
    loss_f.backward()
    loss_l.backward()
    fw = dict(full.policy.hf_model.named_parameters())
    lw = dict(tr.policy.hf_model.named_parameters())
    s = 8.0 / 4
    scale = max(float(fw[n + ".weight"].grad.abs().max()) for n in layers)
    assert scale > 0
    for n in layers:
        gW = fw[n + ".weight"].grad  # dL/dW_eff of the same Linear on the full-weight path
        A = lw[n + ".lora_A.default.weight"]
        gB = lw[n + ".lora_B.default.weight"].grad
        torch.testing.assert_close(gB, gW @ A.detach().T * s, rtol=1e-9, atol=1e-12 * scale * float(A.detach().abs().max()),
                                   msg=n)
        gA = lw[n + ".lora_A.default.weight"].grad  # s B^T dL/dW = 0 while B = 0
        assert gA is None or float(gA.abs().max()) == 0, n


# ---- (b) the reference is the base model (adapters disabled), and the KL is against it ------------------

def test_reference_is_the_base_model_with_adapters_disabled(seed, tmp_path):
    base = tiny(seed)
    tr = Trainer(config(seed, tmp_path, loss={"beta": 0.05}), policy=copy.deepcopy(base), rewards=[red_reward()])
    randomize_adapters(tr.policy)
    batch = tr.rollout()
    adv, _, _ = tr.advantages(batch, tr.score(batch))
    train = pack(batch, adv, tr.config.loss)
    idx = list(range(len(train.samples)))
    ref = tr._ref_logprobs(train, idx)
    # adapters come back on, trainable, after the reference pass
    assert all(not m.disable_adapters for m in lora_layers(tr.policy).values())
    assert all(p.requires_grad for p in tr.optim.params)
    samples = [batch.samples[t.index] for t in train.samples]  # the training token order
    with torch.no_grad():
        want_ref = torch.cat([hf_logps(base, s) for s in samples])  # the untouched base, float64
        lp = torch.cat([hf_logps(tr.policy, s) for s in samples])  # the adapted policy, float64
    torch.testing.assert_close(ref.double(), want_ref, rtol=0, atol=2e-5)
    assert float((lp - want_ref).abs().max()) > 1e-2  # the adapters changed the policy
    _, stats = tr.compute_loss(batch, adv)
    # group_token_mean: each group's token mean of k3, then the mean over groups (float64)
    k3 = torch.exp(want_ref - lp) - (want_ref - lp) - 1
    counts = [len(s.cot_ids) + len(s.image_tokens) for s in samples]
    per_sample = torch.split(k3, counts)
    G = batch.num_generations
    groups = [torch.cat(per_sample[g * G:(g + 1) * G]).mean() for g in range(len(per_sample) // G)]
    want_kl = torch.stack(groups).mean()
    assert float(want_kl) > 1e-3
    torch.testing.assert_close(torch.as_tensor(float(stats["kl"]), dtype=torch.float64), want_kl, rtol=1e-4, atol=0)


# ---- (c) after optimizer steps the rollout samples from the adapted weights ----------------------------

@pytest.mark.parametrize("path", ["fused", "module"])
def test_rollout_samples_from_the_adapted_weights(seed, tmp_path, path, monkeypatch):
    """Guidance 1, no filtering: the rollout's own log-probs equal the training forward's (adapted)."""
    from fastbicot.rollout.trunk import Trunk

    if path == "module":  # the CUDA / unfused path: the LoRA layers' own forward inside the trunk
        def no_fuse(self):
            self.fused = self.native = self.out_w = None

        monkeypatch.setattr(Trunk, "fuse_weights", no_fuse)
    tr = Trainer(config(seed, tmp_path, rollout=dict(guidance_scale=1.0, cot=dict(top_k=0, max_new_tokens=6)),
                        optim={"lr": 3e-2}, steps=2),
                 policy=tiny(seed), rewards=[red_reward()])
    for _ in range(2):
        tr.step()
    assert all(float(m.lora_B["default"].weight.detach().abs().max()) > 0 for m in lora_layers(tr.policy).values())
    batch = tr.rollout()
    assert (tr.engine.runner.trunk.fused is not None) == (path == "fused")
    train = pack(batch, torch.zeros(len(batch)), tr.config.loss)
    with torch.no_grad():
        lp = sample_logprobs(tr.policy, train.samples, loss=tr.config.loss).logprobs
        with tr.lora.disable_adapter():
            base_lp = sample_logprobs(tr.policy, train.samples, loss=tr.config.loss).logprobs
    want = torch.cat([torch.cat([s.cot_logprobs, s.image_logprobs]) for s in batch.samples])
    torch.testing.assert_close(lp.float(), want, rtol=0, atol=2e-5)
    assert float((base_lp.float() - want).abs().max()) > 1e-3  # the base weights would not reproduce them


def test_effective_weight_is_the_lora_layers_map(seed, tmp_path):
    from fastbicot.rollout.trunk import effective_weight

    tr = Trainer(config(seed, tmp_path, loss={"beta": 0.0}), policy=tiny(seed), rewards=[red_reward()])
    randomize_adapters(tr.policy)
    x = torch.randn(5, tr.policy.hidden_size * 2, dtype=torch.float64)
    for n, m in lora_layers(tr.policy).items():
        W, A, B = m.base_layer.weight, m.lora_A["default"].weight, m.lora_B["default"].weight
        want = W + (8.0 / 4) * B @ A  # closed form, float64
        torch.testing.assert_close(effective_weight(m), want, rtol=1e-12, atol=1e-12, msg=n)
        xi = x[:, : W.shape[1]]
        torch.testing.assert_close(torch.nn.functional.linear(xi, effective_weight(m)), m(xi).detach(),
                                   rtol=1e-10, atol=1e-10, msg=n)
        with tr.lora.disable_adapter():
            assert effective_weight(m) is W
    assert effective_weight(tr.policy.hf_model.lm_head) is tr.policy.hf_model.lm_head.weight


# ---- (e) save -> merge -> load; resume ---------------------------------------------------------------

def test_save_merge_load_gives_the_adapted_policy(seed, tmp_path):
    from transformers import JanusForConditionalGeneration

    from fastbicot.cli import main

    base = tiny(seed)
    base_dir = str(tmp_path / "base")
    save_policy(base, base_dir)
    tr = Trainer(config(seed, tmp_path, loss={"beta": 0.0}), policy=copy.deepcopy(base), rewards=[red_reward()])
    randomize_adapters(tr.policy)
    final = tr.save_checkpoint(final=True)
    files = set(os.listdir(final))
    assert {"adapter_model.safetensors", "adapter_config.json", "trainer_state.pt"} <= files
    assert not any(f.startswith("model") and f.endswith(".safetensors") for f in files)  # no full weights
    out = str(tmp_path / "merged")
    assert main(["merge", "--base", base_dir, "--adapter", final, "--out", out]) == 0
    merged = JanusPolicy.from_pretrained(out, dtype=torch.float64)
    assert not lora_layers(merged)
    ids = torch.randint(0, 256, (2, 9))
    img = torch.randint(0, tr.policy.image_vocab_size, (2, 5))

    def logits(p):
        with torch.no_grad():
            e = torch.cat([p.embed_text(ids), p.embed_image(img)], 1)
            h = p.trunk(e)[0]
            return p.text_logits(h), p.image_logits(h)

    want_t, want_i = logits(tr.policy)
    got_t, got_i = logits(merged)
    base_t, _ = logits(base)
    assert float((want_t - base_t).abs().max()) > 1e-2  # the adapters matter
    torch.testing.assert_close(got_t, want_t, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got_i, want_i, rtol=1e-10, atol=1e-10)
    plain, info = JanusForConditionalGeneration.from_pretrained(out, output_loading_info=True)  # plain transformers
    assert not info["missing_keys"] and not info["unexpected_keys"]
    # the adapter is peft's own format: peft alone loads it onto the base with the same result
    from peft import PeftModel

    hf = JanusForConditionalGeneration.from_pretrained(base_dir, dtype=torch.float64)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # peft probes a deprecated transformers attribute
        pm = PeftModel.from_pretrained(hf, final)
        h = hf.model.language_model(inputs_embeds=hf.model.language_model.embed_tokens(ids)).last_hidden_state
        h_want = tr.policy.trunk(tr.policy.embed_text(ids))[0]
    torch.testing.assert_close(h, h_want, rtol=1e-10, atol=1e-10)
    del pm
    assert plain.dtype == torch.float64  # saved in the base's dtype


def read_rows(path):
    with open(path) as f:
        return [{k: v for k, v in json.loads(x).items() if not k.startswith(("images_per_s", "time/"))} for x in f]


def test_resume_from_a_lora_checkpoint_continues_exactly(seed, tmp_path):
    common = dict(dtype="float32", steps=3, optim={"lr": 1e-2}, loss={"beta": 0.02}, rollout={"num_generations": 2},
                  log={"progress": False, "entropy": False})

    def make(sub, **kw):
        cfg = config(seed, tmp_path / sub, checkpoint={"every": 1, "keep": 3}, **{**common, **kw})
        return Trainer(cfg, policy=tiny(seed, torch.float32), rewards=[red_reward()])

    a = make("a")
    a.train()
    b = make("b")
    b.config = b.config.replace(steps=2)  # a run that stops after step 2 (its checkpoints: step 1, final)
    b.train()
    c = make("b")
    ckpt = find_checkpoint(c.config.output_dir)
    assert ckpt.endswith("checkpoint-000001")
    c.load_checkpoint(ckpt)
    assert c.step_idx == 1
    c.train()
    assert read_rows(os.path.join(a.config.output_dir, "metrics.jsonl")) == read_rows(
        os.path.join(c.config.output_dir, "metrics.jsonl"))
    for (n, p), (_, q) in zip(a.policy.hf_model.named_parameters(), c.policy.hf_model.named_parameters()):
        assert torch.equal(p, q), n


# ---- (f) bad input -------------------------------------------------------------------------------------

def test_lora_without_peft_is_a_clear_error(seed, tmp_path, monkeypatch, capsys):
    from fastbicot.cli import main

    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` raises ImportError
    with pytest.raises(ConfigError, match=r"lora.enabled: .*peft.*pip install 'fastbicot\[lora\]'"):
        Trainer(config(seed, tmp_path), policy=tiny(seed), rewards=[red_reward()])
    Trainer(config(seed, tmp_path / "off", lora=False, loss={"beta": 0.0}), policy=tiny(seed),
            rewards=[red_reward()])  # without LoRA nothing needs peft
    assert main(["merge", "--adapter", str(tmp_path), "--out", str(tmp_path / "m")]) == 2
    assert "pip install 'fastbicot[lora]'" in capsys.readouterr().err


@pytest.mark.parametrize("lora,needle", [
    ({"r": 0}, "lora.r: must be >= 1"),
    ({"dropout": 1.0}, "lora.dropout: must be >= 0.0 and < 1.0"),
    ({"dropout": -0.1}, "lora.dropout: must be >= 0.0 and < 1.0"),
    ({"alpha": 0}, "lora.alpha: must be > 0.0"),
    ({"target_modules": []}, "lora.target_modules: is empty"),
    ({"target_modules": "q_proj"}, "lora.target_modules: must be a list"),
    ({"rank": 4}, "lora.rank: unknown setting"),
])
def test_bad_lora_settings_name_the_key(seed, tmp_path, lora, needle):
    with pytest.raises(ConfigError, match=re.escape(needle)):
        config(seed, tmp_path, lora=lora)


@pytest.mark.parametrize("targets,needle", [
    (["nope_proj"], "'nope_proj' matches no Linear module of the language model"),
    (["q_proj", "model.vision_model.*"], "'model.vision_model.*' matches no Linear module"),
])
def test_target_modules_that_match_nothing(seed, tmp_path, targets, needle):
    with pytest.raises(ConfigError, match=re.escape("lora.target_modules: " + needle)):
        Trainer(config(seed, tmp_path, lora={"target_modules": targets}), policy=tiny(seed), rewards=[red_reward()])


def test_target_module_patterns_select_by_last_name_or_full_name(seed, tmp_path):
    tr = Trainer(config(seed, tmp_path, lora={"target_modules": ["*_proj"]}, loss={"beta": 0.0}), policy=tiny(seed),
                 rewards=[red_reward()])
    assert len(lora_layers(tr.policy)) == 14  # the LM's 7 projections x 2 layers; not the vision tower's
    tr = Trainer(config(seed, tmp_path, lora={"target_modules": [LM + "layers.1.self_attn.[qkv]_proj"]},
                        loss={"beta": 0.0}), policy=tiny(seed), rewards=[red_reward()])
    assert sorted(lora_layers(tr.policy)) == [LM + f"layers.1.self_attn.{k}_proj" for k in "kqv"]


def test_resume_across_lora_settings_is_refused(seed, tmp_path):
    tr = Trainer(config(seed, tmp_path, dtype="float32", steps=1), policy=tiny(seed, torch.float32),
                 rewards=[red_reward()])
    ckpt = tr.save_checkpoint()
    plain = Trainer(config(seed, tmp_path, dtype="float32", lora=False), policy=tiny(seed, torch.float32),
                    rewards=[red_reward()])
    with pytest.raises(ConfigError, match="lora.enabled"):
        plain.load_checkpoint(ckpt)
    other = Trainer(config(seed, tmp_path, dtype="float32", lora={"r": 8}), policy=tiny(seed, torch.float32),
                    rewards=[red_reward()])
    with pytest.raises(ConfigError, match="lora.r"):
        other.load_checkpoint(ckpt)
    full_ckpt = plain.save_checkpoint()
    lora_again = Trainer(config(seed, tmp_path, dtype="float32"), policy=tiny(seed, torch.float32),
                         rewards=[red_reward()])
    with pytest.raises(ConfigError, match="lora.enabled"):
        lora_again.load_checkpoint(full_ckpt)


def test_other_bad_input(seed, tmp_path):
    from fastbicot.trainer.lora import merge_adapter

    with pytest.raises(ValueError, match="ref_policy"):
        Trainer(config(seed, tmp_path), policy=tiny(seed), rewards=[red_reward()], ref_policy=tiny(seed))
    with pytest.raises(FileNotFoundError, match="not a LoRA adapter directory"):
        merge_adapter(str(tmp_path), str(tmp_path / "m"))
    tr = Trainer(config(seed, tmp_path, loss={"beta": 0.0}), policy=tiny(seed), rewards=[red_reward()])
    final = tr.save_checkpoint(final=True)
    with pytest.raises(ValueError, match="--base: .* does not record its base model"):  # a preset: no directory
        merge_adapter(final, str(tmp_path / "m"))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    base_dir = str(tmp_path / "base")
    save_policy(tiny(seed), base_dir)
    with pytest.raises(ValueError, match="--out .* already exists"):
        merge_adapter(final, str(tmp_path / "full"), base_dir=base_dir)
    bad = tmp_path / "bad"
    shutil.copytree(final, bad)
    with open(bad / "adapter_config.json") as f:
        meta = json.load(f)
    meta["target_modules"] = [LM + "layers.9.self_attn.q_proj"]  # a layer the base does not have
    with open(bad / "adapter_config.json", "w") as f:
        json.dump(meta, f)
    with pytest.raises(ValueError, match="does not fit"):
        merge_adapter(str(bad), str(tmp_path / "m2"), base_dir=base_dir)
    assert not (tmp_path / "m2").exists()


# ---- (d) the toy world with LoRA: the reward rises ------------------------------------------------------

def test_toy_grpo_with_lora_raises_the_reward(tmp_path):
    """configs/toy.yaml with lora.enabled and the LoRA settings documented in docs/trainer.md; the rise is
    measured on a fixed evaluation set before and after (as tests/test_toy_training.py)."""
    overrides = [f"output_dir={tmp_path / 'run'}", f"sft.cache_dir={tmp_path / 'cache'}", "sft.steps=60",
                 "steps=10", "data.prompts_per_step=8", "log.progress=false", "log.grid_every=0", "log.entropy=false",
                 "lora.enabled=true", "lora.r=8", "lora.alpha=64", "optim.lr=0.003", "optim.schedule=constant"]
    cfg = TrainerConfig.from_yaml(os.path.join(ROOT, "configs/toy.yaml"), overrides)
    cfg = cfg.replace(data={"prompts": os.path.join(ROOT, cfg.data.prompts)},
                      sft={"data": os.path.join(ROOT, cfg.sft.data)})
    tr = Trainer(cfg)  # the SFT warm start (full weights), then LoRA GRPO from it
    assert tr.ref_policy is None and tr.lora is not None
    held_out = tr.prompts[-48:]

    def eval_reward():
        batch = tr.engine.generate(held_out, num_generations=4, seed=1234)
        return float(tr.rewards(**batch.reward_inputs()).total.mean())

    before = eval_reward()
    tr.train()
    after = eval_reward()
    print(f"LoRA toy: eval reward before {before:.3f}, after {after:.3f}")
    assert after > before + 0.03, (before, after)
    with open(os.path.join(cfg.output_dir, "final", "adapter_config.json")) as f:
        cfg_json = json.load(f)
    assert cfg_json["base_model_name_or_path"].startswith(str(tmp_path / "cache"))  # the SFT warm start
