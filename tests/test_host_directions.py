"""The edit-direction nodes on the real host in-process: SeFa and GANSpace on a tiny StyleGAN2 checked against an
independent factorisation, boundaries learned and loaded, directions applied, swept, interpolated and style-mixed
with exact identities, files that never overwrite, mismatched directions refused, and text directions that leave
their input CONDITIONING untouched."""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from paths import HOST, ensure_host

if not HOST.is_dir():
    pytest.skip(f"no host at {HOST}: run `make setup` (GUIDE section 1)", allow_module_level=True)
ensure_host()

import folder_paths  # noqa: E402
import tiny_models  # noqa: E402
from retrace.editing.directions import Direction  # noqa: E402
from retrace.inversion.gan_latent import GanLatent  # noqa: E402
from retrace.nodes import _records, _stylegan  # noqa: E402
from retrace.nodes import directions as nodes  # noqa: E402
from retrace.nodes.stylegan import RetraceStyleGANGenerate, RetraceStyleGANLoader  # noqa: E402
from stylegan_files import tiny_generator, write_safetensors  # noqa: E402

pytestmark = pytest.mark.host

NODE_IDS = ["RetraceSeFa", "RetraceGANSpace", "RetraceLoadBoundary", "RetraceLearnBoundary",
            "RetraceConditionalDirection", "RetraceApplyDirection", "RetraceDirectionSweep",
            "RetraceInterpolateLatents", "RetraceStyleMix", "RetraceSaveDirection", "RetraceLoadDirection",
            "RetracePromptDirection", "RetraceApplyPromptDirection"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Iterator[Path]:
    """models/stylegan/ with two tiny StyleGAN2s of the same shape (different weights) and one with a narrower w;
    models/retrace_directions/ for boundary files."""
    root = tmp_path_factory.mktemp("stylegan")
    write_safetensors(root / "a.safetensors", tiny_generator("stylegan2", seed=0))
    write_safetensors(root / "b.safetensors", tiny_generator("stylegan2", seed=1))
    write_safetensors(root / "narrow.safetensors", tiny_generator("stylegan2", seed=0, w_dim=16))
    boundaries = tmp_path_factory.mktemp("retrace_directions")
    _stylegan.register_folders()
    nodes.register_direction_folder()
    folder_paths.add_model_folder_path(_stylegan.FOLDER, str(root), is_default=True)
    folder_paths.add_model_folder_path(nodes.DIRECTION_FOLDER, str(boundaries), is_default=True)
    yield boundaries
    folder_paths.folder_names_and_paths[_stylegan.FOLDER][0].remove(str(root))
    folder_paths.folder_names_and_paths[nodes.DIRECTION_FOLDER][0].remove(str(boundaries))


def run(node: type, *args: Any, **kwargs: Any) -> tuple:
    with torch.inference_mode():
        return node.execute(*args, **kwargs).result


def load(name: str):
    return run(RetraceStyleGANLoader, generator=name, dtype="auto")[0]


def generate(gan, seed: int = 0, batch_size: int = 1, latent: GanLatent | None = None) -> tuple:
    return run(RetraceStyleGANGenerate, gan, seed, batch_size, 1.0, 0, "const", 0, latent)


def mapped(gan, n: int, seed: int) -> torch.Tensor:
    """w [n, w_dim] of seeded z, no truncation."""
    z = torch.randn([n, gan.info.z_dim], generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return gan.load().mapping(z, None)[:, 0].cpu()


def w_latent(gan, ws: torch.Tensor) -> GanLatent:
    """W latents [n, num_ws, w_dim] from w [n, w_dim]."""
    return GanLatent(ws=ws[:, None].repeat(1, gan.info.num_ws, 1), space="w", model_id=gan.model_id,
                     family=gan.family)


def reference_sefa(gan, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right singular vectors of the row-normalised stacked affines (float64), and their eigenvalues S^2."""
    A = torch.cat([a.weight.detach().double().cpu() for _, idx, a in gan.info.style_layers() if start <= idx < end])
    A = A / A.norm(dim=1, keepdim=True)
    _, S, Vh = torch.linalg.svd(A, full_matrices=False)
    return Vh, S ** 2


def test_every_node_is_listed_with_a_tooltip_on_every_input(folder: Path) -> None:
    assert [n.define_schema().node_id for n in nodes.NODES] == NODE_IDS
    for node in nodes.NODES:
        schema = node.define_schema()
        assert schema.category in (nodes.GAN_CATEGORY, nodes.TEXT_CATEGORY)
        assert all(i.tooltip for i in schema.inputs), node.__name__
    assert folder_paths.folder_names_and_paths[nodes.DIRECTION_FOLDER][1] >= {".npy", ".safetensors", ".pt", ".pth"}


def test_sefa_node_matches_an_independent_factorisation(folder: Path) -> None:
    gan = load("a.safetensors")
    num_ws = gan.info.num_ws
    direction = run(nodes.RetraceSeFa, gan, "all", 6)[0]
    assert direction.vectors.shape == (6, 32) and direction.method == "sefa" and direction.space == "w"
    assert direction.layers == (0, num_ws) and direction.num_ws == num_ws and direction.model_id == gan.model_id
    torch.testing.assert_close(direction.vectors @ direction.vectors.T, torch.eye(6), rtol=0, atol=1e-5)
    Vh, eig = reference_sefa(gan, 0, num_ws)
    cos = (direction.vectors.double() * Vh[:6]).sum(1).abs()
    assert float(cos.min()) > 0.9999, cos
    torch.testing.assert_close(direction.scales.double(), eig[:6], rtol=1e-5, atol=1e-6)

    coarse = run(nodes.RetraceSeFa, gan, "coarse", 3)[0]
    assert coarse.layers == (0, 4)
    Vh, _ = reference_sefa(gan, 0, 4)
    assert float((coarse.vectors.double() * Vh[:3]).sum(1).abs().min()) > 0.9999
    assert run(nodes.RetraceSeFa, gan, "2-3", 2)[0].layers == (2, 4)
    with pytest.raises(ValueError, match=rf"layers '3-20' are outside 0-{num_ws - 1}"):
        run(nodes.RetraceSeFa, gan, "3-20", 2)
    with pytest.raises(ValueError, match="count must be 1..32"):
        run(nodes.RetraceSeFa, gan, "all", 33)


def test_ganspace_node_is_the_pca_of_mapped_seeded_z(folder: Path) -> None:
    gan = load("a.safetensors")
    direction = run(nodes.RetraceGANSpace, gan, 3000, 5, "2-4", 7)[0]
    assert direction.vectors.shape == (5, 32) and direction.method == "ganspace" and direction.layers == (2, 5)
    torch.testing.assert_close(direction.vectors @ direction.vectors.T, torch.eye(5), rtol=0, atol=1e-5)
    ws = mapped(gan, 3000, 7).double()
    mean = ws.mean(0)
    _, S, Vh = torch.linalg.svd(ws - mean, full_matrices=False)
    assert float((direction.vectors.double() * Vh[:5]).sum(1).abs().min()) > 0.999
    torch.testing.assert_close(direction.mean.double(), mean, rtol=0, atol=1e-5)
    stds = ((ws - mean) @ direction.vectors.double().T).std(0)
    torch.testing.assert_close(direction.scales.double(), stds, rtol=1e-4, atol=1e-6)
    assert bool((direction.scales[:-1] >= direction.scales[1:]).all())
    with pytest.raises(ValueError, match="components must be 1..32"):
        run(nodes.RetraceGANSpace, gan, 3000, 40, "all", 0)

    # A GANSpace strength is in standard deviations along the component; 'auto' moves the direction's own rows.
    latent = generate(gan, seed=2)[1]
    moved = run(nodes.RetraceApplyDirection, latent, direction, 1, 2.0, "auto")[0]
    step = moved.ws - latent.ws
    torch.testing.assert_close(step[0, 2:5], (2.0 * direction.scales[1] * direction.vectors[1]).expand(3, -1),
                               rtol=0, atol=1e-6)
    assert torch.equal(step[0, :2], torch.zeros(2, 32)) and torch.equal(step[0, 5:], torch.zeros(1, 32))
    assert moved.space == "w+"


def test_apply_direction_zero_is_exact_and_plus_minus_round_trips(folder: Path) -> None:
    gan = load("a.safetensors")
    latent = generate(gan, seed=1, batch_size=2)[1]
    before = latent.ws.clone()
    direction = run(nodes.RetraceSeFa, gan, "all", 4)[0]
    same = run(nodes.RetraceApplyDirection, latent, direction, 2, 0.0, "auto")[0]
    assert torch.equal(same.ws, latent.ws) and same.ws is not latent.ws and same.space == "w"
    up = run(nodes.RetraceApplyDirection, latent, direction, 2, 3.0, "auto")[0]
    assert up.space == "w", "every row moved alike: still W"
    torch.testing.assert_close(up.ws - latent.ws, (3.0 * direction.vectors[2]).expand_as(latent.ws), rtol=0,
                               atol=1e-6)
    back = run(nodes.RetraceApplyDirection, up, direction, 2, -3.0, "auto")[0]
    torch.testing.assert_close(back.ws, latent.ws, rtol=0, atol=1e-6)
    rows = run(nodes.RetraceApplyDirection, latent, direction, 0, 1.5, "1-2")[0]
    assert rows.space == "w+" and torch.equal(rows.ws[:, 3:], latent.ws[:, 3:]) and torch.equal(rows.ws[:, :1],
                                                                                             latent.ws[:, :1])
    assert torch.equal(latent.ws, before), "the input latent is never changed"
    with pytest.raises(ValueError, match=r"direction index 4 is out of range"):
        run(nodes.RetraceApplyDirection, latent, direction, 4, 1.0, "auto")


def test_sweep_middle_is_the_plain_render(folder: Path) -> None:
    gan = load("a.safetensors")
    image, latent = generate(gan, seed=5)
    direction = run(nodes.RetraceSeFa, gan, "all", 3)[0]
    images, latents = run(nodes.RetraceDirectionSweep, gan, latent, direction, 0, -3.0, 3.0, 7, "auto")
    assert images.shape == (7, 16, 16, 3) and latents.batch_size == 7
    assert torch.equal(images[3], image[0]), "strength 0 renders the latent as it is"
    assert torch.equal(latents.ws[3], latent.ws[0])
    for i, s in enumerate((-3.0, -2.0, -1.0, 0.0, 1.0, 2.0, 3.0)):
        torch.testing.assert_close(latents.ws[i], latent.ws[0] + s * direction.vectors[0], rtol=0, atol=1e-6)
    assert not torch.equal(images[0], images[6])
    with pytest.raises(ValueError, match="holds a batch of 2 latents"):
        run(nodes.RetraceDirectionSweep, gan, generate(gan, batch_size=2)[1], direction, 0, -3.0, 3.0, 7, "auto")


def noisy(gan, latent: GanLatent, seed: int) -> GanLatent:
    """The latent with its own noise maps (as projection returns them)."""
    gen = torch.Generator().manual_seed(seed)
    maps = {k: torch.randn(1, 1, *v.shape, generator=gen) for k, v in gan.info.noise_maps().items()}
    return GanLatent(ws=latent.ws, space=latent.space, model_id=latent.model_id, family=latent.family, noise=maps)


def test_interpolation_ends_are_the_two_renders(folder: Path) -> None:
    gan = load("a.safetensors")
    a = noisy(gan, generate(gan, seed=3)[1], seed=0)
    b = generate(gan, seed=4)[1]
    render_a, render_b = generate(gan, latent=a)[0], generate(gan, latent=b)[0]
    images, latents = run(nodes.RetraceInterpolateLatents, gan, a, b, 5)
    assert images.shape == (5, 16, 16, 3) and latents.space == "w"
    assert torch.equal(images[0], render_a[0]) and torch.equal(images[-1], render_b[0])
    torch.testing.assert_close(latents.ws[2], (a.ws[0] + b.ws[0]) / 2, rtol=0, atol=1e-6)
    key = next(iter(a.noise))
    assert torch.equal(latents.noise[key][0], a.noise[key][0])


def test_style_mix_of_a_latent_with_itself_is_its_render(folder: Path) -> None:
    gan = load("a.safetensors")
    latent = noisy(gan, generate(gan, seed=6)[1], seed=1)
    render = generate(gan, latent=latent)[0]
    images, mixed = run(nodes.RetraceStyleMix, gan, latent, latent, 3)
    assert torch.equal(images, render) and torch.equal(mixed.ws, latent.ws) and mixed.space == "w"
    other = generate(gan, seed=7)[1]
    images, mixed = run(nodes.RetraceStyleMix, gan, latent, other, 2)
    assert mixed.space == "w+"
    assert torch.equal(mixed.ws[0, :2], latent.ws[0, :2]) and torch.equal(mixed.ws[0, 2:], other.ws[0, 2:])
    assert torch.equal(mixed.noise["b4.conv1"], latent.noise["b4.conv1"]), "noise of rows before the crossover"
    with pytest.raises(ValueError, match=rf"crossover must be 0..{gan.info.num_ws}"):
        run(nodes.RetraceStyleMix, gan, latent, other, 99)


def test_load_boundary_reads_user_files_and_refuses_bad_ones(folder: Path) -> None:
    gan = load("a.safetensors")
    normal = torch.randn(32, generator=torch.Generator().manual_seed(0))
    normal = normal / normal.norm()
    np.save(folder / "smile.npy", normal.numpy()[None].astype(np.float64))
    torch.save({"direction": normal[None] * 2}, folder / "age.pt")
    np.save(folder / "narrow.npy", np.ones(16, dtype=np.float32))
    np.save(folder / "evil.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    direction = run(nodes.RetraceLoadBoundary, "smile.npy", gan)[0]
    assert direction.method == "file" and direction.model_id == gan.model_id and direction.num_ws == gan.info.num_ws
    torch.testing.assert_close(direction.vectors, normal[None], rtol=0, atol=1e-7)
    torch.testing.assert_close(run(nodes.RetraceLoadBoundary, "age.pt", gan)[0].vectors, 2 * normal[None])
    with pytest.raises(ValueError, match="vectors of 16 values, but a.safetensors has w of 32"):
        run(nodes.RetraceLoadBoundary, "narrow.npy", gan)
    with pytest.raises(ValueError, match="object arrays need unpickling"):
        run(nodes.RetraceLoadBoundary, "evil.npy", gan)
    assert nodes.RetraceLoadBoundary.validate_inputs(boundary_file="missing.npy").startswith("direction file not")


def test_learned_boundary_recovers_the_separating_direction(folder: Path) -> None:
    gan = load("a.safetensors")
    ws = mapped(gan, 240, seed=11)
    known = torch.randn(32, generator=torch.Generator().manual_seed(3))
    known = known / known.norm()
    along = ws @ known
    margin = 2.0 * float(along.std())
    flat = ws - along[:, None] * known  # no spread along the known direction: the sets differ only along it
    positive = w_latent(gan, flat[:120] + margin * known)
    negative = w_latent(gan, flat[120:] - margin * known)
    for method in nodes.BOUNDARY_METHODS:
        direction = run(nodes.RetraceLearnBoundary, gan, positive, negative, method)[0]
        cos = float(direction.vectors[0] @ known)
        assert cos >= 0.9, (method, cos)
        assert direction.model_id == gan.model_id and direction.method == nodes.BOUNDARY_METHODS[method]
    with pytest.raises(ValueError, match="holds 1 latent; give at least 2"):
        run(nodes.RetraceLearnBoundary, gan, positive.rows([0]), negative, "svm")

    # Conditional: the result has nothing left along the removed directions.
    boundary = run(nodes.RetraceLearnBoundary, gan, positive, negative, "svm")[0]
    sefa = run(nodes.RetraceSeFa, gan, "all", 4)[0]
    one = run(nodes.RetraceConditionalDirection, boundary, 0, sefa, 1)[0]
    every = run(nodes.RetraceConditionalDirection, boundary, 0, sefa, -1)[0]
    assert one.method == "conditional" and abs(float(one.vectors[0] @ sefa.vectors[1])) < 1e-6
    assert float((every.vectors[0] @ sefa.vectors.T).abs().max()) < 1e-6
    assert abs(float(every.vectors[0].norm()) - 1) < 1e-6
    with pytest.raises(ValueError, match="lies in the span"):
        run(nodes.RetraceConditionalDirection, sefa, 2, sefa, -1)


def test_save_and_load_round_trip_and_never_overwrite(folder: Path, output_dir: Path) -> None:
    gan = load("a.safetensors")
    direction = run(nodes.RetraceGANSpace, gan, 500, 4, "coarse", 0)[0]
    run(nodes.RetraceSaveDirection, direction, "dirs")
    run(nodes.RetraceSaveDirection, direction, "dirs")
    names = sorted(p.name for p in (output_dir / _records.OUTPUT_SUBFOLDER).iterdir())
    assert names == ["dirs_00001.safetensors", "dirs_00002.safetensors"]
    assert nodes.RetraceLoadDirection.validate_inputs(direction_file=names[0]) is True
    back = run(nodes.RetraceLoadDirection, names[0], gan)[0]
    for field in ("vectors", "scales", "mean"):
        assert torch.equal(getattr(back, field), getattr(direction, field)), field
    assert (back.method, back.model_id, back.num_ws, back.layers) == ("ganspace", gan.model_id, gan.info.num_ws,
                                                                      (0, 4))
    assert run(nodes.RetraceLoadDirection, names[1])[0].count == 4  # no generator: no check
    with pytest.raises(ValueError, match=rf"this direction was made for generator {gan.model_id}; generator "
                                         r"b.safetensors belongs to generator"):
        run(nodes.RetraceLoadDirection, names[0], load("b.safetensors"))


def test_directions_from_another_generator_or_space_are_refused(folder: Path) -> None:
    gan, other, narrow = load("a.safetensors"), load("b.safetensors"), load("narrow.safetensors")
    latent = generate(gan, seed=1)[1]
    foreign = run(nodes.RetraceSeFa, other, "all", 2)[0]
    with pytest.raises(ValueError, match=rf"this direction was made for generator {other.model_id}; the latent "
                                         rf"belongs to generator {gan.model_id}"):
        run(nodes.RetraceApplyDirection, latent, foreign, 0, 1.0, "auto")
    with pytest.raises(ValueError, match="this direction was made for generator"):
        run(nodes.RetraceDirectionSweep, gan, latent, foreign, 0, -1.0, 1.0, 3, "auto")
    thin = run(nodes.RetraceSeFa, narrow, "all", 2)[0]
    with pytest.raises(ValueError, match="its vectors have 16 values, but the latent has w of 32"):
        run(nodes.RetraceApplyDirection, latent, thin, 0, 1.0, "auto")
    text = Direction(vectors=torch.zeros(1, 77, 8), space="text", method="prompt")
    with pytest.raises(ValueError, match="this is a 'text' direction"):
        run(nodes.RetraceApplyDirection, latent, text, 0, 1.0, "auto")
    with pytest.raises(ValueError, match="this is a StyleGAN 'w' direction"):
        run(nodes.RetraceApplyPromptDirection, tiny_models.conditioning("sd15"), foreign, 1.0)


class PromptClip:
    """Stands in for the host's CLIP: each prompt encodes to seeded SDXL-shaped conditioning (77 tokens per 75
    words, as the host's chunking gives)."""

    def tokenize(self, text: str) -> dict[str, Any]:
        return {"text": text}

    def encode_from_tokens_scheduled(self, tokens: dict[str, Any]) -> list:
        text = tokens["text"]
        chunks = 1 + len(text.split()) // 76
        return tiny_models.conditioning("sdxl", seed=zlib.crc32(text.encode()), tokens=77 * chunks)


def test_prompt_direction_is_the_difference_of_means_and_zero_for_the_same_prompts() -> None:
    clip = PromptClip()
    same = run(nodes.RetracePromptDirection, clip, "a cat\na photo of a cat\n", "a photo of a cat\n\na cat")[0]
    assert same.space == "text" and same.vectors.shape == (1, 77, 2048) and same.pooled.shape == (1, 1280)
    assert int(torch.count_nonzero(same.vectors)) == 0 and int(torch.count_nonzero(same.pooled)) == 0
    direction = run(nodes.RetracePromptDirection, clip, "a cat\na photo of a cat", "a dog")[0]
    encode = clip.encode_from_tokens_scheduled
    cat = (encode({"text": "a cat"})[0][0] + encode({"text": "a photo of a cat"})[0][0]) / 2
    torch.testing.assert_close(direction.vectors[0], encode({"text": "a dog"})[0][0][0] - cat[0], rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="different token lengths"):
        run(nodes.RetracePromptDirection, clip, "a cat\n" + "word " * 80, "a dog")
    with pytest.raises(ValueError, match="target_prompts is empty"):
        run(nodes.RetracePromptDirection, clip, "a cat", "  \n ")


def test_apply_prompt_direction_is_new_linear_and_leaves_the_input_alone() -> None:
    clip = PromptClip()
    direction = run(nodes.RetracePromptDirection, clip, "a cat", "a dog\na puppy")[0]
    conditioning = tiny_models.conditioning("sdxl", batch=2, seed=5)
    conditioning.append([conditioning[0][0].flip(0).clone(), {"pooled_output": torch.ones(2, 1280)}])
    snapshot = [[c.clone(), {k: v.clone() if torch.is_tensor(v) else v for k, v in e.items()}]
                for c, e in conditioning]
    zero = run(nodes.RetraceApplyPromptDirection, conditioning, direction, 0.0)[0]
    one = run(nodes.RetraceApplyPromptDirection, conditioning, direction, 1.0)[0]
    two = run(nodes.RetraceApplyPromptDirection, conditioning, direction, 2.0)[0]
    assert zero is not conditioning and len(zero) == 2
    for (c, e), (c0, e0), (c1, e1), (c2, e2), (cs, es) in zip(conditioning, zero, one, two, snapshot):
        assert torch.equal(c, cs) and torch.equal(e["pooled_output"], es["pooled_output"]), "input changed"
        assert torch.equal(c0, c) and c0 is not c and torch.equal(e0["pooled_output"], e["pooled_output"])
        assert e0 is not e and {k: v for k, v in e1.items() if k != "pooled_output"} == \
            {k: v for k, v in e.items() if k != "pooled_output"}
        torch.testing.assert_close(c1 - c, direction.vectors.expand_as(c), rtol=0, atol=1e-5)
        torch.testing.assert_close(c2 - c, 2 * (c1 - c), rtol=0, atol=1e-5)
        torch.testing.assert_close(e2["pooled_output"] - e["pooled_output"],
                                   2 * (e1["pooled_output"] - e["pooled_output"]), rtol=0, atol=1e-5)
        torch.testing.assert_close(e1["pooled_output"] - e["pooled_output"], direction.pooled.expand(2, -1),
                                   rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="conditioning entry 0 has 154 tokens of 2048 values"):
        run(nodes.RetraceApplyPromptDirection, tiny_models.conditioning("sdxl", tokens=154), direction, 1.0)
