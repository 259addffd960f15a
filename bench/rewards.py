"""Throughput (images/s) of every reward, on the T2I-R1 metadata mix.

    python bench/rewards.py --device cpu                 # tiny configs, a laptop
    python bench/rewards.py --device cuda --batch 64     # real architecture sizes, random weights
    python bench/rewards.py --checkpoint HPSReward=/ckpt/hps  # any model reward from a local checkpoint

Rule-based rewards: the detector rules over a synthetic detector (random boxes for every queried
phrase, so the time is the rules' own), and the remote judge client against a loopback server that
answers instantly (PNG encoding + HTTP overhead per image). Model-backed rewards come from
fastbicot.rewards.learned when present: the CLIP family (CLIPScore ViT-L/14, PickScore and HPS v2.1
ViT-H/14) is built with random weights at the real sizes on CUDA or tiny sizes on CPU, anything else
only from --checkpoint; missing ones are reported as skipped. Prints a table and writes JSON.

Peak memory per reward (its construction + warm-up + timed calls): CUDA max_memory_allocated after
reset_peak_memory_stats (absolute, the reward's weights included); CPU the process's peak resident
set (VmHWM) after resetting it to the current RSS through /proc/self/clear_refs (whole process;
null where unavailable).

Every flag is checked at parse time (exit status 2, the flag named); the --json file is checked for
writability first and rewritten after every reward ("complete": false until the end); exit status 1
when a reward failed (one named with --checkpoint that cannot be built counts as failed; a model
reward merely absent is "skipped").
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

from fastbicot.bench_cli import write_json
from fastbicot.checks import ArgumentError, arg_type, check_int, check_writable_file
from fastbicot.rewards import DetectorReward, RemoteJudgeReward

PROMPTS = [  # one record per T2I-CompBench task type
    {
        "prompt": "a green bench and a red car",
        "task_type": "color",
        "nouns": ["bench", "car"],
        "attr_nouns": ["green bench", "red car"],
    },
    {
        "prompt": "a cat left of a sofa",
        "task_type": "spatial",
        "nouns": ["cat", "sofa"],
        "spatial_info": {"obj1": "cat", "obj2": "sofa", "locality": "left of"},
    },
    {
        "prompt": "two cats and three dogs",
        "task_type": "numeracy",
        "nouns": ["cat", "dog"],
        "numeracy_info": [{"obj_name": "cat", "num": 2}, {"obj_name": "dog", "num": 3}],
    },
    {
        "prompt": "three yellow ducks swim below a stone bridge",
        "task_type": "complex",
        "nouns": ["duck", "bridge"],
        "numeracy_info": [{"obj_name": "duck", "num": 3}],
        "spatial_info": {"obj1": "duck", "obj2": "bridge", "locality": "below"},
    },
    {
        "prompt": "a man is reading a newspaper while his dog sleeps",
        "task_type": "non",
        "nouns": ["man", "newspaper", "dog"],
    },
]


def random_detector(images, queries, per_phrase=4):
    rng = random.Random(0)
    out = []
    for q in queries:
        dets = []
        for phrase in q:
            for _ in range(per_phrase):
                x, y = rng.random() * 0.8, rng.random() * 0.8
                dets.append((phrase, rng.random(), (x, y, x + 0.2, y + 0.2)))
        out.append(dets)
    return out


class _Instant(BaseHTTPRequestHandler):
    reply = json.dumps(
        {
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "yes"},
                    "logprobs": {
                        "content": [
                            {
                                "token": "yes",
                                "logprob": -0.1,
                                "top_logprobs": [
                                    {"token": "yes", "logprob": -0.1},
                                    {"token": "no", "logprob": -2.4},
                                ],
                            }
                        ]
                    },
                }
            ]
        }
    )

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        data = self.reply.encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def _word_tokenizer(words=("a", "photo", "of")):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {
        w: i
        for i, w in enumerate(
            ["<unk>", "<pad>", "<eos>"] + sorted({*words} | {w for r in PROMPTS for w in r["prompt"].split()})
        )
    }
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>"
    )


# CLIP tower sizes: (hidden, layers, heads, mlp, projection); tiny ones for CPU
CLIP_SIZES = {
    "vit-l-14": {"vision": (1024, 24, 16, 4096), "text": (768, 12, 12, 3072), "proj": 768},
    "vit-h-14": {"vision": (1280, 32, 16, 5120), "text": (1024, 24, 16, 4096), "proj": 1024},
    "tiny": {"vision": (64, 2, 2, 128), "text": (64, 2, 2, 128), "proj": 32},
}


def build_clip_family(cls_name, arch, device):
    from transformers import CLIPConfig, CLIPModel

    import fastbicot.rewards.learned as M

    s = CLIP_SIZES[arch]
    side = 224 if arch != "tiny" else 56
    tok = _word_tokenizer()
    v, t = s["vision"], s["text"]
    cfg = CLIPConfig(
        vision_config={
            "hidden_size": v[0],
            "num_hidden_layers": v[1],
            "num_attention_heads": v[2],
            "intermediate_size": v[3],
            "image_size": side,
            "patch_size": 14,
        },
        text_config={
            "hidden_size": t[0],
            "num_hidden_layers": t[1],
            "num_attention_heads": t[2],
            "intermediate_size": t[3],
            "vocab_size": max(len(tok), 49408 if arch != "tiny" else 0),
            "max_position_embeddings": 77,
            "bos_token_id": 0,
            "eos_token_id": 2,
        },  # 2: legacy CLIP pooling at the argmax id
        projection_dim=s["proj"],
    )
    dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    model = CLIPModel(cfg).to(device=device, dtype=dtype).eval().requires_grad_(False)
    image_config = {
        "size": {"shortest_edge": side},
        "crop_size": {"height": side, "width": side},
        "do_center_crop": True,
        "resample": 3,
        "image_mean": [0.4815, 0.4578, 0.4082],
        "image_std": [0.2686, 0.2613, 0.2758],
    }
    return getattr(M, cls_name)(model, tok, image_config, device=device)


RANDOM_BUILDERS = {  # reward class -> architecture at real size
    "CLIPScoreReward": "vit-l-14",
    "PickScoreReward": "vit-h-14",
    "HPSReward": "vit-h-14",
}
OTHER_MODEL_REWARDS = ["GroundingDinoReward", "GitVQAReward", "ORMReward", "VLMJudgeReward"]


def time_reward(reward, images, prompts, metadata, iters):
    reward(images, prompts, metadata)  # warm-up (lazy init, cudnn autotune, connection setup)
    if images.is_cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        reward(images, prompts, metadata)
    if images.is_cuda:
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / iters
    return {"ms_per_batch": 1e3 * dt, "images_per_s": images.shape[0] / dt}


def _device(text):
    if text not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"must be 'cpu' or 'cuda', got {text!r}")
    if text == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError("cuda requested but CUDA is not available here; use --device cpu")
    return text


def _checkpoint(text):
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected CLASS=DIR, got {text!r}")
    cls_name, path = text.split("=", 1)
    known = [*RANDOM_BUILDERS, *OTHER_MODEL_REWARDS]
    if cls_name not in known:
        raise argparse.ArgumentTypeError(f"unknown reward class {cls_name!r}; choose from {known}")
    if not os.path.isdir(path):
        raise argparse.ArgumentTypeError(f"{cls_name}: checkpoint directory not found: {path!r}")
    return cls_name, path


def _rss_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"{field} not in /proc/self/status")


def _peak_start(device):
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return True
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_gb(device, started):
    if not started:
        return None
    if device.type == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 1e9
    try:
        return _rss_kib("VmHWM") * 1024 / 1e9
    except OSError:
        return None




def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    pos = arg_type(check_int, low=1)
    ap.add_argument("--device", type=_device, default="cpu")
    ap.add_argument("--batch", type=pos, default=16)
    ap.add_argument("--size", type=arg_type(check_int, low=8), default=384, help="image side in pixels (Janus: 384)")
    ap.add_argument("--iters", type=pos, default=3)
    ap.add_argument(
        "--checkpoint",
        type=_checkpoint,
        action="append",
        default=[],
        metavar="CLASS=DIR",
        help="bench fastbicot.rewards.learned.CLASS.from_pretrained(DIR)",
    )
    ap.add_argument("--json", default="bench/out/rewards.json", help="checked for writability first")
    args = ap.parse_args(argv)
    try:
        out = check_writable_file("--json", args.json)
    except ArgumentError as e:
        ap.error(f"argument {e}")
    checkpoints = dict(args.checkpoint)
    if len(checkpoints) != len(args.checkpoint):
        ap.error("argument --checkpoint: a class is named twice")
    device = torch.device(args.device)
    images = torch.randint(0, 256, (args.batch, args.size, args.size, 3), dtype=torch.uint8, device=device)
    metadata = [PROMPTS[i % len(PROMPTS)] for i in range(args.batch)]
    prompts = [m["prompt"] for m in metadata]

    results = {}
    dev_name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    doc = {
        "device": dev_name,
        "batch": args.batch,
        "size": args.size,
        "iters": args.iters,
        "torch": torch.__version__,
        "command": " ".join([os.path.basename(__file__), *(sys.argv[1:] if argv is None else argv)]),
        "peak_memory": (
            "CUDA max_memory_allocated per reward, reset before it (weights included)"
            if device.type == "cuda"
            else "CPU peak RSS (VmHWM) per reward, reset before it via /proc/self/clear_refs (whole process)"
        ),
        "complete": False,
        "results": results,
    }
    write_json(out, doc)

    def run(name, build, required=False):
        started = _peak_start(device)
        try:
            reward = build()
        except Exception as e:  # noqa: BLE001 -- a missing optional model must not stop the others
            key = "error" if required else "skipped"
            results[name] = {key: f"{type(e).__name__}: {e}"[:300]}
            write_json(out, doc)
            return
        try:
            results[name] = time_reward(reward, images, prompts, metadata, args.iters)
            results[name]["peak_mem_gb"] = _peak_gb(device, started)
        except Exception as e:  # noqa: BLE001 -- a reward failing is reported, the others still run
            results[name] = {"error": f"{type(e).__name__}: {e}"[:300]}
        write_json(out, doc)
        del reward

    run("detector_rules (synthetic detections)", lambda: DetectorReward(random_detector).to(device), True)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Instant)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    run("remote_judge (loopback, instant answer)", lambda: RemoteJudgeReward(url, "m", max_concurrency=8), True)
    httpd.shutdown()

    try:
        import fastbicot.rewards.learned as M
    except ImportError as e:
        M = None
        results["fastbicot.rewards.learned"] = {
            ("error" if checkpoints else "skipped"): f"not importable: {e}"
        }
    if M is not None:
        for cls_name in [*RANDOM_BUILDERS, *OTHER_MODEL_REWARDS]:
            if cls_name in checkpoints:
                run(
                    f"{cls_name} ({checkpoints[cls_name]})",
                    lambda c=cls_name: getattr(M, c).from_pretrained(checkpoints[c], device=device),
                    required=True,
                )
            elif cls_name in RANDOM_BUILDERS:
                arch = RANDOM_BUILDERS[cls_name] if device.type == "cuda" else "tiny"
                run(
                    f"{cls_name} ({arch}, random)", lambda c=cls_name, a=arch: build_clip_family(c, a, device)
                )
            else:
                results[cls_name] = {"skipped": "needs --checkpoint CLASS=DIR (no random-weight builder)"}
    doc["complete"] = True
    write_json(out, doc)

    print(f"rewards on {dev_name}, batch {args.batch}, {args.size}x{args.size} images, {args.iters} iters")
    print(f"{'reward':<48} {'ms/batch':>10} {'images/s':>10} {'peak GB':>8}")
    for name, r in results.items():
        if "skipped" in r:
            print(f"{name:<48} {'skipped: ' + r['skipped']}")
        elif "error" in r:
            print(f"{name:<48} {'FAILED: ' + r['error']}")
        else:
            mem = "-" if r.get("peak_mem_gb") is None else f"{r['peak_mem_gb']:.2f}"
            print(f"{name:<48} {r['ms_per_batch']:>10.2f} {r['images_per_s']:>10.1f} {mem:>8}")
    print(f"wrote {out}")
    failed = [name for name, r in results.items() if "error" in r]
    if failed:
        print(f"FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
