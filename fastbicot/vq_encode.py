"""Images -> the policy's image tokens through its VQ encoder (the inverse direction of ``fastbicot.vq``).

SFT data whose examples name an image file instead of its tokens (ReasonGen-R1's data carries images) are
encoded here once, when the SFT stage loads them: the image is centre-cropped to a square, resized to the
VQ model's input size (``image_pixels``: Janus-Pro 384, bicubic as PIL does) and scaled to [-1, 1] as
ReasonGen-R1's ``preprocess_img`` (``verl/utils/dataset/sft_dataset.py:218-242``); its training split
crops at random instead (fastbicot crops the centre, so the tokens are a function of the file).
"""

from __future__ import annotations

import numpy as np
import torch


def image_pixels(policy) -> int:
    """The side, in pixels, of the images the policy's VQ model encodes and decodes."""
    levels = len(policy.vqmodel.config.channel_multiplier) - 1
    return int(policy.image_grid) * 2 ** levels


def load_image(path, size: int) -> np.ndarray:
    """float32 [3, size, size] in [-1, 1]: RGB, centre-cropped to a square, resized (bicubic)."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        w, h = im.size
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        im = im.crop((left, top, left + side, top + side))
        if side != size:
            im = im.resize((size, size), Image.BICUBIC)
        x = np.asarray(im, dtype=np.float32)
    return (x / 255.0 * 2 - 1).transpose(2, 0, 1).copy()


@torch.no_grad()
def encode_images(policy, pixels: torch.Tensor) -> torch.Tensor:
    """float [N, 3, S, S] in [-1, 1] -> int64 [N, num_image_tokens] (row-major codes)."""
    vq = policy.vqmodel
    w = next(vq.parameters())
    out = vq.encode(pixels.to(device=w.device, dtype=w.dtype)).image_tokens
    return out.reshape(pixels.shape[0], -1).cpu()


def encode_image_files(policy, paths, batch_size: int = 16) -> list[list[int]]:
    """The image tokens of each file in ``paths`` (see the module docstring)."""
    size, out = image_pixels(policy), []
    for i in range(0, len(paths), batch_size):
        batch = torch.from_numpy(np.stack([load_image(p, size) for p in paths[i:i + batch_size]]))
        out += encode_images(policy, batch).tolist()
    return out


__all__ = ["encode_image_files", "encode_images", "image_pixels", "load_image"]
