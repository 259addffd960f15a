"""The toy world's words: colours, counts, positions, the CoT template, and a word-level tokenizer.

Everything the toy policy ever reads or writes -- prompts, plans, the CoT template and the
engine's image-context template ("User: {prompt}. {cot}\\n\\nAssistant:") -- is built from the
words below, so a word-level vocabulary of 46 entries covers it and the text head stays tiny.
"""

from __future__ import annotations

# Object colours in codebook order (image code 1 + index); code 0 is the background.
# uint8 RGB, chosen far apart so nearest-colour classification of pixels is unambiguous.
COLORS = {
    "red": (230, 30, 30),
    "green": (30, 180, 60),
    "blue": (40, 90, 235),
    "yellow": (240, 220, 40),
    "purple": (150, 60, 200),
    "orange": (250, 140, 20),
    "white": (240, 240, 240),
}
BACKGROUND = (0, 0, 0)

COUNT_WORDS = ("zero", "one", "two", "three", "four")  # index = number
ROWS = ("top", "middle", "bottom")  # slot rows, top to bottom
COLS = ("left", "center", "right")  # slot columns, left to right

# Spatial relations of the prompts: prompt wording -> spatial_info locality (a key of
# fastbicot.rewards.RELATIONS, T2I-CompBench wording).
RELATION_PHRASES = {
    "on the left of": "on the left of",
    "on the right of": "on the right of",
    "above": "above",
    "below": "below",
}

# The semantic-CoT prompt for the toy policy (RolloutEngine(template=, system=, instruction=)).
# Same shape as T2I-R1's template, short so the prefill stays cheap.
TOY_TEMPLATE = "{system}\n\nUser: {instruction}\n\nAssistant:"
TOY_SYSTEM = "you plan images of colored squares ."
TOY_INSTRUCTION = "plan the image : {prompt}"

# Special tokens (strings and ids). Ids 0..6; the words follow.
SPECIAL_TOKENS = {
    "pad": "<pad>",
    "bos": "<bos>",
    "eos": "<eos>",
    "unk": "<unk>",
    "boi": "<begin_of_image>",
    "eoi": "<end_of_image>",
    "image": "<image_placeholder>",
}
SPECIAL_IDS = {key: i for i, key in enumerate(SPECIAL_TOKENS)}

_PUNCTUATION = (".", ",", ":")
_PROMPT_WORDS = ("a", "an", "and", "square", "squares", "on", "the", "of", "left", "right", "above", "below")
_PLAN_WORDS = ("at",) + ROWS + COLS
_TEMPLATE_WORDS = ("user", "assistant", "you", "plan", "images", "image", "colored", "squares", "the")


def _words() -> list[str]:
    words = list(_PUNCTUATION) + list(COLORS) + list(COUNT_WORDS) + list(_PROMPT_WORDS)
    words += list(_PLAN_WORDS) + list(_TEMPLATE_WORDS)
    out, seen = [], set()
    for w in words:
        if w not in seen:
            seen.add(w)
            out.append(w)
    return out


WORDS = tuple(_words())


def build_tokenizer(extra_words=()):
    """A transformers ``PreTrainedTokenizerFast`` over a ``tokenizers`` WordLevel model.

    Text is lower-cased, split on whitespace, and every punctuation character is its own token, so
    any text made of ``WORDS`` round-trips token ids through encode -> decode -> encode (decode
    joins tokens with single spaces; newlines carry no token). Unknown words map to ``<unk>``.
    ``extra_words`` (e.g. the GoT variant's coordinates, ``toy/got.py``) follow ``WORDS``.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: SPECIAL_IDS[key] for key, tok in SPECIAL_TOKENS.items()}
    for w in tuple(WORDS) + tuple(w for w in extra_words if w not in WORDS):
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIAL_TOKENS["unk"]))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(behavior="isolated")]
    )
    tok.add_special_tokens(list(SPECIAL_TOKENS.values()))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=SPECIAL_TOKENS["bos"],
        eos_token=SPECIAL_TOKENS["eos"],
        pad_token=SPECIAL_TOKENS["pad"],
        unk_token=SPECIAL_TOKENS["unk"],
        additional_special_tokens=[SPECIAL_TOKENS[k] for k in ("boi", "eoi", "image")],
        clean_up_tokenization_spaces=False,
    )
