"""Retrace Load Toy World on the host: a toy world file (here with seeded random weights; the shipped one is trained)
loads into the host's own classes, runs through the host's CLIP, sampler and VAE, and bad files are refused before
any model is built."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from paths import HOST, ensure_host

if not HOST.is_dir():
    pytest.skip(f"no host at {HOST}: run `make setup` (GUIDE section 1)", allow_module_level=True)
ensure_host()

import comfy.sample  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from retrace.nodes import _toy_world as toy  # noqa: E402
from retrace.nodes.toy_world import RetraceLoadToyWorld  # noqa: E402
from scripts import train_toy_world as train  # noqa: E402

pytestmark = pytest.mark.host


@pytest.fixture(scope="module")
def toy_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    patcher, clip, vae = train.untrained(seed=0)
    return train.save(tmp_path_factory.mktemp("toy") / "sd15_toy.safetensors", patcher, clip, vae, {"seed": 0})


def rewritten(source: Path, target: Path, tensors=None, metadata=None) -> Path:
    with safe_open(str(source), framework="pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
        meta = dict(f.metadata())
    if tensors:
        tensors(state)
    if metadata:
        metadata(meta)
    save_file(state, str(target), metadata=meta)
    return target


def generates(model, clip, vae, latent_shape: tuple[int, ...], scheduler: str, cfg: float) -> list:
    """Two sampler steps from a prompt through the host's CLIP, sampler and VAE: a finite 64 px picture that
    encodes back to ``latent_shape``. Returns the prompt's CONDITIONING."""
    positive = clip.encode_from_tokens_scheduled(clip.tokenize("a red circle and a blue square on a white background"))
    assert positive[0][0].shape == (1, 77, toy.TEXT_CONFIG["hidden_size"])
    latent = torch.zeros(latent_shape)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(0))
    samples = comfy.sample.sample(model, noise, 2, cfg, "euler", scheduler, positive, positive, latent,
                                  disable_pbar=True, seed=0)
    image = vae.decode(samples)
    assert image.shape == (1, 64, 64, 3) and bool(torch.isfinite(image).all())
    assert vae.encode(image).shape == latent_shape
    return positive


def test_a_toy_world_file_runs_through_the_host(toy_file: Path) -> None:
    model, clip, vae = toy.load("sd15", toy_file)
    assert type(model.model).__name__ == "BaseModel" and model.model.model_config.__class__.__name__ == "SD15"
    generates(model, clip, vae, (1, 4, 8, 8), "normal", 1.0)


def test_the_token_table_keeps_the_world_rows_and_zeroes_the_rest(toy_file: Path) -> None:
    _, clip, _ = toy.load("sd15", toy_file)
    table = toy.text_module(clip).text_model.embeddings.token_embedding.weight
    with safe_open(str(toy_file), framework="pt") as f:
        rows = f.get_tensor("text.token_rows").long()
        stored = f.get_tensor("text.text_model.embeddings.token_embedding.weight")
    assert torch.equal(table[rows], stored.float())
    others = torch.ones(table.shape[0], dtype=torch.bool)
    others[rows] = False
    assert int(table[others].abs().sum()) == 0 and len(rows) < 40


def test_the_node_refuses_a_family_it_lacks() -> None:
    with pytest.raises(ValueError, match=r"no 'sdxl' family; it has \['flux', 'sd15'\]"):
        RetraceLoadToyWorld.execute("sdxl")


@pytest.fixture(scope="module")
def flux_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    patcher, clip, vae = train.untrained(seed=0, family="flux")
    return train.save(tmp_path_factory.mktemp("toy") / "flux_toy.safetensors", patcher, clip, vae, {"seed": 0},
                      "flux")


def test_a_flux_toy_file_runs_through_the_host(flux_file: Path) -> None:
    """The host's detection reads the file's DiT as FluxSchnell (real CFG, no guidance input), the text model gives
    the sequence and the pooled vector Flux takes, and the VAE maps 64 px to 16 x 16 x 16 and back."""
    with safe_open(str(flux_file), framework="pt") as f:
        assert any(k.endswith("key_norm.scale") for k in f.keys())  # the checkpoint's names, for every host
    model, clip, vae = toy.load("flux", flux_file)
    assert type(model.model.model_config).__name__ == "FluxSchnell"
    assert model.get_model_object("latent_format").latent_channels == 16
    positive = generates(model, clip, vae, (1, 16, 16, 16), "simple", 3.0)
    assert positive[0][1]["pooled_output"].shape == (1, toy.TEXT_CONFIG["hidden_size"])


def test_a_flux_toy_file_with_heads_that_do_not_divide_is_refused(flux_file: Path, tmp_path: Path) -> None:
    target = rewritten(flux_file, tmp_path / "bad.safetensors",
                       metadata=lambda m: m.update(dit_config=json.dumps({"axes_dim": [8, 12, 12], "num_heads": 3})))
    with pytest.raises(ValueError, match=r"heads \(3\) and rotary axes \(\[8, 12, 12\]\) do not divide"):
        toy.load("flux", target)


def test_the_joint_attention_maps_leave_the_host_call_unchanged() -> None:
    """The flux toy's token loss reads the joint attention through the host's override seam: the model's output is
    the same bit for bit with the maps kept, one map per block of image rows over the 77 text columns, each row
    a share of a softmax (at most 1)."""
    patcher, clip, _vae = train.untrained(seed=2, family="flux")
    ids = [[int(t) for t, _w in clip.tokenize("a red circle")["l"][0]]] * 2
    context, pooled = train.encode_pooled(clip, ids)
    x = torch.randn(2, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.3, 0.8])
    hooks = train.JointAttentionMaps()
    with torch.no_grad():
        plain = patcher.model.apply_model(x, t, c_crossattn=context, y=pooled)
        kept = patcher.model.apply_model(x, t, c_crossattn=context, y=pooled, transformer_options=hooks.options)
    dit = toy.diffusion_module(patcher)
    assert torch.equal(plain, kept)
    assert len(hooks.maps) == len(dit.double_blocks) + len(dit.single_blocks)
    assert all(m.shape == (2, 64, 77) and float(m.sum(-1).max()) <= 1 + 1e-6 for m in hooks.maps)


@pytest.mark.parametrize("damage, message", [
    ("truncated", "cannot be read as a toy world file"),
    ("format", "is not a toy world sd15 file"),
    ("nan", "NaN or infinite weights"),
    ("huge", "sizes outside a toy world's"),
    ("missing", "tensors missing"),
])
def test_bad_files_are_refused_before_anything_is_built(toy_file: Path, tmp_path: Path, damage: str,
                                                        message: str, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "bad.safetensors"
    if damage == "truncated":
        target.write_bytes(toy_file.read_bytes()[:1000])
    elif damage == "format":
        rewritten(toy_file, target, metadata=lambda m: m.update(format="something-else"))
    elif damage == "nan":
        rewritten(toy_file, target, tensors=lambda s: s["unet.out.2.weight"].view(-1)[0:1].fill_(float("nan")))
    elif damage == "huge":
        config = {**toy.TEXT_CONFIG, "hidden_size": 1 << 20}
        rewritten(toy_file, target, metadata=lambda m: m.update(text_config=json.dumps(config)))
    else:
        rewritten(toy_file, target, tensors=lambda s: s.pop("unet.out.2.weight"))
    built = []
    if damage != "missing":  # a missing tensor is only found against the built module
        monkeypatch.setattr(toy, "build_unet", lambda *a, **k: built.append(1))
    with pytest.raises(ValueError, match=message):
        toy.load("sd15", target)
    assert built == []


def test_the_prompt_puts_each_content_word_at_its_position() -> None:
    _patcher, clip, _vae = train.untrained(seed=0)
    train.check_single_tokens(clip)
    scene = train.scenes(1, seed=5)[0]
    tokens = [t for t, _w in clip.tokenize(scene.prompt)["l"][0]]
    words = dict(zip(train.PROMPT_WORDS, scene.prompt.split()))
    for position, name in zip(train.CONTENT_POSITIONS, [w for w in train.PROMPT_WORDS if w in train.REGION_OF]):
        assert tokens[position] == clip.tokenize(words[name])["l"][0][1][0], (name, position)


def test_the_kept_attention_maps_are_the_layers_own() -> None:
    """The token loss reads the probabilities the hooks recompute from to_q and to_k: the host's own attention
    function, given one-hot token columns as every head's values, returns those probabilities (float32: within
    1e-5)."""
    from comfy.ldm.modules.attention import optimized_attention

    patcher, clip, _vae = train.untrained(seed=1)
    unet = toy.diffusion_module(patcher)
    hooks = train.CrossAttentionMaps(unet)
    calls: list[tuple] = []
    handles = [m.register_forward_hook(lambda m, a, k, o: calls.append((m, a[0], k["context"])), with_kwargs=True)
               for name, m in unet.named_modules() if name.endswith("attn2")]
    context = train.encode_prompts(clip, [[int(t) for t, _w in clip.tokenize("a red circle")["l"][0]]] * 2)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        patcher.model.apply_model(x, torch.full((2,), 5.0), c_crossattn=context)
        for h in handles:
            h.remove()
        hooks.close()
        assert len(hooks.maps) == len(calls) >= 3 and {m.heads for m, _x, _c in calls} != {1}
        for maps, (module, queries, ctx) in zip(hooks.maps, calls):
            tokens, width = ctx.shape[1], module.dim_head
            q, k = module.to_q(queries), module.to_k(ctx)
            columns = []
            for first in range(0, tokens, width):  # values picking out tokens first .. first + width, every head
                one_hot = torch.eye(tokens + width)[:tokens, first:first + width]
                one_hot = one_hot.repeat(1, module.heads).expand(ctx.shape[0], -1, -1)
                out = optimized_attention(q, k, one_hot, module.heads)
                columns.append(out.view(*out.shape[:2], module.heads, width).mean(2))
            assert torch.allclose(maps, torch.cat(columns, -1)[..., :tokens], atol=1e-5), module


def test_the_token_loss_is_the_share_of_attention_outside_each_words_region() -> None:
    scenes = train.scenes(2, seed=3)
    masks = train.word_masks(scenes)  # [2, words, 64, 64]
    words, side = masks.shape[1], 8
    region = torch.nn.functional.adaptive_avg_pool2d(masks, side).flatten(2)  # [2, words, 64]
    keep = torch.ones(2, dtype=torch.bool)
    inside = torch.zeros(2, side * side, 77)
    peak = region.max(-1, keepdim=True).values
    best = (region == peak).float()  # each word's attention on its region's fullest cells (a triangle has none full)
    inside[..., train.CONTENT_POSITIONS] = (best / best.sum(-1, keepdim=True)).transpose(1, 2)
    assert abs(float(train.token_loss([inside], masks, keep)) - float((1 - peak).mean())) < 1e-6
    uniform = torch.full((2, side * side, 77), 1 / 77)
    expected = float((1 - region.mean(-1)).mean())  # a uniform map keeps the region's area share inside
    assert abs(float(train.token_loss([uniform], masks, keep)) - expected) < 1e-6
    assert words == len(train.CONTENT_POSITIONS) == 6
