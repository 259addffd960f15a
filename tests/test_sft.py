"""SFT: examples laid out exactly as the rollout lays out its samples, the weighted NLL against an
independent computation through transformers' modules, condition dropout, malformed files."""

import json

import pytest
import torch

from fastbicot.rollout import RolloutEngine
from fastbicot.toy import TOY_INSTRUCTION, TOY_SYSTEM, TOY_TEMPLATE, build_policy
from fastbicot.trainer import TrainerConfig
from fastbicot.trainer.batch import IMAGE, TEXT
from fastbicot.trainer.sft import SFTDataError, SFTTrainer, example_sample, load_sft_examples

TOY = {"template": TOY_TEMPLATE, "system": TOY_SYSTEM, "instruction": TOY_INSTRUCTION}


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def write_examples(path, n, seed, **edit):
    gen = torch.Generator().manual_seed(seed)
    colors = ["red", "green", "blue"]
    with open(path, "w") as f:
        for i in range(n):
            c = colors[int(torch.randint(0, 3, (), generator=gen))]
            ex = {"prompt": f"a {c} square", "cot": f"{c} square at top left" if i % 3 else "",
                  "image_tokens": torch.randint(0, 71, (64,), generator=gen).tolist(), "task_type": "color"}
            ex.update(edit)
            f.write(json.dumps(ex) + "\n")
    return str(path)


@pytest.mark.parametrize("mode", ["reprompt", "continue"])
def test_example_rows_are_the_rollouts_layout(seed, mode):
    policy = build_policy(seed=seed % 1000)
    engine = RolloutEngine(policy, guidance_scale=1.0, image_mode=mode, max_new_tokens=8, **TOY)
    s = engine.generate(["a red square"], num_generations=1, seed=seed).samples[0]
    body = s.cot_ids[:-1] if s.cot_ids[-1] == policy.eos_token_id else s.cot_ids
    ex = {"prompt": s.prompt, "cot": policy.tokenizer.decode(body), "image_tokens": s.image_tokens.tolist()}
    ts = example_sample(engine, ex, drop=False)
    img = s.image_tokens.tolist()
    image_row = next(r for r in ts.rows if any(t[2] == IMAGE for t in r.targets))
    assert image_row.ids == s.image_context_ids + img[:-1]
    assert [t[1] for t in image_row.targets if t[2] == IMAGE] == img
    text = [t for r in ts.rows for t in r.targets if t[2] == TEXT]
    assert [t[1] for t in text] == body + [policy.eos_token_id]  # the plan, then EOS
    for r in ts.rows:  # every target is predicted from the position right before it
        for pos, tok, _ in r.targets:
            assert pos + 1 == len(r.ids) or r.ids[pos + 1] == tok or (mode == "continue" and tok == policy.eos_token_id)


def test_sft_loss_is_the_weighted_nll(seed, tmp_path):
    data = write_examples(tmp_path / "sft.jsonl", 6, seed)
    cfg = TrainerConfig.from_dict({
        "output_dir": str(tmp_path / "run"), "model": {"builder": "fastbicot.toy:build_policy", "seed": 3,
                                                       "gradient_checkpointing": False},
        "rollout": {"guidance_scale": 1.0, **TOY},
        "sft": {"data": data, "steps": 1, "batch_size": 6, "text_weight": 2.0, "image_weight": 1.0,
                "cond_dropout": 0.0, "seed": seed},
        "log": {"progress": False}})
    tr = SFTTrainer(cfg)
    exs = list(tr.examples)
    p = tr.policy
    hf = p.hf_model
    num, den = 0.0, 0.0
    with torch.no_grad():
        for ex in exs:  # independent: full logits through transformers' modules, log_softmax, gather
            ctx = tr.engine.cot_context(ex["prompt"])
            body = p.tokenizer.encode(ex["cot"], add_special_tokens=False)
            cot = body + [p.eos_token_id]
            h = hf.model.language_model(inputs_embeds=hf.model.language_model.embed_tokens(
                torch.tensor([ctx + cot[:-1]]))).last_hidden_state[0]
            lp = torch.log_softmax(hf.lm_head(h[len(ctx) - 1:]), -1).gather(-1, torch.tensor(cot)[:, None])
            ictx, _ = tr.engine.image_context(ctx, ex["prompt"], body, p.tokenizer.decode(body))
            img = torch.tensor(ex["image_tokens"])
            e = torch.cat([hf.model.language_model.embed_tokens(torch.tensor([ictx])),
                           hf.prepare_embeddings_for_image_generation(img[None, :-1])], 1)
            h = hf.model.language_model(inputs_embeds=e).last_hidden_state[0]
            li = torch.log_softmax(hf.model.generation_head(h[len(ictx) - 1:]), -1).gather(-1, img[:, None])
            num += -(2.0 * lp.sum() + li.sum())
            den += 2.0 * len(cot) + len(img)
    tr.rng.shuffle = lambda x: None  # keep the file order so the step sees exactly `exs`
    m = tr.step()
    assert m["loss"] == pytest.approx(float(num / den), rel=2e-5)


def test_cond_dropout_blanks_prompt_and_plan(seed):
    policy = build_policy(seed=1)
    engine = RolloutEngine(policy, guidance_scale=1.0, **TOY)
    ex = {"prompt": "a red square", "cot": "red square at top left", "image_tokens": [0] * 64}
    row = next(r for r in example_sample(engine, ex, drop=True).rows if r.kind == "image")
    ctx = row.ids[: row.n_text]
    assert ctx == [policy.bos_token_id] + [policy.pad_token_id] * (len(ctx) - 2) + [policy.boi_token_id]


@pytest.mark.parametrize("edit,needle", [
    ({"image_tokens": [1, 2, 3]}, "3 image tokens, the model makes 64"),
    ({"image_tokens": [999] * 64}, "image token 999 outside the codebook"),
    ({"prompt": 7}, "field 'prompt' must be a string"),
    ({"cot": None}, "field 'cot' must be a string"),
    ({"image_tokens": "0 1 2"}, "must be a list of integers"),
])
def test_malformed_sft_files_name_file_and_line(tmp_path, edit, needle):
    path = tmp_path / "bad.jsonl"
    write_examples(path, 3, 0)
    lines = path.read_text().splitlines()
    lines[1] = json.dumps({**json.loads(lines[1]), **edit})
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(SFTDataError, match=rf"bad.jsonl:2: .*{needle}"):
        load_sft_examples(path, 64, 71)
    path.write_text('{"prompt": "x", "cot": "y", "image_tokens": [0]}\n{oops\n')
    with pytest.raises(SFTDataError, match="bad.jsonl:1: 1 image tokens"):
        load_sft_examples(path, 64, 71)
    path.write_text('{"prompt": "x", "cot": "y", "image_tokens": [0]}\n{oops\n')
    with pytest.raises(SFTDataError, match="bad.jsonl:2: invalid JSON"):
        load_sft_examples(path, 1, 71)


def test_reasongen_field_names_are_accepted(tmp_path):
    path = tmp_path / "rg.jsonl"
    path.write_text(json.dumps({"instruction": "a red square", "thinking": "red square at top left",
                                "image_tokens": [0] * 64, "source": "x"}) + "\n")
    (ex,) = load_sft_examples(path, 64, 71)
    assert (ex["prompt"], ex["cot"], ex["metadata"]) == ("a red square", "red square at top left", {"source": "x"})
