"""The StyleGAN workflows on the real host server, with a tiny StyleGAN2 stored as an NVlabs-style pickle."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import STYLEGAN_PAYLOAD
from e2e_support import only, viewed_images, workflow_files
from PIL import Image

from scripts.images import load_rgb, make_test_image, psnr
from scripts.workflow_api import fill_load_image, load_workflow, set_inputs, ui_to_api

pytestmark = pytest.mark.e2e

SIZE = 32  # the tiny generator's resolution
STEPS = 60


def add_save_image(prompt: dict, source: str, slot: int, prefix: str) -> str:
    node_id = str(max(int(k) for k in prompt) + 1)
    prompt[node_id] = {"class_type": "SaveImage", "inputs": {"images": [source, slot], "filename_prefix": prefix}}
    return node_id


def resized_input(server, name: str) -> np.ndarray:
    x = torch.from_numpy(load_rgb(server.input_dir / name)).movedim(-1, 0)[None]
    return F.interpolate(x, size=(SIZE, SIZE), mode="area")[0].movedim(0, -1).numpy()


@pytest.fixture(scope="module")
def masked_image(server) -> str:
    """The test image with its top-left quarter transparent: LoadImage's MASK marks it for filling in."""
    rgba = make_test_image(64).convert("RGBA")
    alpha = np.full((64, 64), 255, np.uint8)
    alpha[:32, :32] = 0
    rgba.putalpha(Image.fromarray(alpha))
    name = "retrace_e2e_masked.png"
    rgba.save(server.input_dir / name)
    return name


@pytest.mark.parametrize("path", workflow_files("stylegan"), ids=lambda p: p.stem)
def test_stylegan_workflow_runs(path, server, client, object_info: dict, input_image: str, masked_image: str,
                                tiny_stylegan) -> None:
    prompt = ui_to_api(load_workflow(path), object_info)
    set_inputs(prompt, only(prompt, "RetraceStyleGANLoader"), generator=tiny_stylegan.name)
    for node in prompt.values():
        if node["class_type"] in ("RetraceStyleGANProject", "RetraceStyleGANPivotalTuning"):
            node["inputs"]["steps"] = STEPS
        for name, spec in object_info[node["class_type"]]["input"]["required"].items():
            assert name in node["inputs"], f"{path.name}: {node['class_type']} lacks {name}"
            options = spec[0] if isinstance(spec[0], list) else None
            if options and name != "image":
                assert node["inputs"][name] in options, (path.name, name, node["inputs"][name], options)
    image = masked_image if path.name == "stylegan_inpaint.json" else input_image
    if "LoadImage" in {n["class_type"] for n in prompt.values()}:
        fill_load_image(prompt, image)
    projection = None
    if path.name in ("stylegan_pti_reconstruct.json", "stylegan_project_boundary_edit.json"):
        projection = add_save_image(prompt, only(prompt, "RetraceStyleGANProject"), 1, "e2e/stylegan_projection")

    entry = client.run(prompt, timeout=300)

    saves = [nid for nid, node in prompt.items() if node["class_type"] == "SaveImage" and nid != projection]
    outputs = {nid: viewed_images(client, entry, nid) for nid in saves}
    assert all(img.shape == (SIZE, SIZE, 3) and img.std() > 0 for imgs in outputs.values() for img in imgs)
    assert not STYLEGAN_PAYLOAD.exists(), "the pickle's embedded source ran"
    images = outputs[saves[0]]

    if path.name == "stylegan_generate.json":
        assert len(images) == 4
        assert all(np.abs(images[i] - images[j]).max() > 0.05 for i in range(4) for j in range(i))
    elif path.name == "stylegan_sefa_explorer.json":
        strips = list(outputs.values())
        assert len(strips) == 3 and all(len(strip) == 7 for strip in strips)
        # The middle of each strip is strength 0: the same sample in all three; the ends differ from it.
        assert all(np.array_equal(strip[3], strips[0][3]) for strip in strips)
        assert all(np.abs(strip[0] - strip[3]).max() > 0.02 for strip in strips)
    elif path.name == "stylegan_inpaint.json":
        known = np.ones((SIZE, SIZE), bool)
        known[:SIZE // 2, :SIZE // 2] = False
        target = resized_input(server, image)
        outside = psnr(images[0][known], target[known])
        assert outside > 12.0, outside
    elif path.name == "stylegan_learn_boundary.json":
        candidates, strip = outputs["3"], outputs["11"]  # the workflow's two SaveImage nodes
        assert len(candidates) == 8 and len(strip) == 7
        # Strength 0, the middle of the strip, is the picked seed 2 itself; the ends moved along the boundary.
        assert np.abs(strip[3] - candidates[2]).max() <= 1.5 / 255
        assert np.abs(strip[0] - strip[6]).max() > 0.02
        assert list((server.output_dir / "retrace").glob("learned_boundary*.safetensors")), "direction not saved"
    elif path.name == "stylegan_project_boundary_edit.json":
        projected = viewed_images(client, entry, projection)[0]
        assert np.abs(images[0] - projected).mean() > 0.01, "strength 3 along the boundary changed nothing"
    else:
        target = resized_input(server, image)
        quality = psnr(images[0], target)
        assert quality > 12.0, quality
        if projection is not None:
            before = psnr(viewed_images(client, entry, projection)[0], target)
            assert quality > before + 1.0, (before, quality)
    if path.name in ("stylegan_generate.json", "stylegan_project_reconstruct.json"):
        saved = [p.name for p in (server.output_dir / "retrace").glob("stylegan_*.safetensors")]
        assert saved, "the latent was not saved"
