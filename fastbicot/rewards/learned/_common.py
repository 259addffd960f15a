"""Shared plumbing of the model-backed rewards: loading from a local directory, dtype choice,
on-device image preprocessing (uint8 NHWC -> normalised NCHW pixels) and batching.

Preprocessing runs in torch on the reward's device instead of through transformers' PIL image
processors: rewards see a full rollout batch every step and a CPU round trip per image would
dominate. It follows the processors' recipe (resize, round to uint8 as PIL does, centre crop,
rescale, normalise) with the sizes / mean / std read from the checkpoint's preprocessor_config.json.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
           "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
# PIL resample codes used in preprocessor_config.json -> torch interpolation modes
_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}


def resolve_dtype(dtype, device) -> torch.dtype:
    """None/"auto" -> bf16 on CUDA, fp32 elsewhere; otherwise a torch dtype or one of fp32/fp16/bf16."""
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype) and dtype in _DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in _DTYPES:
        return _DTYPES[dtype]
    raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, a matching torch dtype or 'auto', got {dtype!r}")


def read_config(local_dir, reward: str, model_types: tuple[str, ...]) -> dict:
    """config.json of a local checkpoint directory, checked to be one of ``model_types``."""
    path = Path(local_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"reward {reward!r}: checkpoint directory {str(path)!r} does not exist "
                                "(rewards load only from local directories; nothing is downloaded)")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"reward {reward!r}: {str(path)!r} has no config.json; expected a transformers "
                                f"checkpoint of model_type {' or '.join(model_types)}")
    config = json.loads(cfg_file.read_text())
    if config.get("model_type") not in model_types:
        raise ValueError(f"reward {reward!r}: {str(path)!r} holds a {config.get('model_type')!r} checkpoint, "
                         f"expected model_type {' or '.join(model_types)}")
    return config


def load_model(cls, local_dir, reward: str, model_types: tuple[str, ...], device, dtype):
    """``cls.from_pretrained(local_dir)`` offline, in eval mode, frozen, on ``device`` in ``dtype``."""
    read_config(local_dir, reward, model_types)
    model = cls.from_pretrained(str(local_dir), local_files_only=True, dtype=resolve_dtype(dtype, device))
    return model.to(device).eval().requires_grad_(False)


def read_image_config(local_dir, reward: str) -> dict:
    """preprocessor_config.json of a local checkpoint directory."""
    path = Path(local_dir) / "preprocessor_config.json"
    if not path.is_file():
        raise FileNotFoundError(f"reward {reward!r}: {str(path)!r} is missing (image sizes, mean and std come "
                                "from it; save the processor with save_pretrained next to the model)")
    return json.loads(path.read_text())


def _hw(size) -> tuple[int, int] | None:
    if size is None:
        return None
    if isinstance(size, int):
        return size, size
    if "height" in size and "width" in size:
        return int(size["height"]), int(size["width"])
    return None


def resize_hw(h: int, w: int, size) -> tuple[int, int]:
    """Output size of transformers' resize for ``size`` = {shortest_edge[, longest_edge]} or {height, width}."""
    fixed = _hw(size)
    if fixed is not None:
        return fixed
    short, longest = int(size["shortest_edge"]), size.get("longest_edge")
    if longest is not None and max(h, w) / min(h, w) * short > longest:  # DETR rule: cap the long side
        short = round(longest * min(h, w) / max(h, w))
    if (h <= w and h == short) or (w <= h and w == short):
        return h, w
    return (int(short * h / w), short) if w < h else (short, int(short * w / h))


def preprocess(images: torch.Tensor, image_config: dict, dtype: torch.dtype) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> normalised [N, 3, H', W'] pixels in ``dtype`` on the images' device.

    Follows transformers' image processors: resize (``size``, ``resample``), round to uint8 as PIL
    does, centre crop (``crop_size`` when ``do_center_crop``), rescale by 1/255, normalise with
    ``image_mean`` / ``image_std``.
    """
    x = images.permute(0, 3, 1, 2).float()
    if image_config.get("do_resize", True) and image_config.get("size") is not None:
        oh, ow = resize_hw(x.shape[2], x.shape[3], image_config["size"])
        if (oh, ow) != tuple(x.shape[2:]):
            mode = _RESAMPLE.get(image_config.get("resample", 3), "bicubic")
            x = F.interpolate(x, size=(oh, ow), mode=mode, antialias=mode != "nearest",
                              **({} if mode == "nearest" else {"align_corners": False}))
            x = x.round().clamp(0, 255)
    crop = _hw(image_config.get("crop_size"))
    if image_config.get("do_center_crop", False) and crop is not None:
        ch, cw = crop
        if ch > x.shape[2] or cw > x.shape[3]:  # transformers pads with zeros before cropping
            ph, pw = max(ch - x.shape[2], 0), max(cw - x.shape[3], 0)
            x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
        top, left = (x.shape[2] - ch) // 2, (x.shape[3] - cw) // 2
        x = x[:, :, top:top + ch, left:left + cw]
    if image_config.get("do_rescale", True):
        x = x * float(image_config.get("rescale_factor", 1 / 255))
    if image_config.get("do_normalize", True):
        mean = torch.tensor(image_config["image_mean"], device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(image_config["image_std"], device=x.device).view(1, 3, 1, 1)
        x = (x - mean) / std
    return x.to(dtype).contiguous()


def batch_slices(n: int, batch_size: int):
    """slice objects covering range(n) in chunks of ``batch_size``."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    return [slice(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]


def single_token_id(tokenizer, word: str, reward: str) -> int:
    """The id of ``word`` as one token of ``tokenizer`` (yes/no scoring needs single-token answers)."""
    ids = tokenizer.encode(word, add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(f"reward {reward!r}: answer word {word!r} is {len(ids)} tokens {ids} for this tokenizer; "
                         "yes/no scoring needs a single-token word")
    return ids[0]
