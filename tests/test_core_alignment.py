"""Prompt-to-Prompt token alignment on hand-made token sequences (GUIDE section 6, layer 1)."""

from __future__ import annotations

import random
import time

import pytest
import torch

from retrace.editing.alignment import AlignmentError, changed_tokens, find_word, refine_alignment, replace_mapper

pytestmark = pytest.mark.core

S, E, P = 100, 101, 102  # start, end, padding


def seq(*words: tuple[int, ...], length: int | None = None, pad: int = P) -> list[tuple[int, int]]:
    """[start, word tokens..., end, padding...]: one tuple of token ids per word."""
    tokens = [(S, 0)] + [(t, i) for i, word in enumerate(words, start=1) for t in word] + [(E, 0)]
    while length is not None and len(tokens) < length:
        tokens.append((pad, 0))
    return tokens


def lcs(x: list[int], y: list[int]) -> int:
    table = [[0] * (len(y) + 1) for _ in range(len(x) + 1)]
    for i, a in enumerate(x, 1):
        for j, b in enumerate(y, 1):
            table[i][j] = table[i - 1][j - 1] + 1 if a == b else max(table[i - 1][j], table[i][j - 1])
    return table[-1][-1]


def test_identical_prompts_give_the_identity() -> None:
    tokens = seq((1,), (2, 3), (4,), length=10)
    mapper = replace_mapper(tokens, tokens)
    assert mapper.dtype == torch.float32 and torch.equal(mapper, torch.eye(10))
    index, alphas = refine_alignment(tokens, tokens)
    assert index.dtype == torch.int64 and alphas.dtype == torch.float32
    assert torch.equal(index, torch.arange(10)) and torch.equal(alphas, torch.ones(10))


def test_one_to_one_word_swap() -> None:
    source, target = seq((1,), (2,), (7,), length=8), seq((1,), (2,), (9,), length=8)
    mapper = replace_mapper(source, target)
    assert torch.equal(mapper, torch.eye(8))  # "a photo cat" -> "a photo dog": the dog takes the cat's map
    assert source[3] != target[3]


def test_split_word_keeps_the_mass() -> None:
    # "a hedge hog ." -> "a cat .": word 2 has two source tokens and one target token.
    source, target = seq((1,), (5, 6), (8,), length=8), seq((1,), (7,), (8,), length=8)
    mapper = replace_mapper(source, target)
    assert mapper.shape == (8, 8)
    assert mapper[2].tolist() == [0, 0, 1, 1, 0, 0, 0, 0]  # the cat takes hedge + hog
    assert mapper[3].tolist() == [0, 0, 0, 0, 1, 0, 0, 0]  # "." after the split word still maps to "."
    # Specials in order: start, end, then padding; the target's surplus padding takes the source's last one.
    assert mapper[0, 0] == 1 and mapper[4, 5] == 1 and mapper[5, 6] == 1 and mapper[6, 7] == 1 and mapper[7, 7] == 1

    back = replace_mapper(target, source)  # "a cat ." -> "a hedge hog .": each piece gets half of the cat
    assert back[2].tolist() == [0, 0, 0.5, 0, 0, 0, 0, 0] and back[3].tolist() == back[2].tolist()
    rows = back.sum(1)
    assert torch.allclose(rows[[2, 3]], torch.full((2,), 0.5))
    assert torch.equal(rows[[0, 1, 4, 5, 6, 7]], torch.ones(6))  # every row outside the split word sums to 1
    assert back[:, 2].sum() == 1  # the cat's map is handed on whole: its column sums to 1
    assert torch.equal(mapper.sum(1)[[0, 1, 3, 4, 5, 6, 7]], torch.ones(7)) and mapper[2].sum() == 2


def test_split_words_rows_sum_to_one_when_token_counts_agree() -> None:
    source = seq((1, 2), (3,), (4, 5, 6), length=12)
    target = seq((7, 8), (9,), (10, 11, 12), length=12)
    mapper = replace_mapper(source, target)
    assert torch.equal(mapper.sum(1), torch.ones(12)) and torch.equal(mapper, torch.eye(12))


def test_specials_and_padding_of_different_lengths() -> None:
    source = seq((1,), (2,), length=6)  # S 1 2 E P P
    target = seq((1,), (3, 4, 5), length=10)  # S 1 3 4 5 E P P P P
    mapper = replace_mapper(source, target)
    assert mapper.shape == (10, 6)
    expected_specials = {0: 0, 5: 3, 6: 4, 7: 5, 8: 5, 9: 5}
    for t, s in expected_specials.items():
        assert mapper[t].tolist() == [1.0 if k == s else 0.0 for k in range(6)], t
    assert mapper[2:5, 2].tolist() == pytest.approx([1 / 3] * 3)
    assert mapper[2:5].sum() == pytest.approx(1.0)  # the source word's mass, spread over three tokens
    shorter = replace_mapper(target, source)  # fewer target specials: the k-th takes the k-th
    assert shorter[3].argmax() == 5 and shorter[4].argmax() == 6 and shorter[5].argmax() == 7


def test_two_chunks_with_a_word_cut_by_the_chunk_boundary() -> None:
    # chunk 1: S w1 w2(a b | E   chunk 2: S b') w3 E  -- word 2 spans the boundary and keeps its id.
    source = [(S, 0), (1, 1), (2, 2), (3, 2), (E, 0), (S, 0), (4, 2), (5, 3), (E, 0)]
    target = [(S, 0), (1, 1), (6, 2), (E, 0), (7, 3), (E, 0), (P, 0)]
    mapper = replace_mapper(source, target)
    assert mapper[2].tolist() == [0, 0, 1, 1, 0, 0, 1, 0, 0]  # one target token takes all three pieces
    assert mapper[4].tolist() == [0, 0, 0, 0, 0, 0, 0, 1, 0]
    assert [int(mapper[t].argmax()) for t in (0, 3, 5, 6)] == [0, 4, 5, 8]


def test_word_count_mismatch_is_refused_with_both_counts() -> None:
    source, target = seq((1,), (2,), (3,), (4,), (5,)), seq((1,), (2,), (3,), (4,), (5,), (6,))
    with pytest.raises(AlignmentError, match=r"same number of words: source has 5, target has 6; use mode "
                                             r"'refine' to add words"):
        replace_mapper(source, target)
    assert issubclass(AlignmentError, ValueError)


@pytest.mark.parametrize(("bad", "match"), [
    ([], r"source token sequence is empty"),
    ([(1, 0), (2,)], r"source token 1 is \(2,\); expected a pair \(token_id, word_id\)"),
    ([(1, 0), (2, -1)], r"source token 1 has word id -1"),
])
def test_malformed_tokens_are_refused(bad: list, match: str) -> None:
    with pytest.raises(AlignmentError, match=match):
        replace_mapper(bad, seq((1,)))


def test_refine_with_inserted_words() -> None:
    source = seq((1,), (2,), length=8)  # S a cat E P P P P
    target = seq((1,), (7,), (2,), (8, 9), length=8)  # S a fluffy cat sit ting E P
    index, alphas = refine_alignment(source, target)
    assert alphas.tolist() == [1, 1, 0, 1, 0, 0, 1, 1]  # 0 exactly at the new tokens
    kept = alphas.bool()
    assert index[kept].tolist() == [0, 1, 2, 3, 4]  # start, a, cat, end, first padding: leftmost, in order
    assert torch.equal(index[~kept], torch.zeros(3, dtype=torch.int64))
    src_ids, tgt_ids = [t for t, _ in source], [t for t, _ in target]
    assert all(src_ids[i] == tgt_ids[j] for j, i in enumerate(index.tolist()) if alphas[j] == 1)


def test_refine_with_removed_and_repeated_words() -> None:
    source = seq((1,), (3,), (1,), (2,))  # S a red a cat E
    target = seq((1,), (2,), (4,))  # S a cat sits E
    index, alphas = refine_alignment(source, target)
    assert alphas.tolist() == [1, 1, 1, 0, 1]
    assert index.tolist() == [0, 1, 4, 0, 5]  # "a" leftmost, "cat" at its only place


def test_changed_tokens_are_where_the_prompts_differ_and_only_there() -> None:
    red, blue, cube, ball, a, and_ = 3, 4, 5, 7, 1, 6
    source = seq((a,), (red,), (cube,), (and_,), (a,), (red,), (ball,), length=12)
    swapped = seq((a,), (blue,), (cube,), (and_,), (a,), (red,), (ball,), length=12)
    # "red" stands twice; only the first changes (find_word would give both).
    assert changed_tokens(source, swapped) == ([2], [2])
    assert find_word(source, [red]) == [2, 6]
    assert changed_tokens(source, source) == ([], [])
    added = seq((a,), (red,), (cube,), (and_,), (a,), (red,), (9, 10), (ball,), length=12)  # a two-token word added
    assert changed_tokens(source, added) == ([], [7, 8])
    assert changed_tokens(added, source) == ([7, 8], [])
    # Special tokens never count, even where the padding lengths differ.
    assert changed_tokens(seq((a,), (red,)), seq((a,), (blue,), length=9)) == ([2], [2])


def test_refine_matches_the_longest_common_subsequence() -> None:
    rng = random.Random(0)
    for size in (1, 5, 30, 77):
        x = [(rng.randrange(6), 1) for _ in range(size)]
        y = [(rng.randrange(6), 1) for _ in range(size + rng.randrange(-size + 1, 10))]
        index, alphas = refine_alignment(x, y)
        assert int(alphas.sum()) == lcs([t for t, _ in x], [t for t, _ in y])
        kept = index[alphas.bool()].tolist()
        assert kept == sorted(set(kept))  # an alignment: source positions strictly increase
        assert all(x[i][0] == y[j][0] for j, i in enumerate(index.tolist()) if alphas[j] == 1)


def test_refine_is_fast_at_512_tokens() -> None:
    rng = random.Random(1)
    x = [(rng.randrange(1000), 1) for _ in range(512)]
    y = x[:250] + [(1000 + k, 1) for k in range(12)] + x[250:500]  # 12 new tokens; the last 12 dropped
    start = time.perf_counter()
    index, alphas = refine_alignment(x, y)
    assert time.perf_counter() - start < 1.0
    assert len(y) == 512 and int(alphas.sum()) == 500
    assert torch.equal(alphas[250:262], torch.zeros(12)) and torch.equal(index[262:], torch.arange(250, 500))


def test_find_word_finds_every_occurrence() -> None:
    tokens = seq((1,), (5, 6), (2,), (5, 6), (5,), length=12)  # S a hedge hog and hedge hog hedge E P...
    assert find_word(tokens, [5, 6]) == [2, 3, 5, 6]
    assert find_word(tokens, [5]) == [2, 5, 7]
    assert find_word(tokens, [2]) == [4]


def test_find_word_never_matches_special_tokens() -> None:
    tokens = seq((0,), (3,), length=6, pad=0)  # padding with token id 0 (as SDXL's "g" pads)
    assert find_word(tokens, [0]) == [1]


def test_find_word_not_found_names_the_word() -> None:
    tokens = seq((1,), (2,), length=5)
    with pytest.raises(AlignmentError, match=r"'dog' \(token ids \[9\]\) is not in the prompt \(word token ids "
                                             r"\[1, 2\]\)"):
        find_word(tokens, [9], word="dog")
    with pytest.raises(AlignmentError, match=r"the word \(token ids \[2, 1\]\) is not in the prompt"):
        find_word(tokens, [2, 1])
    with pytest.raises(AlignmentError, match=r"'' has no tokens"):
        find_word(tokens, [], word="")
