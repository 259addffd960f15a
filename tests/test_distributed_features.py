"""Trainer features under torchrun, each checked as 2 gloo ranks = 1 process on the same global batch:
DAPO's dynamic sampling (the refill), LoRA under FSDP2 (and its 2-rank checkpoint resumed in 1 process),
several optimizer steps per rollout with a token budget that splits the ranks' shares unevenly.
(tests/test_distributed.py: the plain run, checkpoints and failures.) Each run is a fresh process."""

import json
import sys

import pytest
from helpers import SMALL, WORKER, close_metrics, ok, run, torchrun


def test_dynamic_sampling_refills_the_same_batch_on_two_ranks_as_on_one(tmp_path):
    """Most groups score no reward spread (tests/dist_worker.py ``gated_reward``): the refill generates
    batches of uneven size (odd ones split unevenly over the ranks, one group leaves a rank without work)
    until 4 groups are kept. 2 ranks must train on the very batch 1 process does: every sample, the
    refill counts, the losses and the updated weights."""
    args = [*SMALL, "--steps=2", "--advantage.filter_zero_std=true", "--advantage.refill=new_prompts",
            "--advantage.max_gen_batches=0"]
    ok(run(torchrun(2, WORKER, str(tmp_path / "w2.json"), "--gated-reward", *args,
                       f"--output_dir={tmp_path / 'r2'}")))
    ok(run([sys.executable, WORKER, str(tmp_path / "w1.json"), "--gated-reward", *args,
              f"--output_dir={tmp_path / 'r1'}"]))
    w1, w2 = (json.loads((tmp_path / f"w{n}.json").read_text()) for n in (1, 2))
    rounds = [s["metrics"]["groups/gen_batches"] for s in w1["steps"]]
    assert max(rounds) >= 2, rounds  # the refill ran
    for s1, s2 in zip(w1["steps"], w2["steps"], strict=True):
        assert len(s1["samples"]) == 16 and s1["samples"] == s2["samples"]
        assert all(any(x[4] != 0 for x in s1["samples"] if x[0] == g) for g in range(4))  # all kept have a spread
        for k in ("groups/gen_batches", "groups/refilled", "groups/first_batch_kept"):
            assert s1["metrics"][k] == s2["metrics"][k], k
        close_metrics(s1["metrics"], s2["metrics"], rtol=1e-5)
    for name, v1 in w1["params"].items():
        assert v1 == pytest.approx(w2["params"][name], abs=2e-6), name


def test_lora_on_two_ranks_equals_one_process_and_resumes_in_one(tmp_path):
    """LoRA adapters inside FSDP2 units (frozen base weights and trainable adapters sharded together; the
    KL reference is the policy with its adapters disabled, through the FSDP root): 2 ranks give the
    rollouts, losses and adapter weights of 1 process, and the 2-rank checkpoint (adapter gathered into
    peft's format, masters by DCP) continues in 1 process as the uninterrupted run."""
    pytest.importorskip("peft")
    args = [*SMALL, "--steps=2", "--lora.enabled=true", "--lora.r=4", "--lora.alpha=8"]
    ok(run(torchrun(2, WORKER, str(tmp_path / "w2.json"), *args, f"--output_dir={tmp_path / 'r2'}",
                       "--checkpoint.every=1")))
    ok(run([sys.executable, WORKER, str(tmp_path / "w1.json"), *args, f"--output_dir={tmp_path / 'r1'}"]))
    ckpt = tmp_path / "r2" / "checkpoint-000001"
    ok(run([sys.executable, WORKER, str(tmp_path / "wr.json"), "--resume", str(ckpt), *args,
              f"--output_dir={tmp_path / 'r2'}"]))
    w1, w2, wr = (json.loads((tmp_path / f"w{n}.json").read_text()) for n in ("1", "2", "r"))
    assert w1["params"] and all(".lora_" in n for n in w1["params"])  # only the adapters train
    for s1, s2 in zip(w1["steps"], w2["steps"], strict=True):
        assert s1["samples"] == s2["samples"]
        close_metrics(s1["metrics"], s2["metrics"], rtol=1e-5)
    assert w1["steps"][1]["metrics"]["kl"] > 0  # the adapters moved the policy away from the reference
    assert wr["steps"][0]["samples"] == w1["steps"][1]["samples"]
    close_metrics(wr["steps"][0]["metrics"], w1["steps"][1]["metrics"], rtol=1e-5)
    for name, v1 in w1["params"].items():
        assert w2["norms"][name] > 0, name
        assert v1 == pytest.approx(w2["params"][name], abs=2e-6), name
        assert v1 == pytest.approx(wr["params"][name], abs=2e-6), name
    from safetensors.torch import load_file

    saved = load_file(str(ckpt / "adapter_model.safetensors"))  # gathered, not one rank's shard
    assert len(saved) == len(w1["params"]) and all(".lora_" in k for k in saved)
    for k, v in saved.items():
        assert (v.shape[0] if "lora_A" in k else v.shape[1]) == 4, (k, v.shape)
        assert (v.shape[1] if "lora_A" in k else v.shape[0]) >= 64, (k, v.shape)  # full width, not a half


def test_mini_batches_and_token_budget_on_two_ranks_equal_one_process(tmp_path):
    """optim.mini_batches=2 (two optimizer steps per rollout, the second off-policy) with a token budget
    that cuts each rank's groups into a different number of micro-batches (the ranks with fewer repeat
    their last one with weight 0, so every rank runs the same forwards; with this seeded toy run, rank 1
    cuts one mini-batch into 4 pieces where rank 0 has 5): 2 ranks = 1 process. The rollouts run one
    prompt group per pass (rollout.prompts_per_pass=1: the same samples, inside FSDP's unshard too)."""
    args = [*SMALL, "--steps=2", "--optim.mini_batches=2", "--optim.micro_batch_tokens=130",
            "--rollout.prompts_per_pass=1"]
    ok(run(torchrun(2, WORKER, str(tmp_path / "w2.json"), *args, f"--output_dir={tmp_path / 'r2'}")))
    ok(run([sys.executable, WORKER, str(tmp_path / "w1.json"), *args, f"--output_dir={tmp_path / 'r1'}"]))
    w1, w2 = (json.loads((tmp_path / f"w{n}.json").read_text()) for n in (1, 2))
    for s1, s2 in zip(w1["steps"], w2["steps"], strict=True):
        assert s1["samples"] == s2["samples"]
        close_metrics(s1["metrics"], s2["metrics"], rtol=1e-5)
    for name, v1 in w1["params"].items():
        assert v1 == pytest.approx(w2["params"][name], abs=2e-6), name
