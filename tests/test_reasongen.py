"""ReasonGen-R1's pieces on the shared trainer: the adaptive entropy bonus (float64 references), DAPO's
dynamic sampling with regeneration of the filtered groups, the strict \\boxed{} judge with its image
at the template's <image> marker, the SFT recipe (format, loss weights and normalisation, prompt + CoT
dropout), and configs/reasongen_r1.yaml training a few steps on the toy world."""

import json
import math
import os

import pytest
import torch

from fastbicot.rewards import Reward, RewardError
from fastbicot.rewards.judging import UnscorableAnswer, boxed_verdict
from fastbicot.toy import (
    TOY_INSTRUCTION,
    TOY_SYSTEM,
    TOY_TEMPLATE,
    ToyColorReward,
    ToyCountReward,
    ToySpatialReward,
)
from fastbicot.trainer import Trainer, TrainerConfig
from fastbicot.trainer.dynamic_sampling import refill_size, spread_groups
from fastbicot.trainer.entropy import AdaptiveCoefficient, EntropyTarget, head_entropy_grad
from fastbicot.trainer.sft import SFTTrainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY = {"template": TOY_TEMPLATE, "system": TOY_SYSTEM, "instruction": TOY_INSTRUCTION}
pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------- entropy bonus

def test_adaptive_coefficient_matches_adam_by_hand():
    spec = EntropyTarget(target=2.0, init_alpha=0.001, lr=1e-3, min_coeff=-2e-3, max_coeff=2e-3)
    c = AdaptiveCoefficient(spec)
    psi, m, v = math.asinh(0.001), 0.0, 0.0
    for t, ent in enumerate([1.0, 1.5, 3.0, 0.5, 0.2, 0.1], 1):
        g = -math.cosh(psi) * (ent - spec.target)  # d/dpsi of -sinh(psi) (H - target)
        m = 0.9 * m + 0.1 * g
        v = 0.999 * v + 0.001 * g * g
        psi -= spec.lr * (m / (1 - 0.9 ** t)) / (math.sqrt(v / (1 - 0.999 ** t)) + 1e-8)
        psi = math.asinh(min(max(math.sinh(psi), spec.min_coeff), spec.max_coeff))  # alpha clipped
        c.update(ent)
        assert c.alpha == pytest.approx(math.sinh(psi), rel=1e-5, abs=1e-9)
    assert c.alpha == pytest.approx(spec.min_coeff, rel=1e-5)  # entropy far below target: alpha < 0, a bonus


def test_head_entropy_grad_matches_float64(seed):
    h = torch.randn(37, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(11, 8, dtype=torch.float64, requires_grad=True)
    b = torch.randn(11, dtype=torch.float64, requires_grad=True)
    got = head_entropy_grad(h, w, b, chunk_elems=50)  # several chunks under checkpointing
    logp = torch.log_softmax(h @ w.T + b, -1)
    ref = -(logp.exp() * logp).sum(-1)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-6)
    weights = torch.rand(37, dtype=torch.float64)
    g1 = torch.autograd.grad((got.double() * weights).sum(), (h, w, b))
    g2 = torch.autograd.grad((ref * weights).sum(), (h, w, b))
    for a, r in zip(g1, g2):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-6)


def _toy_config(tmp_path, **sections):
    d = {"output_dir": str(tmp_path / "run"), "steps": 3, "seed": 0,
         "model": {"builder": "fastbicot.toy:build_policy", "dtype": "float64", "device": "cpu",
                   "gradient_checkpointing": False},
         "data": {"prompts": os.path.join(ROOT, "configs/toy/prompts.jsonl"), "prompts_per_step": 2},
         "rollout": {"num_generations": 3, "guidance_scale": 1.0, "image_mode": "continue", **TOY,
                     "cot": {"max_new_tokens": 8}},
         "loss": {"beta": 0.0}, "log": {"progress": False, "tensorboard": False}}
    for k, v in sections.items():
        d[k] = {**d.get(k, {}), **v}
    return TrainerConfig.from_dict(d)


def test_entropy_bonus_term_is_alpha_times_token_means(tmp_path):
    toy = [ToyColorReward(), ToyCountReward(), ToySpatialReward()]
    bonus = {"entropy_bonus": {"mode": "adaptive", "text": {"init_alpha": 0.003}, "image": {"init_alpha": -0.002}}}
    plain = Trainer(_toy_config(tmp_path), rewards=toy)
    extra = Trainer(_toy_config(tmp_path, loss=bonus), rewards=toy, policy=plain.policy)
    batch = plain.rollout()
    adv, _, _ = plain.advantages(batch, plain.score(batch))
    from fastbicot.trainer.batch import pack
    from fastbicot.trainer.logprobs import sample_logprobs

    train = pack(batch, adv, plain.config.loss)
    fwd = sample_logprobs(plain.policy, train.samples, loss=plain.config.loss, entropy=True)  # the detached path
    want = 0.003 * float(fwd.entropy_text.mean()) - 0.002 * float(fwd.entropy_image.mean())
    l0, _ = plain.compute_loss(batch, adv)
    l1, _ = extra.compute_loss(batch, adv)
    assert float((l1 - l0).detach()) == pytest.approx(want, rel=1e-5, abs=1e-12)
    # a step reports the coefficients it used, then each controller moves towards its target: alpha grows
    # (a penalty) when the entropy is above the target, shrinks (a bonus) when below
    m = extra.update(batch, adv)
    assert m["entropy_bonus/text_coeff"] == pytest.approx(0.003) and m["entropy_bonus/image_coeff"] == pytest.approx(-0.002)
    for key, a0, ctl, target in (("text", 0.003, extra.entropy_bonus.text, 2.0),
                                 ("image", -0.002, extra.entropy_bonus.image, 7.0)):
        assert (ctl.alpha - a0) * (m[f"entropy/{key}"] - target) > 0, (key, ctl.alpha, m[f"entropy/{key}"])


# ------------------------------------------------------------------------------------- dynamic sampling

def test_refill_sizes_by_hand():
    assert [refill_size(m, 16, "missing") for m in (1, 3, 5)] == [1, 3, 5]
    # the original: 1 << (bit_length + 1), at most the batch
    assert [refill_size(m, 16, "pow2") for m in (1, 3, 5, 9)] == [4, 8, 16, 16]


class FlatThenSpread(Reward):
    """The first call (the step's own rollout) scores every sample 1: every group is flat and filtered; later
    calls (the refills) score each sample by its index, so their groups have a spread."""

    name = "flat_then_spread"

    def __init__(self):
        super().__init__()
        self.calls = []

    def score(self, images, prompts, metadata, cots):
        self.calls.append(list(prompts))
        return [1.0] * len(prompts) if len(self.calls) == 1 else [float(i % 3) for i in range(len(prompts))]


@pytest.mark.parametrize("mode", ["new_prompts", "same_prompts"])
def test_refill_regenerates_the_filtered_groups(tmp_path, mode):
    from fastbicot.trainer.dynamic_sampling import _seed

    reward = FlatThenSpread()
    cfg = _toy_config(tmp_path, data={"prompts_per_step": 4},
                      advantage={"filter_zero_std": True, "refill": mode, "max_gen_batches": 2})
    tr = Trainer(cfg, rewards=[reward])
    step_prompts = [r.prompt for r in tr.records()]
    m = tr.step()
    trained = [tr.last_batch.samples[3 * g].prompt for g in range(4)]
    if mode == "same_prompts":  # the four filtered prompts, generated again
        want = step_prompts
    else:  # four prompts drawn for (data.seed, step 0, round 1) from the whole prompt set
        g = torch.Generator().manual_seed(_seed(cfg.data.seed, 0, 1))
        want = [tr.prompts[int(i)].prompt for i in torch.randperm(len(tr.prompts), generator=g)[:4]]
    assert trained == want and len(tr.last_batch.samples) == 12
    assert [len(c) for c in reward.calls] == [12, 12]
    assert spread_groups(tr.last_batch, tr.last_scores.total) == [0, 1, 2, 3]
    assert (m["groups/first_batch_kept"], m["groups/gen_batches"], m["groups/refilled"]) == (0, 2, 4)
    assert m["groups/filtered"] == 0.0 and "update/skipped" not in m


def test_refill_gives_up_after_max_gen_batches(tmp_path):
    class Flat(Reward):
        name = "flat"

        def score(self, images, prompts, metadata, cots):
            return [0.5] * len(prompts)

    cfg = _toy_config(tmp_path, advantage={"filter_zero_std": True, "refill": "new_prompts", "max_gen_batches": 3})
    tr = Trainer(cfg, rewards=[Flat()])
    with pytest.raises(Exception, match="0 of 2 prompt groups have a reward spread after 3 generation batches"):
        tr.step()


def test_refill_needs_the_filter():
    with pytest.raises(Exception, match="advantage.refill: needs advantage.filter_zero_std"):
        TrainerConfig.from_dict({"advantage": {"refill": "new_prompts"}})


def test_reasongen_config_loads_no_reference_model(tmp_path):
    cfg = TrainerConfig.from_yaml(os.path.join(ROOT, "configs/reasongen_r1.yaml"))
    assert (cfg.loss.beta, cfg.rollout.guidance_scale, cfg.rollout.image_mode) == (0.0, 1.0, "continue")
    assert (cfg.loss.eps_low, cfg.loss.eps_high, cfg.loss.aggregation) == (0.2, 0.2, "token_mean")
    assert (cfg.sft.text_weight, cfg.sft.image_weight, cfg.sft.cond_dropout) == (2.0, 1.0, 0.1)
    tr = Trainer(_toy_config(tmp_path), rewards=[FlatThenSpread()])
    assert tr.ref_policy is None  # beta 0: no reference model at all


# ------------------------------------------------------------------------------------------------ judge

def test_judge_places_the_image_at_the_marker_and_parses_strictly(tmp_path):
    from test_rewards_learned import save_tiny_qwen_vl

    from fastbicot.rewards.reasongen import InlineImageJudgeReward, reasongen_judge, split_question

    model, processor = save_tiny_qwen_vl(tmp_path)
    processor.save_pretrained(tmp_path)
    question = "is {prompt} <image> boxed 1 or 0"
    judge = InlineImageJudgeReward(model, processor, question_template=question, max_new_tokens=3)
    assert judge.question("A photo of a red car", "") == "is a red car <image> boxed 1 or 0"
    text = processor.apply_chat_template(judge.messages("A photo of a red car", ""), add_generation_prompt=True,
                                         tokenize=False)
    assert text.index("red car") < text.index("<|image_pad|>") < text.index("boxed 1")  # the image in between
    assert split_question("no marker") == ("", "no marker")
    images = torch.randint(0, 256, (2, 16, 16, 3), dtype=torch.uint8)
    with pytest.raises(RewardError, match="unparsable judgement"):  # a random tiny model writes no verdict
        judge(images, ["a red car", "a cat"])
    lenient = InlineImageJudgeReward(model, processor, question_template=question, max_new_tokens=3, fallback=0.0)
    assert lenient(images, ["a red car", "a cat"]).tolist() == [0.0, 0.0]
    assert lenient.parts["unparsable"].tolist() == [1.0, 1.0] and lenient.num_fallbacks == 2
    with pytest.raises(ValueError, match="one of path"):
        reasongen_judge()


# ------------------------------------------------------------------------------------------------- SFT

def _write_reasongen_sft(path, n, seed):
    gen = torch.Generator().manual_seed(seed)
    with open(path, "w") as f:
        for i in range(n):
            c = ["red", "green", "blue"][i % 3]
            f.write(json.dumps({"instruction": f"a {c} square", "thinking": f"{c} square at top left",
                                "image_tokens": torch.randint(0, 71, (64,), generator=gen).tolist()}) + "\n")
    return str(path)


@pytest.mark.parametrize("dropout", [0.0, 1.0])
def test_reasongen_sft_loss_by_hand(tmp_path, seed, dropout):
    data = _write_reasongen_sft(tmp_path / "rg.jsonl", 4, seed)
    cfg = TrainerConfig.from_dict({
        "output_dir": str(tmp_path / "run"),
        "model": {"builder": "fastbicot.toy:build_policy", "seed": 3, "gradient_checkpointing": False},
        "rollout": {"guidance_scale": 1.0, "image_mode": "continue", **TOY},
        "sft": {"data": data, "steps": 1, "batch_size": 4, "cond_dropout": dropout, "dropout_text": False,
                "normalize": "token_count", "instruction": "draw : {prompt}", "seed": seed},
        "log": {"progress": False}})
    tr = SFTTrainer(cfg)
    assert tr.engine.config.instruction == "draw : {prompt}"
    p, hf = tr.policy, tr.policy.hf_model
    num, count = 0.0, 0
    with torch.no_grad():
        for ex in tr.examples:  # independent: one continue-mode row through transformers' modules
            ctx = [p.bos_token_id] + p.tokenizer.encode(
                TOY_TEMPLATE.format(system=TOY_SYSTEM, instruction=f"draw : {ex['prompt']}"), add_special_tokens=False)
            body = p.tokenizer.encode(ex["cot"], add_special_tokens=False)
            img = torch.tensor(ex["image_tokens"])
            ictx = ctx + body + [p.boi_token_id]
            if dropout:  # prompt and CoT dropped: BOS pad ... pad BOI, and only the image is a target
                ictx = [p.bos_token_id] + [p.pad_token_id] * (len(ictx) - 2) + [p.boi_token_id]
            e = torch.cat([hf.model.language_model.embed_tokens(torch.tensor([ictx])),
                           hf.prepare_embeddings_for_image_generation(img[None, :-1])], 1)
            h = hf.model.language_model(inputs_embeds=e).last_hidden_state[0]
            li = torch.log_softmax(hf.model.generation_head(h[len(ictx) - 1:]), -1).gather(-1, img[:, None])
            num += -li.sum()
            count += len(img)
            if not dropout:
                cot = torch.tensor(body + [p.eos_token_id])
                lp = torch.log_softmax(hf.lm_head(h[len(ctx) - 1:len(ctx) - 1 + len(cot)]), -1).gather(-1, cot[:, None])
                num += -2.0 * lp.sum()  # text x2, image x1, divided by the number of target tokens
                count += len(cot)
    tr.rng.shuffle = lambda x: None
    m = tr.step()
    assert m["loss"] == pytest.approx(float(num / count), rel=2e-5)


# ------------------------------------------------------------------------------------- the recipe runs

class BoxedToyJudge(Reward):
    """A programmatic stand-in for the VLM judge: writes an answer ending in \\boxed{1} when the toy rewards
    say the image fits the prompt (mean >= 0.5), \\boxed{0} otherwise, and no verdict for every 7th sample;
    the answer is read with the strict rule, unparsable answers take the fallback (0), as the real judge."""

    name = "judge"

    def __init__(self):
        super().__init__(fallback=0.0)
        self.toy = [ToyColorReward(), ToyCountReward(), ToySpatialReward()]
        self.parts = {}

    def score(self, images, prompts, metadata, cots):
        good = sum(r(images, prompts, metadata, cots) for r in self.toy) / 3 >= 0.5
        out, bad = [], []
        for i, g in enumerate(good.tolist()):
            answer = "it looks wrong" if i % 7 == 6 else f"the image matches: \\boxed{{{int(g)}}}"
            try:
                out.append(boxed_verdict(answer))
                bad.append(0.0)
            except UnscorableAnswer:
                out.append(float("nan"))  # -> the fallback, counted
                bad.append(1.0)
        self.parts = {"unparsable": torch.tensor(bad)}
        return out


def test_reasongen_recipe_trains_on_the_toy(tmp_path):
    overrides = [f"output_dir={tmp_path / 'run'}", "steps=3", "model.path=null",
                 "model.builder=fastbicot.toy:build_policy", "model.dtype=float32", "model.device=cpu",
                 "model.gradient_checkpointing=false", f"data.prompts={os.path.join(ROOT, 'configs/toy/prompts.jsonl')}",
                 "data.format=jsonl", "data.prompts_per_step=4", "rollout.num_generations=4",
                 f"rollout.template={json.dumps(TOY_TEMPLATE)}", f"rollout.system={TOY_SYSTEM}",
                 f"rollout.instruction={json.dumps(TOY_INSTRUCTION)}", "rollout.cot.max_new_tokens=12",
                 "rollout.max_prompt_length=null", "optim.lr=0.001", "optim.micro_batch_prompts=4",
                 "log.progress=false", "log.grid_every=0", "log.tensorboard=false", "checkpoint.every=0"]
    cfg = TrainerConfig.from_yaml(os.path.join(ROOT, "configs/reasongen_r1.yaml"), overrides)
    tr = Trainer(cfg, rewards=[BoxedToyJudge()])
    assert tr.ref_policy is None and tr.entropy_bonus is not None
    tr.train()
    from fastbicot.trainer.metrics import read_metrics

    rows = read_metrics(os.path.join(cfg.output_dir, "metrics.jsonl"))
    assert len(rows) == 3
    for r in rows:
        assert r["groups/filtered"] == 0.0 and r["groups/gen_batches"] >= 1  # the trained groups all have a spread
        assert 0.0 <= r["reward/judge/unparsable"] <= 1.0 and r["kl"] == 0.0
    coeffs = [(r["entropy_bonus/text_coeff"], r["entropy_bonus/image_coeff"]) for r in rows]
    assert coeffs[0] == (0.0, 0.0) and coeffs[1] != coeffs[0]  # alpha_0 = 0, then the controllers move


def test_resume_restores_the_entropy_controllers(tmp_path):
    toy = [ToyColorReward(), ToyCountReward(), ToySpatialReward()]
    extra = {"loss": {"entropy_bonus": {"mode": "adaptive", "text": {"lr": 1e-3}, "image": {"lr": 1e-3}}},
             "checkpoint": {"every": 1, "keep": 3}}
    full = Trainer(_toy_config(tmp_path / "a", **extra).replace(steps=2), rewards=toy)
    full.train()
    first = Trainer(_toy_config(tmp_path / "b", **extra).replace(steps=2), rewards=toy)
    first.step()
    first.save_checkpoint()
    again = Trainer(_toy_config(tmp_path / "b", **extra).replace(steps=2), rewards=toy)
    from fastbicot.trainer.trainer import find_checkpoint

    again.load_checkpoint(find_checkpoint(again.config.output_dir))
    assert again.entropy_bonus.text.alpha == first.entropy_bonus.text.alpha != 0.0
    again.step()
    assert (again.entropy_bonus.text.alpha, again.entropy_bonus.image.alpha) == \
        (full.entropy_bonus.text.alpha, full.entropy_bonus.image.alpha)


def test_sft_examples_may_name_image_files(tmp_path, seed):
    import numpy as np
    from PIL import Image

    from fastbicot.trainer.sft import SFTDataError, load_sft_examples, sft_cache_key
    from fastbicot.vq_encode import image_pixels

    gen = np.random.default_rng(seed)
    wide = gen.integers(0, 256, (16, 20, 3), dtype=np.uint8)  # 20 wide: the centre crop keeps columns 2..17
    Image.fromarray(wide).save(tmp_path / "wide.png")
    (tmp_path / "imgs").mkdir()
    square = gen.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    Image.fromarray(square).save(tmp_path / "imgs" / "sq.png")
    data = tmp_path / "rg.jsonl"
    data.write_text(json.dumps({"instruction": "a red square", "thinking": "red square at top left",
                                "image": "wide.png"}) + "\n" +
                    json.dumps({"instruction": "a blue square", "thinking": "", "image": "imgs/sq.png"}) + "\n")
    cfg = TrainerConfig.from_dict({
        "output_dir": str(tmp_path / "run"), "model": {"builder": "fastbicot.toy:build_policy", "seed": 1},
        "rollout": {"guidance_scale": 1.0, **TOY}, "sft": {"data": str(data), "steps": 1, "batch_size": 2},
        "log": {"progress": False}})
    tr = SFTTrainer(cfg)
    assert image_pixels(tr.policy) == 16
    with torch.no_grad():  # independent: crop by hand, scale to [-1, 1], transformers' VQ encoder
        px = torch.from_numpy(np.stack([wide[:, 2:18], square]).astype(np.float32) / 255 * 2 - 1).permute(0, 3, 1, 2)
        want = tr.policy.vqmodel.encode(px).image_tokens.reshape(2, -1).tolist()
    assert [ex["image_tokens"] for ex in tr.examples] == want
    assert tr.examples[0]["metadata"] == {}
    key = sft_cache_key(cfg)
    Image.fromarray(255 - square).save(tmp_path / "imgs" / "sq.png")
    assert sft_cache_key(cfg) != key  # the warm-start cache follows the image files too
    with pytest.raises(SFTDataError, match="rg.jsonl:1: .*needs the policy's VQ encoder"):
        load_sft_examples(data, 64, 71)
    data.write_text(json.dumps({"prompt": "x", "cot": "", "image": "missing.png"}) + "\n")
    with pytest.raises(SFTDataError, match="rg.jsonl:1: image file not found"):
        load_sft_examples(data, 64, 71, encode=lambda p: [])
