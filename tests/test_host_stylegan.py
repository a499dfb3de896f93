"""The StyleGAN nodes on the real host in-process: files from a registered models folder, the host's model
manager, progress with previews, interrupt, PTI as a patched copy, and bad input refused before any work."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from paths import HOST, ensure_host

if not HOST.is_dir():
    pytest.skip(f"no host at {HOST}: run `make setup` (GUIDE section 1)", allow_module_level=True)
ensure_host()

import comfy.model_management  # noqa: E402
import comfy.utils  # noqa: E402
import folder_paths  # noqa: E402
from retrace.inversion.gan_latent import GanLatent  # noqa: E402
from retrace.inversion.gan_projection import psnr  # noqa: E402
from retrace.models.loader import UnsafeFileError  # noqa: E402
from retrace.nodes import _records, _stylegan  # noqa: E402
from retrace.nodes.gan_projection import RetraceStyleGANPivotalTuning, RetraceStyleGANProject  # noqa: E402
from retrace.nodes.stylegan import (  # noqa: E402
    RetraceGANLatentBatch,
    RetraceGANLatentLoad,
    RetraceGANLatentPick,
    RetraceGANLatentSave,
    RetraceStyleGANConvert,
    RetraceStyleGANGenerate,
    RetraceStyleGANLoader,
)
from stylegan_files import (  # noqa: E402
    tiny_generator,
    write_malicious_pickles,
    write_nvlabs_pickle,
    write_rosinality_pt,
    write_safetensors,
)

pytestmark = pytest.mark.host

PROJECT = dict(space="W+", steps=60, recipe="retrace (fast)", learning_rate=0.0, optimize_noise=False,
               lpips_backbone="none", ssim_weight=1.0, downscale=1, grayscale=False, on_mismatch="refuse", seed=0)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Iterator[Path]:
    """models/stylegan/ with the same tiny StyleGAN2 in three formats, a StyleGAN3 and a malicious pickle."""
    root = tmp_path_factory.mktemp("stylegan")
    sg2 = tiny_generator("stylegan2", seed=0)
    write_nvlabs_pickle(root / "sg2_nvlabs.pkl", sg2, source_payload=root / "payload_ran")
    write_rosinality_pt(root / "sg2_rosinality.pt", sg2)
    write_safetensors(root / "sg2_retrace.safetensors", sg2)
    write_safetensors(root / "sg3.safetensors", tiny_generator("stylegan3", seed=0))
    evil = write_malicious_pickles(root / "evil", root / "marker")
    shutil.copy(evil[sorted(evil)[0]], root / "evil.pkl")
    _stylegan.register_folders()
    folder_paths.add_model_folder_path(_stylegan.FOLDER, str(root), is_default=True)
    yield root
    folder_paths.folder_names_and_paths[_stylegan.FOLDER][0].remove(str(root))


def load(name: str):
    with torch.inference_mode():
        return RetraceStyleGANLoader.execute(generator=name, dtype="auto").result[0]


def generate(gan, seed: int = 0, batch_size: int = 2, psi: float = 1.0, noise_mode: str = "const", latent=None):
    with torch.inference_mode():
        return RetraceStyleGANGenerate.execute(gan, seed, batch_size, psi, 0, noise_mode, 0, latent).result


def run_project(gan, image, mask=None, **overrides):
    with torch.inference_mode():
        return RetraceStyleGANProject.execute(gan, image, mask=mask, **{**PROJECT, **overrides}).result


def test_every_format_loads_into_the_model_manager_and_renders_the_same(folder: Path) -> None:
    images, ids = {}, set()
    for name in ("sg2_nvlabs.pkl", "sg2_rosinality.pt", "sg2_retrace.safetensors"):
        gan = load(name)
        ids.add(gan.model_id)
        assert gan.family == "stylegan2" and isinstance(gan.patcher, comfy.model_patcher.ModelPatcher)
        images[name], latent = generate(gan)
        assert images[name].shape == (2, 16, 16, 3) and latent.space == "w"
    first = images["sg2_nvlabs.pkl"]
    assert all(torch.equal(first, img) for img in images.values())
    assert len(ids) == 1, "the identity follows the weights, not the file format"
    assert not (folder / "payload_ran").exists(), "the pickle's embedded source must never run"
    assert generate(load("sg3.safetensors"))[0].shape == (2, 16, 16, 3)


def test_a_malicious_pickle_is_refused_and_runs_nothing(folder: Path) -> None:
    with pytest.raises(UnsafeFileError, match="evil.pkl"):
        load("evil.pkl")
    assert not (folder / "marker").exists()
    assert RetraceStyleGANLoader.validate_inputs(generator="missing.pkl").startswith("generator file not found")


def test_seeds_follow_the_nvlabs_numbering_and_noise_modes(folder: Path) -> None:
    gan = load("sg2_retrace.safetensors")
    batch, latent = generate(gan, seed=7, batch_size=3)
    for i in range(3):
        single, one = generate(gan, seed=7 + i, batch_size=1)
        # The batch size changes how the convolutions block their sums, so float32 additions run in another order:
        # closeness at float32 precision (torch's float32 tolerances, rtol 1.3e-6 and atol 1e-5), not bit equality.
        torch.testing.assert_close(single[0], batch[i])
    z = torch.from_numpy(np.random.RandomState(7).randn(1, 32)).float()
    with torch.no_grad():
        torch.testing.assert_close(latent.ws[:1], gan.info.mapping(z.to(latent.ws.device), None).cpu())
    same, _ = generate(gan, seed=1, psi=0.0)
    assert torch.equal(same[0], same[1]), "psi 0 renders w_avg for every seed"
    const, _ = generate(gan, seed=1)
    random_a, _ = generate(gan, seed=1, noise_mode="random")
    random_b, _ = generate(gan, seed=1, noise_mode="random")
    none, _ = generate(gan, seed=1, noise_mode="none")
    assert torch.equal(random_a, random_b), "random noise is drawn from the seed"
    assert not torch.equal(const, random_a) and not torch.equal(const, none)
    again, _ = generate(gan, latent=latent)
    torch.testing.assert_close(again, batch[:2] if latent.batch_size == 2 else batch)


def test_projection_node_reconstructs_with_progress_previews_and_interrupt(folder: Path) -> None:
    gan = load("sg2_retrace.safetensors")
    image, _ = generate(gan, seed=3, batch_size=1)
    seen = []
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: seen.append((value, total,
                                                                                                      preview)))
    try:
        latent, render = run_project(gan, image, steps=150)
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
    assert isinstance(latent, GanLatent) and latent.space == "w+" and latent.model_id == gan.model_id
    quality = float(psnr(render.movedim(-1, 1) * 2 - 1, image.movedim(-1, 1) * 2 - 1).min())
    assert quality > 30, quality
    assert seen[-1][0] == seen[-1][1] and all(p is not None and p[0] == "JPEG" for _, _, p in seen)

    comfy.model_management.interrupt_current_processing(True)
    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            run_project(gan, image)
    finally:
        comfy.model_management.interrupt_current_processing(False)


def test_bad_images_are_refused_or_resized_as_asked(folder: Path) -> None:
    gan = load("sg2_retrace.safetensors")
    odd = torch.rand(1, 20, 24, 3)
    with pytest.raises(ValueError, match=r"the image is 24x20, but this generator takes 16x16"):
        run_project(gan, odd)
    latent, render = run_project(gan, odd, on_mismatch="resize", steps=2)
    assert render.shape == (1, 16, 16, 3)
    with torch.inference_mode():  # as the host makes masks
        quarter = torch.zeros(1, 16, 16)
        quarter[:, :8, :8] = 1
    inpainted, _ = run_project(gan, torch.rand(1, 16, 16, 3), mask=quarter, steps=2)
    assert inpainted.batch_size == 1
    with pytest.raises(ValueError, match="mask covers the whole image"):
        run_project(gan, torch.rand(1, 16, 16, 3), mask=torch.ones(1, 16, 16), steps=2)
    with pytest.raises(ValueError, match="downscale 3 does not divide"):
        run_project(gan, torch.rand(1, 16, 16, 3), downscale=3, steps=2)
    small, _ = run_project(gan, torch.rand(1, 4, 4, 3), downscale=4, steps=2)
    assert small.ws.shape == (1, gan.info.num_ws, 32)
    # The largest downscale on the smallest generator compares one pixel (it once failed in SSIM's padding).
    one_pixel, render = run_project(gan, torch.rand(1, 16, 16, 3), downscale=16, steps=2)
    assert one_pixel.ws.shape == (1, gan.info.num_ws, 32) and torch.isfinite(render).all()
    sg3_latent = generate(load("sg3.safetensors"), batch_size=1)[1]
    with pytest.raises(ValueError, match="rows of 32 values, but sg2_retrace.safetensors takes"):
        generate(gan, latent=sg3_latent)


def test_pivotal_tuning_is_a_patched_copy_and_the_loaded_generator_is_untouched(folder: Path) -> None:
    gan = load("sg2_retrace.safetensors")
    photo = generate(load("sg3.safetensors"), seed=4, batch_size=1)[0]  # something this generator cannot make
    weights = {k: v.clone() for k, v in gan.patcher.model.state_dict().items()}
    latent, before = run_project(gan, photo, space="W")
    reference, _ = generate(gan, seed=9)
    with torch.inference_mode():
        tuned, after = RetraceStyleGANPivotalTuning.execute(gan, photo, latent, 200, 1e-3, 0.0, 30.0, "none",
                                                            "refuse", 0).result
    assert tuned.model_id.startswith(gan.model_id + "+pti.") and tuned.patcher is not gan.patcher
    target = photo.movedim(-1, 1) * 2 - 1
    gain = float(psnr(after.movedim(-1, 1) * 2 - 1, target) - psnr(before.movedim(-1, 1) * 2 - 1, target))
    assert gain > 3.0, gain
    tuned_render, _ = generate(tuned, latent=latent)
    torch.testing.assert_close(tuned_render, after, rtol=0, atol=2e-6)
    again, _ = generate(gan, seed=9)  # the host unpatches when the original is loaded again
    assert torch.equal(again, reference)
    for k, v in gan.patcher.model.state_dict().items():
        assert torch.equal(v, weights[k]), f"{k} changed"


def test_convert_and_latent_files_never_overwrite(folder: Path, output_dir: Path) -> None:
    with torch.inference_mode():
        path = RetraceStyleGANConvert.execute(generator="sg2_rosinality.pt").result[0]
    assert Path(path).name == "sg2_rosinality.safetensors"
    assert torch.equal(generate(load("sg2_rosinality.safetensors"))[0], generate(load("sg2_nvlabs.pkl"))[0])
    with pytest.raises(ValueError, match="already exists"):
        RetraceStyleGANConvert.execute(generator="sg2_rosinality.pt")

    gan = load("sg2_retrace.safetensors")
    _, latent = generate(gan)
    RetraceGANLatentSave.execute(latent, "lat")
    RetraceGANLatentSave.execute(latent, "lat")
    names = sorted(p.name for p in (output_dir / _records.OUTPUT_SUBFOLDER).iterdir())
    assert names == ["lat_00001.safetensors", "lat_00002.safetensors"]
    back = RetraceGANLatentLoad.execute(latent_file=names[0], stylegan=gan).result[0]
    assert torch.equal(back.ws, latent.ws)
    with pytest.raises(ValueError, match="latent file lat_00001.safetensors has"):
        RetraceGANLatentLoad.execute(latent_file=names[0], stylegan=load("sg3.safetensors"))


@pytest.mark.parametrize("name", ["sg2_retrace.safetensors", "sg3.safetensors"])
def test_half_precision_generators_render_close_to_float32(folder: Path, name: str) -> None:
    full = generate(load(name), seed=2)[0]
    with torch.inference_mode():
        half = RetraceStyleGANLoader.execute(generator=name, dtype="bfloat16").result[0]
    assert next(half.patcher.model.parameters()).dtype == torch.bfloat16
    image = generate(half, seed=2)[0]
    assert image.dtype == torch.float32
    quality = float(psnr(image.movedim(-1, 1) * 2 - 1, full.movedim(-1, 1) * 2 - 1).min())
    assert quality > 30.0, quality
    latent, _ = run_project(half, full[:1], steps=10)  # and it projects
    assert latent.ws.dtype == torch.float32


def test_lpips_lin_weights_beside_the_trunk_are_used_and_not_listed(tmp_path: Path) -> None:
    from test_core_perceptual import torchvision_file

    torchvision_file(tmp_path, "alexnet")  # alexnet.pth
    torch.save({f"lin{k}.model.1.weight": torch.full((1, c, 1, 1), 2.0)
                for k, c in enumerate([64, 192, 384, 256, 256])}, tmp_path / "alex.pth")
    _stylegan.register_folders()
    folder_paths.add_model_folder_path(_stylegan.PERCEPTUAL_FOLDER, str(tmp_path), is_default=True)
    try:
        options = _stylegan.perceptual_options()
        assert "alexnet.pth" in options and "alex.pth" not in options
        lpips = _stylegan.lpips_network("alexnet.pth", torch.device("cpu"))
        assert all(bool((lin == 2.0).all()) for lin in lpips.lins)
    finally:
        folder_paths.folder_names_and_paths[_stylegan.PERCEPTUAL_FOLDER][0].remove(str(tmp_path))


def test_pick_and_batch_latents_round_trip_and_refuse_what_does_not_fit(folder: Path) -> None:
    gan = load("sg2_nvlabs.pkl")
    images, batch = generate(gan, seed=5, batch_size=4)
    with torch.inference_mode():
        third = RetraceGANLatentPick.execute(batch, 2, 1).result[0]
        first_two = RetraceGANLatentPick.execute(batch, 0, 2).result[0]
        last_two = RetraceGANLatentPick.execute(batch, 2, 2).result[0]
        joined = RetraceGANLatentBatch.execute(first_two, last_two).result[0]
    assert third.batch_size == 1 and torch.equal(third.ws, batch.ws[2:3])
    assert torch.equal(joined.ws, batch.ws) and joined.model_id == batch.model_id
    alone, _ = generate(gan, seed=7, batch_size=1)  # seed 5 + 2: the picked latent renders the same image
    rendered, _ = generate(gan, latent=third)
    torch.testing.assert_close(rendered, images[2:3], atol=1e-5, rtol=0)
    torch.testing.assert_close(rendered, alone, atol=1e-5, rtol=0)
    assert batch.ws.shape[0] == 4  # the input batch is untouched
    with pytest.raises(ValueError, match=r"cannot take latents 3 to 4: the batch holds 4 \(0 to 3\)"):
        RetraceGANLatentPick.execute(batch, 3, 2)
    other = GanLatent(ws=third.ws.clone(), space=third.space, model_id="0" * 16, family=third.family, noise={})
    with pytest.raises(ValueError, match="different generators"):
        RetraceGANLatentBatch.execute(third, other)
    w_plus = GanLatent(ws=third.ws.clone(), space="w+" if third.space == "w" else "w", model_id=third.model_id,
                       family=third.family, noise={})
    with pytest.raises(ValueError, match="batch latents of one space"):
        RetraceGANLatentBatch.execute(third, w_plus)


@pytest.mark.parametrize("mode", ["random", "none"])
def test_the_output_latent_carries_the_noise_it_was_rendered_with(folder: Path, mode: str) -> None:
    """Rendering Generate's latent again (const) reproduces the image, whatever noise mode made it."""
    gan = load("sg2_nvlabs.pkl")
    images, latent = generate(gan, seed=3, batch_size=2, psi=0.7, noise_mode=mode)
    const, _ = generate(gan, seed=3, batch_size=2, psi=0.7, noise_mode="const")
    assert float((images - const).abs().max()) > 1e-3  # the mode mattered
    again, _ = generate(gan, latent=latent)
    torch.testing.assert_close(again, images, atol=1e-5, rtol=0)
    assert set(latent.noise) == set(gan.info.noise_maps()) and all(v.shape[0] == 2 for v in latent.noise.values())
