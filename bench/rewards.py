"""Throughput (images/s) of every reward, on the T2I-R1 metadata mix.

    python bench/rewards.py --device cpu                 # tiny configs, a laptop
    python bench/rewards.py --device cuda --batch 64     # real architecture sizes, random weights
    python bench/rewards.py --checkpoint HPSReward=/ckpt/hps  # any model reward from a local checkpoint

Rule-based rewards: the detector rules over a synthetic detector (random boxes for every queried
phrase, so the time is the rules' own), and the remote judge client against a loopback server that
answers instantly (PNG encoding + HTTP overhead per image). Model-backed rewards come from
fastbicot.rewards.models when present: the CLIP family (CLIPScore ViT-L/14, PickScore and HPS v2.1
ViT-H/14) is built with random weights at the real sizes on CUDA or tiny sizes on CPU, anything else
only from --checkpoint; missing ones are reported as skipped. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

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
    "vit-l-14": dict(vision=(1024, 24, 16, 4096), text=(768, 12, 12, 3072), proj=768),
    "vit-h-14": dict(vision=(1280, 32, 16, 5120), text=(1024, 24, 16, 4096), proj=1024),
    "tiny": dict(vision=(64, 2, 2, 128), text=(64, 2, 2, 128), proj=32),
}


def build_clip_family(cls_name, arch, device):
    from transformers import CLIPConfig, CLIPModel

    import fastbicot.rewards.models as M

    s = CLIP_SIZES[arch]
    side = 224 if arch != "tiny" else 56
    tok = _word_tokenizer()
    v, t = s["vision"], s["text"]
    cfg = CLIPConfig(
        vision_config=dict(
            hidden_size=v[0],
            num_hidden_layers=v[1],
            num_attention_heads=v[2],
            intermediate_size=v[3],
            image_size=side,
            patch_size=14,
        ),
        text_config=dict(
            hidden_size=t[0],
            num_hidden_layers=t[1],
            num_attention_heads=t[2],
            intermediate_size=t[3],
            vocab_size=max(len(tok), 49408 if arch != "tiny" else 0),
            max_position_embeddings=77,
            bos_token_id=0,
            eos_token_id=2,
        ),  # 2: legacy CLIP pooling at the argmax id
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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--size", type=int, default=384, help="image side in pixels (Janus: 384)")
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument(
        "--checkpoint",
        action="append",
        default=[],
        metavar="CLASS=DIR",
        help="bench fastbicot.rewards.models.CLASS.from_pretrained(DIR)",
    )
    ap.add_argument("--json", default="bench/out/rewards.json")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    images = torch.randint(0, 256, (args.batch, args.size, args.size, 3), dtype=torch.uint8, device=device)
    metadata = [PROMPTS[i % len(PROMPTS)] for i in range(args.batch)]
    prompts = [m["prompt"] for m in metadata]

    results = {}

    def run(name, build):
        try:
            reward = build()
        except Exception as e:  # a missing optional model must not stop the others
            results[name] = {"skipped": f"{type(e).__name__}: {e}"[:200]}
            return
        results[name] = time_reward(reward, images, prompts, metadata, args.iters)
        del reward

    run("detector_rules (synthetic detections)", lambda: DetectorReward(random_detector).to(device))
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Instant)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    run("remote_judge (loopback, instant answer)", lambda: RemoteJudgeReward(url, "m", max_concurrency=8))
    httpd.shutdown()

    try:
        import fastbicot.rewards.models as M
    except ImportError as e:
        M = None
        results["fastbicot.rewards.models"] = {"skipped": f"not importable: {e}"}
    if M is not None:
        checkpoints = dict(c.split("=", 1) for c in args.checkpoint)
        for cls_name in [*RANDOM_BUILDERS, *OTHER_MODEL_REWARDS]:
            if cls_name in checkpoints:
                run(
                    f"{cls_name} ({checkpoints[cls_name]})",
                    lambda c=cls_name: getattr(M, c).from_pretrained(checkpoints[c], device=device),
                )
            elif cls_name in RANDOM_BUILDERS:
                arch = RANDOM_BUILDERS[cls_name] if device.type == "cuda" else "tiny"
                run(
                    f"{cls_name} ({arch}, random)", lambda c=cls_name, a=arch: build_clip_family(c, a, device)
                )
            else:
                results[cls_name] = {"skipped": "needs --checkpoint CLASS=DIR (no random-weight builder)"}

    dev_name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"rewards on {dev_name}, batch {args.batch}, {args.size}x{args.size} images, {args.iters} iters")
    print(f"{'reward':<48} {'ms/batch':>10} {'images/s':>10}")
    for name, r in results.items():
        if "skipped" in r:
            print(f"{name:<48} {'skipped: ' + r['skipped']}")
        else:
            print(f"{name:<48} {r['ms_per_batch']:>10.2f} {r['images_per_s']:>10.1f}")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "device": dev_name,
                "batch": args.batch,
                "size": args.size,
                "iters": args.iters,
                "torch": torch.__version__,
                "results": results,
            },
            indent=2,
        )
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
