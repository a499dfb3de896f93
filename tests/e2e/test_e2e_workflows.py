"""Every workflow in workflows/ runs on the real host server, converted from its UI format via /object_info."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from e2e_support import (LATENT_CHANNELS, LOADER_SWAPS, WORKFLOW_KINDS, WORKFLOWS, add_save_latent, lower_steps, only,
                         prepare_workflow, result_node, retrace_node_ids_in_source, saved_latent,
                         viewed_images, workflow_files)

from scripts.comfy_server import ComfyError
from scripts.images import load_rgb
from scripts.workflow_api import fill_load_image, load_workflow, set_inputs, ui_to_api

pytestmark = pytest.mark.e2e

STEPS = 4
SIZE = 64
LATENT_SIZE = SIZE // 8


def test_object_info_lists_every_retrace_node(object_info: dict) -> None:
    declared = retrace_node_ids_in_source()
    assert len(declared) >= 8, declared  # the scan itself works
    missing = declared - set(object_info)
    assert not missing, f"nodes the pack declares but the server does not list: {sorted(missing)}"
    for node_id in declared:
        assert object_info[node_id]["category"].startswith("Retrace"), node_id
        assert object_info[node_id]["python_module"].startswith("custom_nodes."), node_id
    # The test loaders are there (only in this server) and keep the loaders' slot order.
    assert object_info["RetraceTestTinyCheckpoint"]["output"] == object_info["CheckpointLoaderSimple"]["output"]
    for real, test in LOADER_SWAPS.items():
        assert object_info[test]["output"] == object_info[real]["output"], (real, test)


def test_every_workflow_has_a_test_setup() -> None:
    files = [p.name for p in workflow_files()]
    assert files, "workflows/ is empty"
    assert set(files) <= set(WORKFLOW_KINDS), f"add these to WORKFLOW_KINDS: {set(files) - set(WORKFLOW_KINDS)}"


@pytest.mark.parametrize("path", workflow_files("diffusion"), ids=lambda p: p.stem)
def test_workflow_runs(path, server, client, object_info: dict, input_image: str, tiny_checkpoint) -> None:
    workflow = load_workflow(path)
    assert workflow["version"] == 0.4
    prompt = prepare_workflow(path, object_info, input_image, tiny_checkpoint.name, None, STEPS)
    assert len(prompt) == len(workflow["nodes"])  # no frontend-only nodes in our files
    kind = WORKFLOW_KINDS[path.name] or "sd15"
    for nid, node in prompt.items():  # every required input is there; combo values are among the options
        schema = object_info[node["class_type"]]
        for name, spec in schema["input"]["required"].items():
            assert name in node["inputs"], f"{path.name}: node {nid} {node['class_type']} lacks {name}"
            value = node["inputs"][name]
            options = spec[0] if isinstance(spec[0], list) else (spec[1].get("options") if spec[0] == "COMBO" else None)
            if options and not isinstance(value, list) and name != "image":
                assert value in options, f"{path.name}: node {nid} {name}={value!r} not in {options}"

    encoder = only(prompt, "RetraceVAEEncodeForInversion")
    inverter = only(prompt, "RetraceInvert")
    sampler = result_node(prompt)
    save_source = add_save_latent(prompt, encoder, 0, f"{path.stem}_source")
    save_noise = add_save_latent(prompt, inverter, 0, f"{path.stem}_noise")
    save_result = add_save_latent(prompt, sampler, 0, f"{path.stem}_result")

    entry = client.run(prompt, timeout=240)

    channels = LATENT_CHANNELS[kind]
    latents = {name: saved_latent(server, entry, nid)
               for name, nid in (("source", save_source), ("noise", save_noise), ("result", save_result))}
    for name, lat in latents.items():
        assert lat.shape == (1, channels, LATENT_SIZE, LATENT_SIZE), (name, lat.shape)
        assert torch.isfinite(lat).all(), f"{name} latent has NaN/inf"
        assert lat.std() > 1e-3, f"{name} latent is constant"
    source, noise, result = latents["source"], latents["noise"], latents["result"]
    # The inversion went somewhere: the noise is not the image latent.
    assert (noise - source).norm() > 0.5 * source.norm()

    saves = [nid for nid, node in prompt.items() if node["class_type"] == "SaveImage"]
    assert saves, "the workflow saves no image"
    for nid in saves:
        images = viewed_images(client, entry, nid)
        assert len(images) == 1
        assert images[0].shape == (SIZE, SIZE, 3)
        assert images[0].std() > 0.0, "saved image is flat"
    for nid in (n for n, node in prompt.items() if node["class_type"] == "PreviewImage"):
        preview = viewed_images(client, entry, nid)
        original = load_rgb(server.input_dir / input_image)
        # The previewed input came back through /view unchanged (up to the host's 8-bit truncation).
        assert len(preview) == 1 and np.abs(preview[0] - original).max() <= 1.5 / 255

    if path.name == "sd15_invert_reconstruct.json":
        # Same prompt, guidance 1: the reconstruction error must shrink as the steps grow (a correct inversion
        # converges) and be small at 16 steps: 0.216 of the source latent's norm on the tiny checkpoint (0.75 at
        # 4 steps). Sampling back with another scheduler, another prompt or from the wrong trajectory point
        # gives 0.28-0.49.
        err_few = float((result - source).norm() / source.norm())
        lower_steps(prompt, 4 * STEPS)
        again = client.run(prompt, timeout=240)
        result_more = saved_latent(server, again, save_result)
        assert torch.isfinite(result_more).all()
        err_more = float((result_more - source).norm() / source.norm())
        assert err_more < 0.6 * err_few, (f"reconstruction error {err_few:.3f} at {STEPS} steps, "
                                          f"{err_more:.3f} at {4 * STEPS}")
        assert err_more < 0.26, f"reconstruction error {err_more:.3f} of the source latent's norm at {4 * STEPS} steps"
    else:
        # An edit: a new prompt (and for Flux the RF-Inversion controller) changes the image latent.
        assert (result - source).norm() > 1e-3 * source.norm()
    (server.run_dir / f"{path.stem}.api.json").write_text(json.dumps(prompt, indent=1), encoding="utf-8")


def _word_swap(object_info: dict, input_image: str, checkpoint: str, source: str, target: str,
               blend: str) -> tuple[dict, str]:
    prompt = ui_to_api(load_workflow(WORKFLOWS / "sd15_p2p_word_swap.json"), object_info)
    set_inputs(prompt, only(prompt, "CheckpointLoaderSimple"), ckpt_name=checkpoint)
    set_inputs(prompt, only(prompt, "RetracePromptPair"), source=source, target=target)
    set_inputs(prompt, only(prompt, "RetraceAttentionInject"), blend_words=blend)
    lower_steps(prompt, STEPS)
    fill_load_image(prompt, input_image)
    return prompt, add_save_latent(prompt, result_node(prompt), 0, f"back_to_back_{abs(hash(source + target))}")


def test_attention_edits_back_to_back(server, client, object_info: dict, input_image: str, tiny_checkpoint) -> None:
    """The store made upstream is filled by the source pass of each run: a second workflow with another source
    prompt in between does not leak into the first one's edit when it runs again (the host's output cache keeps
    the store node; the source pass refills it)."""
    first, first_save = _word_swap(object_info, input_image, tiny_checkpoint.name,
                                   "a photo of a cat sitting on a wooden table", "a photo of a dog sitting on a wooden table",
                                   "cat, dog")
    other, other_save = _word_swap(object_info, input_image, tiny_checkpoint.name,
                                   "a painting of a horse in a field", "a painting of a zebra in a field", "horse, zebra")
    alone = saved_latent(server, client.run(first, timeout=240), first_save)
    other_alone = saved_latent(server, client.run(other, timeout=240), other_save)
    set_inputs(first, only(first, "RetracePromptPair"), target="a photo of a fox sitting on a wooden table")
    set_inputs(first, only(first, "RetraceAttentionInject"), blend_words="cat, fox")
    client.run(first, timeout=240)  # the edit pass again, on the cached source pass of the first prompt
    set_inputs(first, only(first, "RetracePromptPair"), target="a photo of a dog sitting on a wooden table")
    set_inputs(first, only(first, "RetraceAttentionInject"), blend_words="cat, dog")
    again = saved_latent(server, client.run(first, timeout=240), first_save)
    other_again = saved_latent(server, client.run(other, timeout=240), other_save)
    assert torch.equal(alone, again)
    assert torch.equal(other_alone, other_again)
    assert not torch.equal(alone, other_alone)



def test_a_pair_the_inject_would_refuse_fails_before_the_inversion(server, client, object_info: dict,
                                                                    input_image: str, tiny_checkpoint) -> None:
    """A word swap whose prompts do not align fails at Retrace Prompt Pair, before the inversion, null-text and the
    source pass run (it used to fail at Attention Inject, after all of them)."""
    prompt, _ = _word_swap(object_info, input_image, tiny_checkpoint.name, "a photo of a cat sitting on a wooden table",
                           "a photo of a big dog sitting on a wooden table", "auto")
    prompt_id = client.queue_prompt(prompt)
    with pytest.raises(ComfyError, match="same number of words"):
        client.wait(prompt_id, timeout=240)
    status = client.get_json(f"/history/{prompt_id}")[prompt_id]["status"]
    error = next(m[1] for m in status["messages"] if m[0] == "execution_error")
    assert error["node_type"] == "RetracePromptPair"
    ran = {prompt[n]["class_type"] for n in error["executed"] if n in prompt}
    assert not ran & {"RetraceInvert", "RetraceNullTextInversion", "SamplerCustomAdvanced",
                      "RetraceSampleInversionGuided", "RetraceAttentionInject"}, ran

def test_node_schemas_match_the_committed_snapshot(object_info: dict) -> None:
    """Shared workflow files address widgets by position and links by slot: ids, input order and types, and
    outputs stay as landed (scripts/node_schemas.py; update the snapshot only on purpose)."""
    from scripts.node_schemas import SNAPSHOT, incompatibilities, schemas

    snapshot = json.loads(SNAPSHOT.read_text(encoding="utf-8"))
    live = schemas(object_info)
    assert not incompatibilities(snapshot, live)
    unrecorded = sorted(set(live) - set(snapshot))
    assert not unrecorded, f"new nodes {unrecorded}: record them with `python -m scripts.node_schemas --update`"
