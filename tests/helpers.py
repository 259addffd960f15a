"""Helpers shared by several test modules (fixtures live in conftest.py).

pytest puts tests/ on sys.path (rootdir-relative "prepend" imports), so test modules import these
with ``from helpers import ...``.
"""

import copy
import os
import subprocess
import sys

import torch
from transformers import JanusConfig, JanusForConditionalGeneration

from fastbicot.models import JanusPolicy
from fastbicot.models.tokenizer import build_byte_tokenizer
from fastbicot.rewards import FunctionReward

# --- a random Janus with the byte tokenizer (rollout, trunk and decode-step tests) -------------

IDS = {"bos": 256, "eos": 257, "pad": 258, "boi": 259, "eoi": 260, "image": 261}


def random_policy(
    hidden=40, layers=2, heads=5, grid=3, image_vocab=29, seed=0, dtype=torch.float64, scale=3.0
):
    """A random Janus of odd shapes (byte tokenizer ids). Weights are scaled up so that greedy
    decoding moves between many tokens instead of repeating one (a stronger parity check)."""
    torch.manual_seed(seed)
    config = JanusConfig(
        text_config=dict(
            model_type="llama",
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=heads,
            intermediate_size=2 * hidden + 6,
            vocab_size=264,
            max_position_embeddings=512,
            tie_word_embeddings=False,
            bos_token_id=IDS["bos"],
            eos_token_id=IDS["eos"],
            pad_token_id=IDS["pad"],
        ),
        vision_config=dict(
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=16 * grid,
            patch_size=16,
            num_image_tokens=grid * grid,
            projection_dim=hidden,
        ),
        vq_config=dict(
            embed_dim=8,
            num_embeddings=image_vocab,
            latent_channels=32,
            base_channels=32,
            channel_multiplier=[1, 2],
            num_patches=grid,
            projection_dim=hidden,
            image_token_embed_dim=hidden,
        ),
        image_token_id=IDS["image"],
        tie_word_embeddings=False,
    )
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        model = JanusForConditionalGeneration(config).eval()
    finally:
        torch.set_default_dtype(old)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(scale)
    g = model.generation_config
    g.bos_token_id, g.eos_token_id, g.pad_token_id = IDS["bos"], IDS["eos"], IDS["pad"]
    g.generation_kwargs = {"boi_token_id": IDS["boi"]}
    return JanusPolicy(model, build_byte_tokenizer(IDS))


# --- a tiny Trainer over three prompts (trainer tests) ------------------------------------------

SHORT = dict(template="{system} {instruction}", system="Plan.", instruction="Draw {prompt}:")
PROMPTS = ["a red cube", "two green dogs left of a cat", "x"]  # the data file make_trainer writes


def red_reward():
    return FunctionReward("red", lambda im, p, m, c: im[..., 0].double().mean((1, 2)) / 255 + 0.1 * len(c[0]))


def merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def seed_logps(model, emb_model, s):
    """Per-token log-probs of one sample, seed-style (CaraJ7/T2I-R1 ``_get_per_token_logps``): full
    logits, log_softmax, gather; the text embedded by ``emb_model`` (the seed feeds the reference the
    policy's input embeddings)."""
    hf, emb_hf = model.hf_model, emb_model.hf_model
    lm = hf.model.language_model

    def run(ids, img=None):
        e = emb_hf.model.language_model.embed_tokens(torch.tensor([ids]))
        if img is not None:
            e = torch.cat([e, emb_hf.prepare_embeddings_for_image_generation(img[None])], 1)
        return lm(inputs_embeds=e).last_hidden_state[0]

    c = len(s.cot_context_ids)
    h = run(s.cot_context_ids + s.cot_ids)[c - 1 : c - 1 + len(s.cot_ids)]
    cot = torch.log_softmax(hf.lm_head(h), -1).gather(-1, torch.tensor(s.cot_ids)[:, None])[:, 0]
    b, n = len(s.image_context_ids), len(s.image_tokens)
    h = run(s.image_context_ids, s.image_tokens[:-1])[b - 1 : b - 1 + n]
    img = torch.log_softmax(hf.model.generation_head(h), -1).gather(-1, s.image_tokens[:, None])[:, 0]
    return torch.cat([cot, img])


def make_trainer(seed, tmp_path, dtype="float64", policy=None, **sections):
    from fastbicot.trainer import Trainer, TrainerConfig  # here: the rollout tests import this module too

    tmp_path.mkdir(parents=True, exist_ok=True)
    data = tmp_path / "prompts.txt"
    data.write_text("\n".join(PROMPTS))
    base = dict(
        output_dir=str(tmp_path / "run"), steps=3, seed=seed,
        model=dict(preset="tiny", dtype=dtype, seed=seed),
        data=dict(prompts=str(data), prompts_per_step=3, shuffle=False),
        rollout=dict(num_generations=4, cot=dict(max_new_tokens=6), **SHORT),
        log=dict(progress=False),
    )
    cfg = TrainerConfig.from_dict(merge(base, sections))
    ref = None
    if policy is None:
        policy = JanusPolicy.from_preset("tiny", seed=seed, dtype=getattr(torch, cfg.model.dtype))
    if cfg.loss.beta > 0:
        ref = copy.deepcopy(policy)
        with torch.no_grad():  # a reference that differs from the policy: the KL term is not zero
            for p in ref.hf_model.model.language_model.parameters():
                p.add_(0.05 * torch.randn_like(p))
    return Trainer(cfg, policy=policy, rewards=[red_reward()], ref_policy=ref)


# --- the Triton-interpreter harness (kernel tests; the kernel_path fixture is in conftest.py) --

def run_triton_cases_in_fresh_interpreter(test_file):
    """Run ``test_file``'s Triton cases in a subprocess with TRITON_INTERPRET=1 and no GPU.

    Triton picks interpreter or compiler when a kernel is decorated (at import), so when something
    imported triton in this process without the interpreter switch, the 'triton' cases can only run
    in a fresh interpreter."""
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", test_file,
           "-k", "triton and not fresh"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


# --- multi-process training runs (tests/dist_worker.py under torchrun, and in one process) --------

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "dist_worker.py")
# the toy world made small: 4 prompt groups x 4 samples, short CoTs
SMALL = ["--sft.steps=0", "--data.prompts_per_step=4", "--rollout.num_generations=4", "--rollout.cot.max_new_tokens=8",
         "--log.progress=false", "--log.tensorboard=false", "--log.grid_every=0", "--distributed.timeout_s=300"]
TIMING = ("time/", "images_per_s")


def run_env():
    return dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1",
                PYTHONWARNINGS="ignore")


def run(cmd, timeout=900):
    return subprocess.run(cmd, cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=timeout, check=False)


def ok(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def torchrun(n, *args):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", *args]


def close_metrics(a, b, rtol):
    """Every metric of ``a`` (timings aside) in ``b`` and equal within ``rtol``."""
    import pytest

    for k, v in a.items():
        if k.startswith(TIMING):
            continue
        assert k in b, k
        assert v == pytest.approx(b[k], rel=rtol, abs=1e-7), (k, v, b[k])


# --- sampling statistics (cfg_sample and the rollout's keyed draws) ------------------------------

def chi2_pvalue(tokens, probs):
    """p-value of the draws `tokens` under `probs` [V]; draws outside the support fail outright."""
    counts = torch.bincount(tokens.cpu(), minlength=probs.numel()).double()
    assert counts[probs == 0].sum() == 0, f"drew tokens of probability 0: {(counts * (probs == 0)).nonzero()}"
    expected = counts.sum() * probs[probs > 0]
    counts = counts[probs > 0]
    order = expected.argsort()  # pool the rarest cells until the pool expects >= 5 draws
    expected, counts = expected[order], counts[order]
    cut = int((expected.cumsum(0) < 5).sum()) + 1
    exp = torch.cat([expected[:cut].sum()[None], expected[cut:]])
    obs = torch.cat([counts[:cut].sum()[None], counts[cut:]])
    if exp.numel() < 2:
        return 1.0
    stat = ((obs - exp) ** 2 / exp).sum()
    return float(torch.special.gammaincc(torch.tensor((exp.numel() - 1) / 2.0, dtype=torch.float64), stat / 2))
