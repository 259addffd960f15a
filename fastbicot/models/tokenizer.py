"""A byte-level tokenizer built in code (no files, no downloads).

Used by the random-weight presets: every UTF-8 byte is one token (ids 0..255), and the special
tokens sit at the ids the preset's model expects (for the Janus-Pro presets, the real Janus ids),
so prompts and CoT text round-trip exactly for any Unicode input.
"""

from __future__ import annotations

SPECIAL_TOKENS = {
    "bos": "<｜begin▁of▁sentence｜>",
    "eos": "<｜end▁of▁sentence｜>",
    "pad": "<｜▁pad▁｜>",
    "boi": "<begin_of_image>",
    "eoi": "<end_of_image>",
    "image": "<image_placeholder>",
}


def build_byte_tokenizer(special_ids: dict):
    """A byte-level fast tokenizer: bytes are ids 0..255, ``special_ids`` maps each key of
    SPECIAL_TOKENS (bos, eos, pad, boi, eoi, image) to a distinct integer id >= 256."""
    from ..checks import ArgumentError, check_int

    if not isinstance(special_ids, dict):
        raise ArgumentError(f"special_ids must be a dict {{name: id}}, got {type(special_ids).__name__}")
    absent = sorted(set(SPECIAL_TOKENS) - set(special_ids))
    if absent:
        raise ArgumentError(f"special_ids lacks {absent} (needs every one of {sorted(SPECIAL_TOKENS)})")
    ids = {k: check_int(f"special_ids[{k!r}]", special_ids[k], low=256) for k in SPECIAL_TOKENS}
    if len(set(ids.values())) != len(ids):
        raise ArgumentError(f"special_ids must be distinct, got {ids}")
    special_ids = ids
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    # ByteLevel maps byte b to a printable unicode char; order ids by byte value.
    byte_to_char = {b: c for b, c in zip(range(256), _bytes_to_unicode())}
    assert set(byte_to_char.values()) == set(alphabet)
    vocab = {byte_to_char[b]: b for b in range(256)}
    for key, token in SPECIAL_TOKENS.items():
        vocab[token] = special_ids[key]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIAL_TOKENS.values()))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=SPECIAL_TOKENS["bos"],
        eos_token=SPECIAL_TOKENS["eos"],
        pad_token=SPECIAL_TOKENS["pad"],
        additional_special_tokens=[SPECIAL_TOKENS[k] for k in ("boi", "eoi", "image")],
    )


def _bytes_to_unicode():
    """GPT-2's reversible byte -> printable-character map (the one ByteLevel uses)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    table = dict(zip(bs, cs))
    return [chr(table[b]) for b in range(256)]
