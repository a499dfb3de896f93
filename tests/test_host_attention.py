"""Attention store and inject on tiny host models of the four families (SD1.5, SDXL UNets; Flux, SD3 DiTs):
exact identities, a clone that leaves the original alone, and bad input refused before the model runs."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import pytest
import torch

from paths import HOST, ensure_host

if not HOST.is_dir():
    pytest.skip(f"no host at {HOST}: run `make setup` (GUIDE section 1)", allow_module_level=True)
ensure_host()

import comfy.patcher_extension  # noqa: E402
import comfy.samplers  # noqa: E402
import tiny_models  # noqa: E402
from retrace.editing.attention_store import AttentionBudgetError, AttentionStore, StoreSettings  # noqa: E402
from retrace.editing.prompt_to_prompt import InjectSettings, TokenEdit  # noqa: E402
from retrace.nodes._attention_hooks import (  # noqa: E402
    AttentionInjector, AttentionRecorder, identity_of, layer_specs)

pytestmark = pytest.mark.host

KINDS = ("sd15", "sdxl", "flux", "sd3")
STEPS = 4
TOKENS = 77
CFG = 7.5


class Case:
    """A tiny model with a counter on its network calls, prompts, and a fixed start noise."""

    def __init__(self, kind: str):
        self.kind = kind
        self.calls = 0
        self.model = tiny_models.build_model(kind)
        self.model.set_model_unet_function_wrapper(self._counter())
        self.source = tiny_models.conditioning(kind, seed=1)
        # A word swap: the source prompt with two tokens' embeddings replaced.
        self.target = [[c.clone(), dict(extras)] for c, extras in self.source]
        self.target[0][0][:, 4:6] = tiny_models.conditioning(kind, seed=2)[0][0][:, 4:6]
        self.negative = tiny_models.conditioning(kind, seed=3)
        # An image-like latent in model space, noised part of the way (outputs at a real model's scale).
        self.latent = self.model.get_model_object("latent_format").process_in(tiny_models.latent(kind)["samples"])
        self.noise = torch.randn(self.latent.shape, generator=torch.Generator().manual_seed(5))
        ms = self.model.get_model_object("model_sampling")
        self.sigmas = comfy.samplers.calculate_sigmas(ms, "normal", 2 * STEPS).float()[-STEPS - 1:]

    def _counter(self) -> Any:
        # A function, not a bound method: the host deep-copies model options on clone, and a copied method
        # would count on a copy of this case.
        def count(apply_model: Any, args: dict) -> torch.Tensor:
            self.calls += 1
            return apply_model(args["input"], args["timestep"], **args["c"])
        return count

    def sample(self, model: Any, positive: list | None = None, latent: torch.Tensor | None = None) -> torch.Tensor:
        guider = comfy.samplers.CFGGuider(model)
        guider.set_conds(positive or self.source, self.negative)
        guider.set_cfg(CFG)
        latent = self.latent if latent is None else latent
        noise = self.noise if latent is self.latent else torch.zeros_like(latent)
        with torch.inference_mode():
            return guider.sample(noise, latent, comfy.samplers.sampler_object("euler"), self.sigmas, seed=0,
                                 disable_pbar=True)

    def store(self, **settings: Any) -> tuple[Any, AttentionStore]:
        store = AttentionStore(StoreSettings(**{"layers": "all", "dtype": torch.float32, **settings}))
        return AttentionRecorder(store, identity_of(self.model), None).install(self.model.clone()), store

    def inject(self, store: AttentionStore | None, **settings: Any) -> Any:
        hook = AttentionInjector(store, InjectSettings(**settings), identity_of(self.model), None)
        return hook.install(self.model.clone())


@pytest.fixture(scope="module", params=KINDS)
def case(request: pytest.FixtureRequest) -> Case:
    return Case(request.param)


@pytest.fixture(scope="module")
def source_pass(case: Case) -> tuple[torch.Tensor, torch.Tensor, AttentionStore]:
    """The plain result and the stored source pass (queries and keys of every layer, float32)."""
    plain = case.sample(case.model)
    patched, store = case.store()
    return plain, case.sample(patched), store


IDENTITY = TokenEdit(mapper=torch.eye(TOKENS))


def test_store_changes_nothing_and_fills_every_layer(case: Case, source_pass) -> None:
    plain, stored, store = source_pass
    assert torch.equal(plain, stored)
    assert store.complete and store.steps == STEPS
    assert len(store.layers) == len(store.specs) > 0
    assert len(store.entries) == STEPS * len(store.specs)
    assert sorted(store.denoised) == list(range(STEPS))
    kinds = {s.kind for s in store.specs}
    assert kinds == ({"self", "cross"} if case.kind in ("sd15", "sdxl") else {"joint"})


def test_same_prompt_full_injection_is_the_source_pass(case: Case, source_pass) -> None:
    """P2P's identity: target = source, cross- and self-attention injected at every step."""
    _, stored, store = source_pass
    edited = case.sample(case.inject(store, edit=IDENTITY, cross_steps=1.0, self_mode="replace", self_steps=1.0))
    assert torch.equal(edited, stored)  # bitwise: the injector makes the host's own call (p2p.one_call)


def test_injection_changes_an_edit(case: Case, source_pass) -> None:
    """A word swap with the source's attention injected is neither the free edit nor the source pass (the
    identity above cannot tell an injector that does nothing from one that works; the core tests check the
    edited attention against P2P's formulas)."""
    _, stored, store = source_pass
    free = case.sample(case.model, positive=case.target)
    injected = case.sample(case.inject(store, edit=IDENTITY, cross_steps=1.0, self_mode="replace", self_steps=1.0),
                           positive=case.target)
    assert (injected - free).abs().max().item() > 1e-3
    assert (injected - stored).abs().max().item() > 1e-3


def test_mutual_self_attention_with_same_prompt_is_the_source_pass(case: Case) -> None:
    patched, store = case.store(cross=False, self_mode="kv")
    stored = case.sample(patched)
    edited = case.sample(case.inject(store, self_mode="mutual", mutual_start_step=0, mutual_start_layer=0))
    assert torch.equal(edited, stored)


def test_reweight_by_one_is_no_patch(case: Case, source_pass) -> None:
    plain = source_pass[0]
    weights = TokenEdit(weights=torch.ones(TOKENS))
    reweighted = case.sample(case.inject(None, edit=weights, cross_steps=1.0, self_mode="off"))
    assert torch.equal(reweighted, plain)
    doubled = TokenEdit(weights=torch.ones(TOKENS).index_fill_(0, torch.tensor([3, 4]), 3.0))
    changed = case.sample(case.inject(None, edit=doubled, cross_steps=1.0, self_mode="off"))
    assert (changed - plain).abs().max().item() > 1e-3


def test_local_blend_with_empty_mask_returns_the_source_exactly(case: Case, source_pass) -> None:
    _, stored, store = source_pass
    patched = case.inject(store, edit=IDENTITY, cross_steps=1.0, self_mode="off", blend_target=(2, 3),
                          blend_source=(2,), blend_threshold=1.0, blend_start=0.0)
    assert torch.equal(case.sample(patched, positive=case.target), stored)
    full = case.inject(store, edit=IDENTITY, cross_steps=1.0, self_mode="off", blend_target=(2, 3),
                       blend_source=(2,), blend_threshold=0.0, blend_start=0.0)
    assert not torch.equal(case.sample(full, positive=case.target), stored)


def test_patched_model_is_a_clone(case: Case, source_pass) -> None:
    plain, _, store = source_pass
    case.sample(case.inject(store, edit=IDENTITY, cross_steps=1.0), positive=case.target)
    assert torch.equal(case.sample(case.model), plain)
    assert "optimized_attention_override" not in case.model.model_options.get("transformer_options", {})


def test_budget_exceeded_is_refused_before_the_network_runs(case: Case) -> None:
    patched, store = case.store(budget_bytes=1000)
    forwards = []
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "test",
                                 lambda executor, *a, **k: forwards.append(1) or executor(*a, **k))
    with pytest.raises(AttentionBudgetError, match=r"would store .* MB .* over the budget"):
        case.sample(patched)
    assert not forwards and not store.entries
    if case.kind != "sd3":  # the host's MMDiT has no diffusion-model wrapper seam; the others show it counts
        roomy, _ = case.store()
        roomy.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "test",
                                   lambda executor, *a, **k: forwards.append(1) or executor(*a, **k))
        case.sample(roomy)
        assert len(forwards) == STEPS


def test_store_from_another_resolution_or_model_is_refused(case: Case, source_pass) -> None:
    store = source_pass[2]
    bigger = torch.zeros((*case.latent.shape[:2], case.latent.shape[2] + 4, case.latent.shape[3] + 4))
    before = case.calls
    with pytest.raises(ValueError, match="latent of shape"):
        case.sample(case.inject(store, edit=IDENTITY), latent=bigger)
    other = AttentionInjector(store, InjectSettings(edit=IDENTITY), {"model": "SD3", "family": "flow"}, None)
    if case.kind != "sd3":
        with pytest.raises(ValueError, match="filled by a"):
            case.sample(other.install(case.model.clone()))
    assert case.calls == before


def test_layer_specs_match_the_calls(case: Case, source_pass) -> None:
    store = source_pass[2]
    diffusion_model = case.model.model.diffusion_model
    assert layer_specs(diffusion_model, tuple(case.latent.shape), TOKENS) == store.specs


class TokenizingClip:
    """The host's real CLIP-L tokenizer behind the one method Retrace Prompt Pair's alignment calls."""

    def __init__(self) -> None:
        import comfy.sd1_clip

        self.tokenizer = comfy.sd1_clip.SD1Tokenizer()

    def tokenize(self, text: str, return_word_ids: bool = False) -> dict:
        return self.tokenizer.tokenize_with_weights(text, return_word_ids=True)


def pair_of(source: str, target: str) -> Any:
    from retrace.nodes._prompts import context_tokens
    from retrace.nodes.attention import PromptPair

    clip = TokenizingClip()
    return PromptPair(source, target, context_tokens(clip, source, TOKENS), context_tokens(clip, target, TOKENS), clip)


def inject_node(model: Any, pair: Any, store: AttentionStore | None, source_result: dict | None, **widgets: Any):
    from retrace.nodes.attention import RetraceAttentionInject

    values = {"mode": "replace", "cross_steps": 0.8, "self_attention": "replace", "self_steps": 0.4,
              "mutual_start_step": 4, "mutual_start_layer": 10, "reweight_words": "", "reweight_factor": 1.0,
              "blend_words": "", "blend_threshold": 0.3, "blend_start": 0.2, **widgets}
    return RetraceAttentionInject.execute(model, pair, store=store, source_result=source_result, **values)


def test_inject_node_refuses_bad_input_before_sampling(case: Case, source_pass) -> None:
    if case.kind != "sd15":
        pytest.skip("node-level checks are the same for every family")
    store = source_pass[2]
    result = {"samples": torch.zeros(case.latent.shape)}
    swap = pair_of("a photo of a cat", "a photo of a dog")
    patched = inject_node(case.model, swap, store, result, blend_words="cat, dog").args[0]
    assert patched is not case.model
    with pytest.raises(ValueError, match="same number of words: source has 5, target has 7"):
        inject_node(case.model, pair_of("a photo of a cat", "a photo of a big fluffy cat"), store, result)
    with pytest.raises(ValueError, match="need the source pass's attention"):
        inject_node(case.model, swap, None, None)
    with pytest.raises(ValueError, match="source_result is not"):
        inject_node(case.model, swap, store, None)
    with pytest.raises(ValueError, match="latent of shape"):
        inject_node(case.model, swap, store, {"samples": torch.zeros(1, 4, 16, 16)})
    with pytest.raises(ValueError, match="the attention store is empty"):
        inject_node(case.model, swap, AttentionStore(), result)
    with pytest.raises(ValueError, match="blend word 'horse' is in neither prompt"):
        inject_node(case.model, swap, store, result, blend_words="horse")
    auto = inject_node(case.model, pair_of("a red cat and a red dog", "a red cat and a blue dog"), store, result,
                       blend_words="auto").args[0]
    settings = auto.model_options["transformer_options"]["optimized_attention_override"].settings
    assert settings.blend_source == settings.blend_target == (6,)  # the second "red" only: S a red cat and a >red<
    with pytest.raises(ValueError, match="already carries a Retrace attention"):
        inject_node(patched, swap, store, result)
    kv_only = dataclasses.replace(store, settings=StoreSettings(self_mode="kv"))
    with pytest.raises(ValueError, match="needs a store with self_attention 'queries and keys'"):
        inject_node(case.model, swap, kv_only, result)
    # Reweighting alone needs no store; the words are found with the real tokenizer ("wooden" is one token).
    edit = inject_node(case.model, pair_of("a cat on a wooden table", "a cat on a wooden table"), None, None,
                       mode="none", self_attention="off", reweight_words="wooden", reweight_factor=2.0).args[0]
    weights = edit.model_options["transformer_options"]["optimized_attention_override"].settings.edit.weights
    assert weights[5] == 2.0 and weights.sum() == TOKENS + 1



def test_prompt_pair_refuses_what_its_inject_and_maps_nodes_would_when_it_is_made() -> None:
    """The queued prompt tells the Prompt Pair which Inject and Maps nodes take its pair: what they would refuse
    after the inversion and the source pass is refused when the pair is made (before any model call)."""
    from retrace.nodes.attention import check_pair_users

    def graph(pair_link: list, node: str = "RetraceAttentionInject", **widgets: Any) -> dict:
        inputs = {"mode": "replace", "reweight_words": "", "blend_words": "auto", **widgets, "pair": pair_link}
        return {"4": {"class_type": "RetracePromptPair", "inputs": {}}, "9": {"class_type": node, "inputs": inputs}}

    swap, longer = pair_of("a photo of a cat", "a photo of a dog"), pair_of("a photo of a cat", "a photo of a big cat")
    check_pair_users(swap, graph(["4", 2], blend_words="cat, dog", reweight_words="dog"), "4")
    check_pair_users(longer, graph(["4", 2], mode="refine"), "4")
    with pytest.raises(ValueError, match=r"Inject node #9 this pair feeds would refuse it .* same number of words"):
        check_pair_users(longer, graph(["4", 2]), "4")
    with pytest.raises(ValueError, match=r"node #9 .* blend word 'horse' is in neither prompt"):
        check_pair_users(swap, graph(["4", 2], blend_words="horse"), "4")
    with pytest.raises(ValueError, match=r"node #9 .* the word 'horse' is not in the prompt"):
        check_pair_users(swap, graph(["4", 2], reweight_words="horse"), "4")
    with pytest.raises(ValueError, match=r"Attention Maps node #9 .* the word 'dog' is not in the prompt"):
        check_pair_users(swap, graph(["4", 2], node="RetraceAttentionMaps", words="cat, dog"), "4")
    # Not this pair's user, a widget fed by a link, or no prompt (a direct call): left to the node itself.
    check_pair_users(longer, graph(["7", 2]), "4")
    check_pair_users(longer, graph(["4", 2], mode=["12", 0]), "4")
    check_pair_users(longer, None, None)

def ulp(x: float) -> float:
    """The spacing of float32 numbers at ``x``."""
    return float(torch.finfo(torch.float32).eps) * 2.0 ** math.floor(math.log2(abs(x)))


@pytest.mark.parametrize("steps", [1, STEPS])
def test_direct_inversion_source_and_edit_passes(case: Case, steps: int) -> None:
    """Direct inversion reconstructs without calling the model; with a store it calls it, records the source
    branch and still returns the trajectory's estimate. The edit pass leaves its source branch alone, so the
    source prompt with full injection reconstructs too."""
    if case.kind not in ("sd15", "flux"):
        pytest.skip("one UNet and one DiT")
    from retrace.nodes.inversion import invert, sample_with_guider
    from retrace.nodes.inversion_guiders import DirectInversionGuider

    latent = tiny_models.latent(case.kind)
    with torch.inference_mode():
        _, inversion = invert(case.model, latent, case.source, None, steps, 1.0, "normal")
        plain = sample_with_guider(case.model, inversion,
                                   DirectInversionGuider(case.model, inversion, case.source, case.source,
                                                         case.negative, CFG))["samples"]
        patched, store = case.store()
        before = case.calls
        stored = sample_with_guider(patched, inversion, DirectInversionGuider(
            patched, inversion, case.source, case.source, case.negative, CFG))["samples"]
        assert case.calls - before == steps and store.complete
        assert torch.equal(stored, plain)
        same_prompt = [[c.clone(), dict(extras)] for c, extras in case.source]  # another object: two branches run
        injected = case.inject(store, edit=IDENTITY, cross_steps=1.0, self_mode="replace", self_steps=1.0)
        before = case.calls
        edited = sample_with_guider(injected, inversion, DirectInversionGuider(
            injected, inversion, same_prompt, case.source, case.negative, CFG))["samples"]
        # The source pass kept its source branch in the store: the edit pass calls the model for its own branch only.
        assert case.calls - before == steps
        other_source = [[c.clone(), dict(extras)] for c, extras in case.source]  # not the source pass's: evaluated
        before = case.calls
        evaluated = sample_with_guider(injected, inversion, DirectInversionGuider(
            injected, inversion, same_prompt, other_source, case.negative, CFG))["samples"]
        assert case.calls - before == 2 * steps
        # The kept estimates are the very numbers the edit pass would compute (the same call on the same point).
        assert torch.equal(edited, evaluated)
    if steps == 1:
        # On the trajectory's own point the edit branch is the source branch bit for bit (p2p.one_call), and
        # D* + (D - D) is D*: exact.
        assert torch.equal(edited, plain)
        return
    # After the first step the sampler's point is the trajectory's only up to the rounding of the Euler updates
    # (2 ulp of the largest value per update, so at most k * 2 ulp after k steps); the two branches see that drift,
    # the guided estimate moves by at most (1 + 2 cfg) times it (cond and uncond, unit-gain layers as tiny_models
    # fills them), and the steps' errors add up: steps^2 (1 + 2 cfg) 2 ulp.
    bound = steps**2 * (1 + 2 * CFG) * 2 * ulp(plain.abs().max().item())
    assert (edited - plain).abs().max().item() <= bound


def test_prompt_direction_composes_with_the_edit_pass(case: Case, source_pass) -> None:
    """A text direction (pix2pix-zero) on the edit pass's conditioning: strength 0 gives the injected edit bit for
    bit; a real direction changes it, on every family."""
    from retrace.editing.directions import Direction, prompt_direction
    from retrace.nodes.directions import RetraceApplyPromptDirection

    _, _, store = source_pass
    sources = torch.cat([tiny_models.conditioning(case.kind, seed=s)[0][0] for s in (11, 12)])
    targets = torch.cat([tiny_models.conditioning(case.kind, seed=s)[0][0] for s in (13, 14)])
    vector, _ = prompt_direction(sources, targets)
    direction = Direction(vectors=vector[None], space="text", method="prompt")
    settings = dict(edit=IDENTITY, cross_steps=1.0, self_mode="replace", self_steps=1.0)
    injected = case.sample(case.inject(store, **settings), positive=case.target)
    with torch.inference_mode():
        unmoved = RetraceApplyPromptDirection.execute(case.target, direction, 0.0).result[0]
        moved = RetraceApplyPromptDirection.execute(case.target, direction, 1.0).result[0]
    assert torch.equal(case.sample(case.inject(store, **settings), positive=unmoved), injected)
    edited = case.sample(case.inject(store, **settings), positive=moved)
    assert torch.isfinite(edited).all() and (edited - injected).abs().max().item() > 1e-3
