"""The attention store's bookkeeping and the injection math against Prompt-to-Prompt's and MasaCtrl's formulas
written out with explicit maps (no host)."""

from __future__ import annotations

import pytest
import torch

from paths import ensure_package

ensure_package()

from retrace.editing import prompt_to_prompt as p2p  # noqa: E402
from retrace.editing.attention_store import (  # noqa: E402
    AttentionBudgetError, AttentionStore, LayerSpec, StoreSettings, bytes_per_step, default_layers, parse_layers,
    plan_layers)

pytestmark = pytest.mark.core

B, H, N, T, S, D = 2, 3, 16, 7, 6, 8  # batch, heads, image tokens, target tokens, source tokens, dim_head


def rand(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.fixture()
def tensors() -> dict[str, torch.Tensor]:
    return {"q": rand(B, H, N, D, seed=1), "k": rand(B, H, T, D, seed=2), "v": rand(B, H, T, D, seed=3),
            "sq": rand(B, H, N, D, seed=4), "sk": rand(B, H, S, D, seed=5)}


def test_cross_edits_match_explicit_maps(tensors: dict[str, torch.Tensor]) -> None:
    """P2P eq. (3)-(5): (mapped source maps * alpha + own maps * (1 - alpha)) * weights, times V."""
    t = tensors
    mapper = torch.rand(T, S, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    alpha = torch.tensor([1, 1, 0, 1, 0, 1, 1], dtype=torch.float64)
    weights = torch.tensor([1, 2, 1, 1, 0.5, 1, -1], dtype=torch.float64)
    own, src = p2p.probabilities(t["q"], t["k"]), p2p.probabilities(t["sq"], t["sk"])
    for edit in (p2p.TokenEdit(mapper=mapper), p2p.TokenEdit(mapper=mapper, alpha=alpha),
                 p2p.TokenEdit(mapper=mapper, alpha=alpha, weights=weights), p2p.TokenEdit(weights=weights)):
        maps = own if edit.mapper is None else src @ edit.mapper.t()
        if edit.alpha is not None:
            maps = maps * edit.alpha + own * (1 - edit.alpha)
        if edit.weights is not None:
            maps = maps * edit.weights
        got = p2p.cross_attention(t["q"], t["k"], t["v"], {"q": t["sq"], "k": t["sk"]}, edit)
        assert (got - maps @ t["v"]).abs().max() <= 1e-12


def test_identity_mapper_is_the_source_attention(tensors: dict[str, torch.Tensor]) -> None:
    t = tensors
    same = {"q": t["sq"], "k": t["k"]}
    edit = p2p.TokenEdit(mapper=torch.eye(T, dtype=torch.float64))
    assert edit.maps_in_place and not p2p.TokenEdit(mapper=torch.ones(T, T)).maps_in_place
    got = p2p.cross_attention(t["q"], t["k"], t["v"], same, edit)
    assert torch.equal(got, p2p.sdpa(t["sq"], t["k"], t["v"]))
    ones = p2p.TokenEdit(weights=torch.ones(T, dtype=torch.float64))
    assert torch.equal(p2p.cross_attention(t["q"], t["k"], t["v"], None, ones), p2p.sdpa(t["q"], t["k"], t["v"]))


def test_self_attention_modes(tensors: dict[str, torch.Tensor]) -> None:
    t = tensors
    q, k, v = t["q"], rand(B, H, N, D, seed=7), rand(B, H, N, D, seed=8)
    source = {"q": t["sq"], "k": rand(B, H, N, D, seed=9), "v": rand(B, H, N, D, seed=10)}
    replace = p2p.self_attention(q, k, v, source, "replace")
    assert (replace - p2p.probabilities(source["q"], source["k"]) @ v).abs().max() <= 1e-12
    mutual = p2p.self_attention(q, k, v, source, "mutual")
    assert (mutual - p2p.probabilities(q, source["k"]) @ source["v"]).abs().max() <= 1e-12


@pytest.mark.parametrize("self_mode", ["replace", "off", "mutual"])
def test_joint_attention_matches_explicit_maps(self_mode: str) -> None:
    """DiT rows: text rows untouched; image rows' text columns edited, image columns by self_mode."""
    text, image = T, N
    q, k, v = (rand(B, H, text + image, D, seed=s) for s in (11, 12, 13))
    source = {"q": rand(B, H, image, D, seed=14), "k": rand(B, H, S + image, D, seed=15),
              "v": rand(B, H, S + image, D, seed=16)}
    mapper = torch.rand(T, S, generator=torch.Generator().manual_seed(17), dtype=torch.float64)
    alpha = (torch.arange(T) % 2).double()
    edit = p2p.TokenEdit(mapper=mapper, alpha=alpha)
    got = p2p.joint_attention(q, k, v, text, source, edit, self_mode)

    expected_text = p2p.probabilities(q[:, :, :text], k) @ v
    keys, values = k, v
    if self_mode == "mutual":
        keys = torch.cat((k[:, :, :text], source["k"][:, :, S:]), dim=2)
        values = torch.cat((v[:, :, :text], source["v"][:, :, S:]), dim=2)
    own = p2p.probabilities(q[:, :, text:], keys)
    src = p2p.probabilities(source["q"], source["k"])
    text_maps = (src[..., :S] @ mapper.t()) * alpha + own[..., :text] * (1 - alpha)
    image_maps = src[..., S:] if self_mode == "replace" else own[..., text:]
    expected_image = text_maps @ v[:, :, :text] + image_maps @ values[:, :, text:]
    expected = torch.cat((expected_text, expected_image), dim=2)
    assert (got - expected).abs().max() <= 1e-12


def test_one_call_is_the_edit_where_it_exists_and_refuses_otherwise() -> None:
    """An edit that is one attention call is given as that call (the nodes then make the host's own call with
    it); it equals the edit's formula, and edits that change nothing hand back the layer's own tensors."""
    text, image = S, N  # the source prompt's token count, so word swaps can keep the maps in place
    q, k, v = (rand(B, H, text + image, D, seed=s) for s in (21, 22, 23))
    source = {"q": q[:, :, text:], "k": k, "v": v}
    attend = p2p.sdpa
    in_place = p2p.TokenEdit(mapper=torch.eye(S, dtype=torch.float64))
    refine = p2p.TokenEdit(mapper=torch.eye(S, dtype=torch.float64), alpha=(torch.arange(S) % 2).double())
    qi, ki, vi = q[:, :, text:], rand(B, H, image, D, seed=24), rand(B, H, image, D, seed=25)
    cross_source = {"q": rand(B, H, image, D, seed=26), "k": rand(B, H, S, D, seed=27)}
    kc, vc = rand(B, H, S, D, seed=28), rand(B, H, S, D, seed=29)
    for kind, args, edit, mode, formula in (
            ("cross", (qi, kc, vc), in_place, "off", lambda: p2p.cross_attention(qi, kc, vc, cross_source, in_place)),
            ("self", (qi, ki, vi), None, "replace", lambda: p2p.self_attention(qi, ki, vi, self_source, "replace")),
            ("self", (qi, ki, vi), None, "mutual", lambda: p2p.self_attention(qi, ki, vi, self_source, "mutual")),
            ("joint", (q, k, v), in_place, "replace", lambda: p2p.joint_attention(q, k, v, text, source, in_place,
                                                                                 "replace"))):
        self_source = {"q": cross_source["q"], "k": ki + 1, "v": vi - 1}
        src = {"cross": cross_source, "self": self_source, "joint": source}[kind]
        term = p2p.one_call(*args, kind, text, src, edit, mode)
        assert term is not None and (attend(*term) - formula()).abs().max() <= 1e-12
    # The source prompt injected into joint attention: the layer's own q, k and v.
    same = p2p.one_call(q, k, v, "joint", text, source, in_place, "replace")
    assert all(torch.equal(a, b) for a, b in zip(same, (q, k, v)))
    # Two calls needed: refine (source maps and own maps), and joint attention whose source keys differ.
    assert p2p.one_call(qi, kc, vc, "cross", text, cross_source, refine, "off") is None
    other = {**source, "k": k + 1}
    assert p2p.one_call(q, k, v, "joint", text, other, in_place, "replace") is None
    # A source prompt of another length cannot stand in for the layer's keys in one call.
    assert p2p.one_call(qi, kc[:, :, :-1], vc[:, :, :-1], "cross", text, cross_source, p2p.TokenEdit(
        mapper=torch.ones(S - 1, S, dtype=torch.float64) / S), "off") is None


def test_local_blend_mask() -> None:
    maps = torch.zeros(1, 1, 8, 8)
    maps[0, 0, 2, 3] = 5.0
    mask = p2p.blend_mask(maps, None, 0.3)
    assert mask.sum() == 9 and mask[0, 0, 1:4, 2:5].sum() == 9  # a 3x3 max-pool around the peak
    assert p2p.blend_mask(maps, maps * 0.1, 1.0).sum() == 0
    denoised, source = rand(1, 4, 8, 8, seed=1).float(), rand(1, 4, 8, 8, seed=2).float()
    assert torch.equal(p2p.local_blend(denoised, source, torch.zeros(1, 1, 8, 8)), source)
    assert torch.equal(p2p.local_blend(denoised, source, torch.ones(1, 1, 8, 8)), source + (denoised - source))


def spec(kind: str, queries: int, text: int = 77, channels: int = 320, heads: int = 8) -> LayerSpec:
    side = int(queries ** 0.5)
    keys = queries if kind == "self" else text + (queries if kind == "joint" else 0)
    return LayerSpec(kind, heads, channels // heads, queries, keys, 0 if kind == "self" else text, (side, side))


def test_layers_and_bytes() -> None:
    specs = [spec("self", 64), spec("cross", 64), spec("self", 16), spec("cross", 16)]
    assert default_layers(specs) == {1, 2, 3}
    assert parse_layers("auto", 4) is None and parse_layers("all", 4) == {0, 1, 2, 3}
    assert parse_layers("0-1, 3", 4) == {0, 1, 3}
    with pytest.raises(ValueError, match="outside this model's 4 attention layers"):
        parse_layers("2-4", 4)
    with pytest.raises(ValueError, match="cannot read"):
        parse_layers("two", 4)
    settings = StoreSettings()
    assert plan_layers(specs, settings) == {1: ("k", "q"), 2: ("k", "q"), 3: ("k", "q")}
    expected = 2 * 320 * ((64 + 77) + (16 + 16) + (16 + 77))
    assert bytes_per_step(specs, settings) == expected
    assert bytes_per_step(specs, StoreSettings(dtype=torch.float32), images=2) == 4 * expected
    kv = StoreSettings(cross=False, self_mode="kv", layers="all")
    assert plan_layers(specs, kv) == {0: ("k", "v"), 2: ("k", "v")}


def test_store_budget_and_steps() -> None:
    specs = [spec("self", 64), spec("cross", 64)]
    store = AttentionStore(StoreSettings(layers="all", budget_bytes=10_000))
    store.begin({"model": "SD15"}, (1, 4, 8, 8), torch.tensor([10.0, 5.0, 1.0, 0.0]))
    assert store.steps == 3 and store.step_of(5.0 * (1 + 1e-4)) == 1 and store.step_of(7.0) is None
    with pytest.raises(AttentionBudgetError, match=r"MB per step x 3 steps, 2 of 2 layers"):
        store.plan(specs, 1)
    store = AttentionStore(StoreSettings(layers="all"))
    store.begin({"model": "SD15"}, (1, 4, 8, 8), torch.tensor([10.0, 1.0, 0.0]))
    store.plan(specs, 1)
    store.put(0, 1, {"q": torch.ones(1, 8, 64, 40), "k": torch.ones(1, 8, 77, 40)})
    assert store.get(0, 1)["q"].dtype == torch.float16
    assert store.stored_bytes() == 2 * 320 * (64 + 77)
    store.put_denoised(0, torch.zeros(1, 4, 8, 8))
    store.finish()
    assert not store.complete
    store.put_denoised(1, torch.zeros(1, 4, 8, 8))
    store.finish()
    assert store.complete
    store.begin({"model": "SD15"}, (1, 4, 8, 8), torch.tensor([10.0, 1.0, 0.0]))
    assert not store.entries and not store.complete and store.runs == 2


def test_stored_word_maps_peak_at_one() -> None:
    specs = [spec("cross", 16, text=5, channels=16, heads=2)]
    entries = {(s, 0): {"q": rand(1, 2, 16, 8, seed=s).float(), "k": rand(1, 2, 5, 8, seed=10 + s).float()}
               for s in range(3)}
    maps = p2p.stored_word_maps(entries, specs, [(1,), (2, 3)], (8, 8))
    assert maps.shape == (1, 2, 8, 8)
    assert torch.allclose(maps.flatten(2).amax(-1), torch.ones(1, 2))
    with pytest.raises(ValueError, match="no cross-attention"):
        p2p.stored_word_maps(entries, specs, [(1,)], (8, 8), layers={3})
