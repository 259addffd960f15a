"""Checkpoint converters into transformers' formats, each writing its output directory atomically.

* ``convert_janus(src_dir, dst_dir)``: a DeepSeek-format Janus-Pro / T2I-R1 checkpoint (the format of
  ``deepseek-ai/Janus-Pro-7B`` and of the seed's released T2I-R1 model: ``config.json`` with
  ``language_config`` / ``vision_config`` / ``gen_vision_config`` ..., weights named ``language_model.*``,
  ``vision_model.*``, ``gen_vision_model.*``, ``aligner.*``, ``gen_aligner.*``, ``gen_head.*``,
  ``gen_embed.*``) into transformers' ``JanusForConditionalGeneration`` format, loadable with
  ``fastbicot.JanusPolicy.from_pretrained(dst_dir)``.
* ``convert_orm(src_dir, dst_dir)``: the seed's ORM (LLaVA-NeXT ``llava_qwen`` format: ``model.*`` Qwen2
  weights, ``model.vision_tower.vision_tower.vision_model.*`` SigLIP, ``model.mm_projector.{0,2}``,
  ``model.image_newline``, ``lm_head``) into transformers' ``LlavaOnevisionForConditionalGeneration``.

Both write into a temporary directory next to ``dst_dir`` and rename it into place when everything is
written, so a failure never leaves a half-written checkpoint; an existing non-empty ``dst_dir`` is an
error unless ``overwrite=True``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path


class ConversionError(ValueError):
    """The source checkpoint is not in the expected format (the message names the file or key)."""


@contextlib.contextmanager
def atomic_output_dir(dst_dir, *, overwrite: bool = False):
    """Yield a fresh temporary directory; on success it replaces ``dst_dir`` (renamed into place),
    on an exception it is removed and ``dst_dir`` is untouched."""
    dst = Path(dst_dir)
    if dst.exists() and not dst.is_dir():
        raise FileExistsError(f"{str(dst)!r} exists and is not a directory")
    if dst.is_dir() and any(dst.iterdir()) and not overwrite:
        raise FileExistsError(f"{str(dst)!r} exists and is not empty (pass overwrite=True to replace it)")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if dst.exists():
        old = dst.parent / f".{dst.name}.old-{os.getpid()}"
        shutil.rmtree(old, ignore_errors=True)
        os.rename(dst, old)
    try:
        os.rename(tmp, dst)
    except BaseException:
        if old is not None:
            os.rename(old, dst)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
