"""Token alignment for Prompt-to-Prompt (Hertz et al. 2023, "Prompt-to-Prompt Image Editing with Cross-Attention
Control", and its ``seq_aligner.py``), on token sequences as the host tokenizes them.

A token is a pair ``(token_id, word_id)``. ``word_id`` 0 marks special tokens (start, end, padding); the words
of a prompt carry ids 1, 2, ... in order, unique over the whole sequence. A sequence may hold several 77-token
chunks one after the other (long prompts), so special tokens can also stand in the middle, and a long word can
be cut in two by a chunk boundary (its tokens keep one word id).

- :func:`replace_mapper`: word swap ("a cat" -> "a dog"), P2P's replacement mapper.
- :func:`refine_alignment`: added words ("a cat" -> "a fluffy cat"), P2P's refinement: a global
  (Needleman-Wunsch) alignment of the token ids.
- :func:`find_word`: where a word's tokens stand (P2P's ``get_word_inds``, in token terms) for reweighting
  and local blending.
- :func:`changed_tokens`: the word tokens an edit changes, in each prompt (local blend's automatic words).

No ComfyUI import here.
"""

from __future__ import annotations

import logging
from typing import Optional, Sequence

import torch

log = logging.getLogger("retrace")

Token = tuple[int, int]


class AlignmentError(ValueError):
    """Two prompts, or a prompt and a word, cannot be aligned as asked."""


def _split(tokens: Sequence[Token], name: str) -> tuple[list[int], list[int]]:
    """Token ids and word ids of a token sequence, checked."""
    if len(tokens) == 0:
        raise AlignmentError(f"the {name} token sequence is empty; tokenize the prompt first (it needs at least "
                             f"its start or end token).")
    ids: list[int] = []
    words: list[int] = []
    for position, token in enumerate(tokens):
        try:
            token_id, word_id = token
            token_id, word_id = int(token_id), int(word_id)
        except (TypeError, ValueError):
            raise AlignmentError(f"{name} token {position} is {token!r}; expected a pair (token_id, word_id) of "
                                 f"integers, e.g. from tokenize_with_weights(text, return_word_ids=True) with the "
                                 f"weight dropped.") from None
        if word_id < 0:
            raise AlignmentError(f"{name} token {position} has word id {word_id}; word ids are 0 for special "
                                 f"tokens and 1, 2, ... for the prompt's words.")
        ids.append(token_id)
        words.append(word_id)
    return ids, words


def _group(word_ids: list[int]) -> tuple[list[list[int]], list[int]]:
    """Positions of each word (in order of first appearance) and positions of the special tokens."""
    words: dict[int, list[int]] = {}
    specials: list[int] = []
    for position, word_id in enumerate(word_ids):
        if word_id == 0:
            specials.append(position)
        else:
            words.setdefault(word_id, []).append(position)
    return list(words.values()), specials


def replace_mapper(source: Sequence[Token], target: Sequence[Token]) -> torch.Tensor:
    """P2P's replacement mapper for a word swap: ``[len(target), len(source)]`` float32.

    Row ``t`` holds the weights with which target token ``t`` takes the source tokens' attention maps, so
    ``maps_target = mapper @ maps_source`` along the token axis. Word ``i`` of the source maps to word ``i`` of
    the target. Words of equal token counts map one to one. Where the counts differ (a word split into several
    tokens), every target token of the word takes the sum of the source word's maps divided by the target
    word's token count (P2P's ``ratio``), so the word's total attention mass is kept: each source token's column
    sums to 1 over the target word, and such a row sums to ``n_source / n_target``. Special tokens map in
    order (the k-th special of the target takes the k-th special of the source; surplus target specials take
    the source's last special). Identical prompts give the identity exactly.
    """
    _, source_words = _split(source, "source")
    _, target_words = _split(target, "target")
    source_groups, source_specials = _group(source_words)
    target_groups, target_specials = _group(target_words)
    if len(source_groups) != len(target_groups):
        raise AlignmentError(
            f"replace needs prompts with the same number of words: source has {len(source_groups)}, target has "
            f"{len(target_groups)}; use mode 'refine' to add words, or swap one word for one word.")
    mapper = torch.zeros(len(target_words), len(source_words), dtype=torch.float32)
    for source_positions, target_positions in zip(source_groups, target_groups):
        if len(source_positions) == len(target_positions):
            mapper[target_positions, source_positions] = 1.0
        else:
            rows = torch.tensor(target_positions)[:, None]
            mapper[rows, torch.tensor(source_positions)[None, :]] = 1.0 / len(target_positions)
    if target_specials and not source_specials:
        raise AlignmentError(
            f"the target has {len(target_specials)} special tokens but the source has none, so they have no "
            f"attention map to take; tokenize both prompts with the same tokenizer (start and end tokens kept).")
    for k, position in enumerate(target_specials):
        mapper[position, source_specials[min(k, len(source_specials) - 1)]] = 1.0
    log.debug("replace mapper: %d source tokens, %d target tokens, %d words", len(source_words), len(target_words),
              len(source_groups))
    return mapper


def _global_alignment(x: list[int], y: list[int], match: int, mismatch: int,
                      gap: int) -> list[tuple[int, int]]:
    """Needleman-Wunsch alignment of ``x`` (source) and ``y`` (target): the aligned pairs ``(i, j)``.

    Row by row in torch: with ``t[j] = max(diag, up)``, the row is ``m[j] = max(t[j], m[j-1] + gap)``, which is a
    running maximum of ``t[k] - k * gap`` plus ``j * gap``. The traceback prefers, as P2P's ``global_align``
    does, a new target token, then a skipped source token, then the diagonal, which aligns repeated tokens
    (padding, end tokens) leftmost.
    """
    n, m = len(x), len(y)
    ys = torch.tensor(y, dtype=torch.int64)
    steps = torch.arange(m + 1, dtype=torch.int64) * gap
    rows = torch.empty(n + 1, m + 1, dtype=torch.int64)
    rows[0] = steps
    for i in range(1, n + 1):
        score = torch.where(ys == x[i - 1], match, mismatch)
        best = torch.maximum(rows[i - 1, :-1] + score, rows[i - 1, 1:] + gap)
        best = torch.cat([torch.tensor([i * gap]), best])
        rows[i] = torch.cummax(best - steps, dim=0).values + steps
    table = rows.tolist()
    pairs: list[tuple[int, int]] = []
    i, j = n, m
    while i > 0 and j > 0:
        here = table[i][j]
        if here == table[i][j - 1] + gap:
            j -= 1
        elif here == table[i - 1][j] + gap:
            i -= 1
        else:
            i, j = i - 1, j - 1
            pairs.append((i, j))
    pairs.reverse()
    return pairs


def refine_alignment(source: Sequence[Token], target: Sequence[Token], *, match: int = 1, mismatch: int = -1,
                     gap: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """P2P's refinement mapper for added words: ``(index, alphas)``, both of length ``len(target)``.

    A global (Needleman-Wunsch) alignment of the token ids with P2P's scores (match +1, mismatch -1, gap 0).
    ``index[t]`` (int64) is the source position target token ``t`` is aligned to, 0 where none; ``alphas[t]``
    (float32) is 1 where that source token is the same token and 0 where the target token is new, so a refined
    map is ``alphas * maps_source[index] + (1 - alphas) * maps_target``. Identical prompts give
    ``index = arange`` and ``alphas = 1``.
    """
    source_ids, _ = _split(source, "source")
    target_ids, _ = _split(target, "target")
    index = torch.zeros(len(target_ids), dtype=torch.int64)
    alphas = torch.zeros(len(target_ids), dtype=torch.float32)
    for i, j in _global_alignment(source_ids, target_ids, match, mismatch, gap):
        index[j] = i
        if source_ids[i] == target_ids[j]:
            alphas[j] = 1.0
    log.debug("refine alignment: %d of %d target tokens kept from the source", int(alphas.sum()), len(target_ids))
    return index, alphas


def changed_tokens(source: Sequence[Token], target: Sequence[Token]) -> tuple[list[int], list[int]]:
    """The word tokens the edit changes: source positions and target positions that the global alignment of
    :func:`refine_alignment` does not pair with the same token. A swapped word is changed in both prompts, an added
    word in the target only, a removed one in the source only; special tokens never count. Unlike a word searched
    by :func:`find_word`, a word that also stands elsewhere unchanged ("a red cube and a red ball" -> "a blue cube
    and a red ball") counts only where it changes.
    """
    source_ids, source_words = _split(source, "source")
    target_ids, target_words = _split(target, "target")
    kept = [(i, j) for i, j in _global_alignment(source_ids, target_ids, 1, -1, 0) if source_ids[i] == target_ids[j]]
    kept_source = {i for i, _ in kept}
    kept_target = {j for _, j in kept}
    return ([i for i, w in enumerate(source_words) if w and i not in kept_source],
            [j for j, w in enumerate(target_words) if w and j not in kept_target])


def find_word(tokens: Sequence[Token], word_token_ids: Sequence[int], word: Optional[str] = None) -> list[int]:
    """All positions of all occurrences of a word's token ids in ``tokens`` (P2P's ``get_word_inds``).

    Only word tokens are searched (never start, end or padding tokens). ``word`` is the word as the user typed
    it, for the error message. Returns sorted positions; raises :class:`AlignmentError` if the word is absent.
    """
    ids, word_ids = _split(tokens, "prompt")
    needle = [int(t) for t in word_token_ids]
    label = repr(word) if word is not None else "the word"
    if not needle:
        raise AlignmentError(f"{label} has no tokens (received token ids {needle}); give a word that the "
                             f"tokenizer turns into at least one token.")
    found: set[int] = set()
    size = len(needle)
    for start in range(len(ids) - size + 1):
        if ids[start:start + size] == needle and all(word_ids[start:start + size]):
            found.update(range(start, start + size))
    if not found:
        words = [t for t, w in zip(ids, word_ids) if w]
        raise AlignmentError(f"{label} (token ids {needle}) is not in the prompt (word token ids {words}); give a "
                             f"word that the prompt contains, spelled as in the prompt.")
    return sorted(found)
