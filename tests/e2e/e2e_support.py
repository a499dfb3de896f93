"""Helpers of the end-to-end layer: test-time changes to converted workflows, and reading their outputs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from paths import ROOT
from scripts.comfy_server import ComfyClient, ComfyServer
from scripts.images import load_rgb
from scripts.workflow_api import ApiPrompt, fill_load_image, load_workflow, nodes_of_type, set_inputs, ui_to_api

WORKFLOWS = ROOT / "workflows"
TEST_NODES = ROOT / "tests" / "e2e_nodes"

# Which tiny model family each workflow runs on in the tests. None: the real loaders, on the generated tiny
# SD1.5 checkpoint. A workflow missing here fails its test: add it when adding the file.
WORKFLOW_KINDS: dict[str, str | None] = {
    "sd15_invert_reconstruct.json": None,
    "sdxl_invert_edit.json": "sdxl",
    "flux_rf_inversion_edit.json": "flux",
    "sd15_null_text_edit.json": None,
    "sdxl_npi_edit.json": "sdxl",
    "sd15_direct_inversion_edit.json": None,
    "sd15_p2p_word_swap.json": None,
    "sdxl_p2p_reweight.json": "sdxl",
    "flux_p2p_edit.json": "flux",
    "sd15_attention_maps.json": None,
    "stylegan_generate.json": "stylegan",
    "stylegan_project_reconstruct.json": "stylegan",
    "stylegan_pti_reconstruct.json": "stylegan",
    "stylegan_inpaint.json": "stylegan",
    "stylegan_sefa_explorer.json": "stylegan",
    "stylegan_project_boundary_edit.json": "stylegan",
    "sd15_prompt_direction_edit.json": None,
    "stylegan_learn_boundary.json": "stylegan",
    "sd15_toy_world_edit.json": "toy",  # the shipped toy world: its own loader, nothing to swap
}

# The node whose LATENT is a workflow's result: of these, the one downstream of all others (an attention edit
# samples a source pass first).
RESULT_NODES = ("RetraceSampleInversion", "RetraceSampleInversionGuided", "SamplerCustomAdvanced")

# Real loader -> the test loader with the same outputs in the same slots (tests/e2e_nodes/retrace_test_loaders).
LOADER_SWAPS = {
    "CheckpointLoaderSimple": "RetraceTestTinyCheckpoint",
    "UNETLoader": "RetraceTestTinyModel",
    "CLIPLoader": "RetraceTestTinyCLIP",
    "DualCLIPLoader": "RetraceTestTinyCLIP",
    "TripleCLIPLoader": "RetraceTestTinyCLIP",
    "VAELoader": "RetraceTestTinyVAE",
}
LATENT_CHANNELS = {"sd15": 4, "sdxl": 4, "flux": 16, "toy": 4}


def swap_loaders(prompt: ApiPrompt, kind: str) -> list[str]:
    """Replace the real loader nodes by the tiny test loaders of ``kind``; return the ids changed."""
    changed = []
    for node_id, node in prompt.items():
        new = LOADER_SWAPS.get(node["class_type"])
        if new is None:
            continue
        node["class_type"] = new
        node["inputs"] = {"kind": kind} if new == "RetraceTestTinyVAE" else {"kind": kind, "seed": 0}
        changed.append(node_id)
    return changed


def lower_steps(prompt: ApiPrompt, steps: int) -> None:
    """Fewer steps for the tests: every `steps` widget, and the RF-Inversion edit window scaled to match."""
    for node in prompt.values():
        inputs = node["inputs"]
        if isinstance(inputs.get("steps"), int):
            old = inputs["steps"]
            inputs["steps"] = steps
            for other in prompt.values():
                if other["class_type"] == "RetraceRFInversionEditSampler":
                    o = other["inputs"]
                    o["stop_step"] = max(1, round(o["stop_step"] * steps / old))
                    o["start_step"] = min(o["start_step"], o["stop_step"])



def prepare_workflow(path: Path, object_info: dict[str, Any], input_image: str, checkpoint: str,
                     stylegan: str | None, steps: int) -> ApiPrompt:
    """A shared workflow as the tests run it: the tiny checkpoint, test loaders or tiny generator in place of the
    real models, ``steps`` steps, the test image in every LoadImage."""
    prompt = ui_to_api(load_workflow(path), object_info)
    kind = WORKFLOW_KINDS[path.name]
    if kind == "stylegan":
        set_inputs(prompt, only(prompt, "RetraceStyleGANLoader"), generator=stylegan)
    elif kind is None:
        set_inputs(prompt, only(prompt, "CheckpointLoaderSimple"), ckpt_name=checkpoint)
    elif kind != "toy":
        assert swap_loaders(prompt, kind), f"{path.name}: no loader to swap"
    lower_steps(prompt, steps)
    if nodes_of_type(prompt, "LoadImage"):
        fill_load_image(prompt, input_image)
    return prompt

def add_save_latent(prompt: ApiPrompt, source: str, slot: int, prefix: str) -> str:
    """Append a core SaveLatent node on (source, slot); return its id."""
    node_id = str(max(int(k) for k in prompt) + 1)
    prompt[node_id] = {"class_type": "SaveLatent",
                       "inputs": {"samples": [source, slot], "filename_prefix": f"e2e/{prefix}"}}
    return node_id


def upstream(prompt: ApiPrompt, node_id: str) -> set[str]:
    """Every node ``node_id`` depends on."""
    seen: set[str] = set()
    todo = [node_id]
    while todo:
        for value in prompt[todo.pop()]["inputs"].values():
            if isinstance(value, list) and len(value) == 2 and str(value[0]) in prompt and str(value[0]) not in seen:
                seen.add(str(value[0]))
                todo.append(str(value[0]))
    return seen


def result_node(prompt: ApiPrompt) -> str:
    found = [nid for nid, node in prompt.items() if node["class_type"] in RESULT_NODES]
    last = [nid for nid in found if set(found) - {nid} <= upstream(prompt, nid)]
    assert len(last) == 1, f"expected one of {RESULT_NODES} downstream of the others, found {found}"
    return last[0]


def only(prompt: ApiPrompt, class_type: str) -> str:
    ids = nodes_of_type(prompt, class_type)
    assert len(ids) == 1, f"expected one {class_type}, found {ids}"
    return ids[0]


def saved_latent(server: ComfyServer, entry: dict[str, Any], node_id: str) -> torch.Tensor:
    """The tensor a SaveLatent node wrote in this run (read from the server's output directory)."""
    import safetensors.torch

    records = entry["outputs"][node_id]["latents"]
    assert len(records) == 1, records
    rec = records[0]
    path = server.output_dir / rec["subfolder"] / rec["filename"]
    return safetensors.torch.load_file(str(path))["latent_tensor"]


def viewed_images(client: ComfyClient, entry: dict[str, Any], node_id: str) -> list[np.ndarray]:
    """The images a SaveImage/PreviewImage node produced in this run, read back through GET /view."""
    records = entry["outputs"].get(node_id, {}).get("images", [])
    return [load_rgb(client.view(r["filename"], r.get("subfolder", ""), r.get("type", "output"))) for r in records]


def retrace_node_ids_in_source() -> set[str]:
    """Every node id the pack declares, read from its source (independent of the server)."""
    import re

    ids: set[str] = set()
    for path in sorted((ROOT / "nodes").glob("*.py")):
        ids.update(re.findall(r'node_id\s*=\s*"(Retrace\w+)"', path.read_text(encoding="utf-8")))
    return ids


def workflow_files(kind: str | None = None) -> list[Path]:
    """Every workflow file; with ``kind`` 'stylegan' only the StyleGAN ones, with 'diffusion' only the others."""
    files = sorted(WORKFLOWS.glob("*.json"))
    if kind == "stylegan":
        return [p for p in files if WORKFLOW_KINDS.get(p.name) == "stylegan"]
    if kind == "diffusion":
        return [p for p in files if WORKFLOW_KINDS.get(p.name) != "stylegan"]
    return files
