"""Prompt-to-Prompt token alignment on the host's real tokenizers (CLIP-L, CLIP-G, T5-XXL); no weights needed,
the host ships its tokenizer files."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from paths import HOST, ensure_host

if not HOST.is_dir():
    pytest.skip(f"no host at {HOST}: run `make setup` (GUIDE section 1)", allow_module_level=True)
ensure_host()

import comfy.sd1_clip  # noqa: E402
import comfy.sdxl_clip  # noqa: E402
from comfy.text_encoders import flux, sd3_clip  # noqa: E402
from retrace.editing.alignment import AlignmentError, refine_alignment, replace_mapper  # noqa: E402
from retrace.nodes._prompts import context_tokens, word_positions, word_token_ids  # noqa: E402

pytestmark = pytest.mark.host

START, END = 49406, 49407  # CLIP's start and end tokens; "l" pads with END
T5_END = 1  # T5 has no start token, ends with 1 and pads with 0


class Clip:
    """What the nodes use of the host's CLIP object (comfy.sd.CLIP): ``tokenize`` and ``tokenizer``."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer

    def tokenize(self, text: str, return_word_ids: bool = False, **kwargs: Any) -> dict:
        return self.tokenizer.tokenize_with_weights(text, return_word_ids, **kwargs)


@pytest.fixture(scope="module")
def sd1() -> Clip:
    return Clip(comfy.sd1_clip.SD1Tokenizer())


@pytest.fixture(scope="module")
def sdxl() -> Clip:
    return Clip(comfy.sdxl_clip.SDXLTokenizer())


@pytest.fixture(scope="module")
def fluxclip() -> Clip:
    return Clip(flux.FluxTokenizer())


@pytest.fixture(scope="module")
def sd3() -> Clip:
    return Clip(sd3_clip.SD3Tokenizer())


def ids(tokens: list[tuple[int, int]]) -> list[int]:
    return [t for t, _ in tokens]


def test_host_word_ids_are_segments_and_words_are_recovered(sd1: Clip) -> None:
    raw = sd1.tokenize("a photo of a cat", return_word_ids=True)["l"][0]
    assert [w for _, _, w in raw[:7]] == [0, 1, 1, 1, 1, 1, 0]  # the host numbers segments, not words
    tokens = context_tokens(sd1, "a photo of a cat", 77)
    assert tokens[:7] == [(START, 0), (320, 1), (1125, 2), (539, 3), (320, 4), (2368, 5), (END, 0)]
    assert tokens[7:] == [(END, 0)] * 70  # "l" pads with its end token
    weighted = context_tokens(sd1, "a (red:1.2) photorealistic hat", 77)
    assert weighted[:6] == [(START, 0), (320, 1), (736, 2), (1153, 3), (16157, 3), (3801, 4)]  # photo+realistic


def test_word_swap_is_identity_but_for_the_word(sd1: Clip, fluxclip: Clip) -> None:
    for clip, length, at in ((sd1, 77, 5), (fluxclip, 256, 6)):
        cat = context_tokens(clip, "a photo of a cat", length)
        dog = context_tokens(clip, "a photo of a dog", length)
        assert len(cat) == len(dog) == length
        assert [k for k in range(length) if cat[k] != dog[k]] == [at]
        assert torch.equal(replace_mapper(cat, dog), torch.eye(length))
    assert ids(context_tokens(fluxclip, "a photo of a cat", 256))[:8] == [3, 9, 1202, 13, 3, 9, 1712, T5_END]


def test_word_split_into_several_clip_tokens(sd1: Clip) -> None:
    assert word_token_ids(sd1, "skyscraper", "l") == [3075, 11187, 1284]
    assert word_token_ids(sd1, "lighthouse", "l") == [13717]
    sky = context_tokens(sd1, "a photo of a skyscraper at night", 77)
    light = context_tokens(sd1, "a photo of a lighthouse at night", 77)
    assert [w for _, w in sky[5:10]] == [5, 5, 5, 6, 7]
    mapper = replace_mapper(sky, light)  # 3 source tokens -> 1 target token
    assert mapper[5, 5:8].tolist() == [1, 1, 1] and mapper[5].sum() == 3  # the lighthouse takes all the mass
    assert mapper[6].argmax() == 8 and mapper[7].argmax() == 9  # "at night" follows, two places earlier
    assert mapper[8].argmax() == 10  # the end token takes the end token, padding follows in order
    assert mapper[76].argmax() == 76  # surplus target padding takes the source's last special
    rows = mapper.sum(1)
    assert torch.equal(rows[torch.arange(77) != 5], torch.ones(76))
    back = replace_mapper(light, sky)  # 1 source token -> 3 target tokens: a third each, rows sum to 1/3
    assert back[5:8, 5].tolist() == pytest.approx([1 / 3] * 3) and back[:, 5].sum() == pytest.approx(1.0)
    assert torch.equal(back.sum(1)[[0, 4, 8, 9, 10, 76]], torch.ones(6))


def test_word_split_into_several_t5_tokens(fluxclip: Clip) -> None:
    assert word_token_ids(fluxclip, "hedgehog", "t5xxl") == [18179, 18330]
    hog = context_tokens(fluxclip, "a photo of a hedgehog", 256)
    cat = context_tokens(fluxclip, "a photo of a cat", 256)
    mapper = replace_mapper(hog, cat)
    assert mapper[6, 6:8].tolist() == [1, 1] and mapper[7].argmax() == 8  # cat <- hedge + hog; end <- end
    back = replace_mapper(cat, hog)
    assert back[6:8, 6].tolist() == [0.5, 0.5] and back[8].argmax() == 7


def test_word_count_mismatch_on_real_prompts(sd1: Clip) -> None:
    a = context_tokens(sd1, "a photo of a cat", 77)
    b = context_tokens(sd1, "a photo of a fluffy cat", 77)
    with pytest.raises(AlignmentError, match="source has 5, target has 6; use mode 'refine'"):
        replace_mapper(a, b)


@pytest.mark.parametrize(("kind", "length", "new"), [("sd1", 77, [2, 4]), ("flux", 256, [2, 4])])
def test_refine_added_words(kind: str, length: int, new: list[int], sd1: Clip, fluxclip: Clip) -> None:
    clip = sd1 if kind == "sd1" else fluxclip
    source = context_tokens(clip, "a cat", length)
    target = context_tokens(clip, "a fluffy cat sitting", length)
    index, alphas = refine_alignment(source, target)
    assert torch.nonzero(alphas == 0).flatten().tolist() == new  # exactly "fluffy" and "sitting"
    assert index[:6].tolist() == [0, 1, 0, 2, 0, 3]  # start/"a"/"cat"/end in place (for T5: "▁"/"a"/"cat"/end)
    assert index[6:].tolist() == list(range(4, length - 2))  # padding in order; two source pads left over
    assert torch.equal(refine_alignment(source, source)[0], torch.arange(length))


def test_long_prompt_has_two_chunks(sd1: Clip, fluxclip: Clip) -> None:
    text = " ".join(["a red cat"] * 30)  # 90 word tokens
    raw = sd1.tokenize(text, return_word_ids=True)["l"]
    assert [len(chunk) for chunk in raw] == [77, 77]
    tokens = context_tokens(sd1, text, 154)
    assert len(tokens) == 154 and tokens[76] == (END, 0) and tokens[77] == (START, 0)
    assert max(w for _, w in tokens) == 90 and sum(w > 0 for _, w in tokens) == 90
    assert tokens[75] == (2368, 75) and tokens[78] == (320, 76)  # numbering goes on across the chunk boundary
    with pytest.raises(ValueError, match=r"'l': 154"):
        context_tokens(sd1, text, 77)
    # T5 (Flux) has no chunks: at least 256 tokens (padded with 0), more when the prompt is longer.
    long = "a small red cat sitting on a wooden chair " * 30
    assert len(fluxclip.tokenize(long, return_word_ids=True)["t5xxl"][0]) == 331
    t5 = context_tokens(fluxclip, long, 331)
    assert len(t5) == 331 and t5[-1] == (T5_END, 0) and max(w for _, w in t5) == 270


def test_word_positions(sd1: Clip, fluxclip: Clip, sd3: Clip) -> None:
    text = "a dog wearing a red hat, dog"
    assert word_positions(sd1, text, 77, "dog, red hat") == [2, 5, 6, 8]
    assert word_positions(sd1, text, 77, " red ,, ") == [5]
    assert word_positions(sd1, text, 77, "") == [] and word_positions(sd1, text, 77, " , ") == []
    assert word_token_ids(fluxclip, "red hat", "t5xxl") == [1131, 3, 547]
    # T5 pieces: ▁ a ▁dog ▁wearing ▁ a ▁red ▁ hat , ▁dog
    assert word_positions(fluxclip, text, 256, "dog, red hat") == [2, 6, 7, 8, 10]
    # SD3: the "l" segment, then the T5 segment from position 77.
    assert word_positions(sd3, text, 154, "dog, red hat") == [2, 5, 6, 8, 79, 83, 84, 85, 87]
    with pytest.raises(AlignmentError, match=r"the word 'cat' is not in the prompt 'a dog wearing a red hat, dog'"):
        word_positions(sd1, text, 77, "dog, cat")


def test_encoder_choice_by_context_length(sd1: Clip, sdxl: Clip, fluxclip: Clip, sd3: Clip) -> None:
    text = "a photo of a cat"
    t5 = context_tokens(fluxclip, text, 256)  # Flux: the conditioning holds the T5 tokens only
    assert len(t5) == 256 and t5[0] == (3, 1) and t5[7] == (T5_END, 0) and set(ids(t5[8:])) == {0}
    assert context_tokens(fluxclip, text, 77)[0] == (START, 0)  # a CLIP-length context takes "l"
    both = context_tokens(sd3, text, 154)  # SD3: "l" then "t5xxl" (its T5 pads to 77 only)
    assert both[0] == (START, 0) and both[77] == (3, 6) and both[83] == (1712, 10) and both[84] == (T5_END, 0)
    # SDXL: "l" and "g" hold the same tokens at the same places; "g" pads with token 0, not the end token.
    raw = sdxl.tokenize(text, return_word_ids=True)
    assert [t for t, _, _ in raw["g"][0][:7]] == [t for t, _, _ in raw["l"][0][:7]]
    assert raw["g"][0][7][0] == 0 and raw["l"][0][7][0] == END
    assert ids(context_tokens(sdxl, text, 77))[7] == END  # "l" chosen


def test_no_encoder_matches_the_context_length(fluxclip: Clip) -> None:
    with pytest.raises(ValueError, match=r"conditioning's 300 tokens \(tokens per encoder: 'l': 77, 't5xxl': "
                                         r"256\)"):
        context_tokens(fluxclip, "a photo of a cat", 300)
    with pytest.raises(ValueError, match=r"conditioning's 100 tokens"):
        word_positions(fluxclip, "a photo of a cat", 100, "cat")
