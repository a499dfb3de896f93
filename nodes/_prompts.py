"""Prompts as token sequences for Prompt-to-Prompt: the node-side adapter from the host's CLIP object to
:mod:`editing.alignment`.

Needs nothing from comfy: it only calls ``clip.tokenize(text, return_word_ids=True)``, which returns
``{encoder_key: [[(token, weight, word_id), ...], ...chunks]}`` with keys such as "l", "g", "t5xxl", and reads
the vocabulary of the host's per-encoder tokenizer (``clip.tokenizer.clip_l.inv_vocab``, ...) where it has one.

The host's word ids are not words: it numbers the segments it parses (the text between weight brackets and
``embedding:`` names), so every token of "a photo of a cat" carries word id 1. The words P2P aligns are
recovered here from the vocabulary: a CLIP BPE token ending in ``</w>`` ends a word, a SentencePiece (T5) token
starting with ``▁`` starts one, and a new host segment always starts one. Word ids are then numbered 1, 2, ...
over the whole context sequence (all chunks and all chosen encoders), as :mod:`editing.alignment` expects.
Without a reachable vocabulary the host's segment ids are used as they are.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

from ..editing.alignment import AlignmentError, Token, find_word

log = logging.getLogger("retrace")

# Which encoders' tokens form the model's context sequence, tried in this order (matched on length).
KEY_CHOICES: tuple[tuple[str, ...], ...] = (
    ("l", "t5xxl"),  # SD3: CLIP tokens (l and g side by side in the features), then T5 tokens along the sequence
    ("t5xxl",),  # Flux
    ("l",),  # SD1.x, SDXL ("g" has the same positions)
    ("g",),
)

EMBEDDING_TOKEN = -1  # token id given to a textual-inversion embedding vector (it has no id in the vocabulary)


def _raw(clip: Any, text: str) -> dict[str, list[tuple[Any, int]]]:
    """Per encoder key: the flattened chunks as (token, host word id), weights dropped."""
    tokenized = clip.tokenize(text, return_word_ids=True)
    return {key: [(item[0], int(item[2])) for chunk in chunks for item in chunk] for key, chunks in tokenized.items()}


def _choose(lengths: dict[str, int], context_length: int) -> list[str]:
    for keys in KEY_CHOICES:
        if all(k in lengths for k in keys) and sum(lengths[k] for k in keys) == context_length:
            return list(keys)
    for key, length in lengths.items():
        if length == context_length:
            return [key]
    listed = ", ".join(f"'{k}': {n}" for k, n in lengths.items())
    raise ValueError(f"no encoder's tokens match the conditioning's {context_length} tokens (tokens per encoder: "
                     f"{listed}); give the conditioning made from this prompt with this CLIP (its shape[1] is "
                     f"the context length).")


def _vocabulary(clip: Any, key: str) -> Optional[dict[int, str]]:
    """The id -> string vocabulary of the host tokenizer behind encoder ``key``, if it can be reached."""
    tokenizer = getattr(clip, "tokenizer", None)
    for name in (f"clip_{key}", key):
        vocab = getattr(getattr(tokenizer, name, None), "inv_vocab", None)
        if isinstance(vocab, dict):
            return vocab
    return None


def _words(raw: list[tuple[Any, int]], vocab: Optional[dict[int, str]], first: int) -> tuple[list[Token], int]:
    """(token_id, word_id) with words recovered from the vocabulary, numbered from ``first``; and the next id."""
    bpe = vocab is not None and any(s.endswith("</w>") for s in vocab.values())
    tokens: list[Token] = []
    next_id = first
    current = 0  # word id of the word being read, 0 when none is open
    host_segment = None
    for token, host_id in raw:
        token_id = int(token) if isinstance(token, int) else EMBEDDING_TOKEN
        if host_id == 0:
            tokens.append((token_id, 0))  # a chunk boundary does not close a word: long words span chunks
            continue
        text = vocab.get(token_id, "") if vocab is not None else ""
        new = current == 0 or host_id != host_segment or (vocab is not None and not bpe and text.startswith("▁"))
        if new:
            current, next_id = next_id, next_id + 1
        host_segment = host_id
        tokens.append((token_id, current))
        if bpe and text.endswith("</w>"):
            current = 0
    return tokens, next_id


def _segments(clip: Any, text: str, context_length: int) -> list[tuple[str, int, list[Token]]]:
    """(key, start in the context sequence, tokens) for every encoder that forms the context sequence."""
    raw = _raw(clip, text)
    keys = _choose({k: len(v) for k, v in raw.items()}, context_length)
    segments = []
    start, next_id = 0, 1
    for key in keys:
        vocab = _vocabulary(clip, key)
        if vocab is None:
            log.debug("no vocabulary for encoder '%s': words are the host's prompt segments", key)
        tokens, next_id = _words(raw[key], vocab, next_id)
        segments.append((key, start, tokens))
        start += len(tokens)
    return segments


def context_tokens(clip: Any, text: str, context_length: int) -> list[Token]:
    """The prompt's tokens ``(token_id, word_id)`` at the positions of the model's context sequence.

    ``context_length`` is the conditioning's token count (``cond.shape[1]``); it decides which encoders' tokens
    form the sequence (SD3: "l" then "t5xxl"; Flux: "t5xxl"; SD1.x, SDXL: "l"). Raises ValueError when no
    choice of encoders has that length."""
    return [token for _, _, tokens in _segments(clip, text, context_length) for token in tokens]


def word_token_ids(clip: Any, word: str, key: str) -> list[int]:
    """The token ids of ``word`` (a word or phrase) alone in encoder ``key``: its tokens without specials."""
    raw = _raw(clip, word)
    if key not in raw:
        raise AlignmentError(f"this CLIP has no encoder '{key}' (it has {sorted(raw)}); pick one of those.")
    return [token_id for token_id, word_id in _words(raw[key], None, 1)[0] if word_id != 0]


def word_positions(clip: Any, text: str, context_length: int, words: str, warn: bool = True) -> list[int]:
    """Positions in the context sequence of all occurrences of the comma-separated ``words`` ("dog, red hat").

    Every word is searched in each chosen encoder's segment of the sequence. Returns sorted positions; ``[]``
    for empty ``words``. Raises AlignmentError naming the word and the prompt if a word is in none of them."""
    wanted = [w.strip() for w in words.split(",") if w.strip()]
    if not wanted:
        return []
    segments = _segments(clip, text, context_length)
    found: set[int] = set()
    for word in wanted:
        hits: list[int] = []
        for key, start, tokens in segments:
            try:
                hits += [start + p for p in find_word(tokens, word_token_ids(clip, word, key), word)]
            except AlignmentError:
                if warn:
                    log.warning("Retrace: '%s' is not among the '%s' tokens of the prompt %r", word, key, text)
        if not hits:
            raise AlignmentError(f"the word {word!r} is not in the prompt {text!r}; give words that the prompt "
                                 f"contains, separated by commas.")
        found.update(hits)
    return sorted(found)
