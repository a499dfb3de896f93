"""The UI -> API workflow converter (scripts/workflow_api.py) on hand-made schemas; no server needed."""

from __future__ import annotations

import pytest
from e2e_support import workflow_files

from scripts.workflow_api import (WorkflowError, fill_load_image, has_control_widget, load_workflow, map_widget_values,
                                  ui_to_api)

pytestmark = pytest.mark.e2e

INFO = {
    "Loader": {"input": {"required": {"name": [["a.safetensors", "b.safetensors"], {}]}},
               "input_order": {"required": ["name"]}, "output": ["MODEL"]},
    "Sampler": {
        "input": {"required": {"model": ["MODEL", {}], "seed": ["INT", {"control_after_generate": True}],
                               "steps": ["INT", {"default": 20}], "mode": ["COMBO", {"options": ["x", "y"]}],
                               "noise_seed": ["INT", {}], "fixed_seed": ["INT", {"control_after_generate": False}],
                               "cfg": ["FLOAT", {"forceInput": True}], "text": ["STRING", {"multiline": True}]},
                  "optional": {"flag": ["BOOLEAN", {"default": False}], "extra": ["LATENT", {}]}},
        "input_order": {"required": ["model", "seed", "steps", "mode", "noise_seed", "fixed_seed", "cfg", "text"],
                        "optional": ["flag", "extra"]},
        "output": ["LATENT"]},
    "LoadImage": {"input": {"required": {"image": [["x.png"], {"image_upload": True}]}}, "output": ["IMAGE", "MASK"]},
    "Sink": {"input": {"required": {"samples": ["LATENT", {}]}}, "output": []},
}


def node(nid: int, type_: str, widgets: list | None = None, inputs: list | None = None, mode: int = 0) -> dict:
    return {"id": nid, "type": type_, "mode": mode, "inputs": inputs or [], "outputs": [],
            "widgets_values": widgets if widgets is not None else []}


def test_control_after_generate_values_are_skipped() -> None:
    values = [7, "fixed", 30, "y", 9, "randomize", 11, "prompt", True]
    mapped = map_widget_values(node(2, "Sampler", values), INFO["Sampler"])
    assert mapped == {"seed": 7, "steps": 30, "mode": "y", "noise_seed": 9, "fixed_seed": 11, "text": "prompt",
                      "flag": True}
    assert has_control_widget("seed", ["INT", {}])
    assert not has_control_widget("seed", ["INT", {"control_after_generate": False}])
    assert not has_control_widget("steps", ["INT", {}])
    assert has_control_widget("pick", [["a"], {"control_after_generate": True}])


def test_links_win_over_widget_values_and_slots_are_kept() -> None:
    wf = {"nodes": [node(1, "Loader", ["b.safetensors"]),
                    node(2, "Sampler", [7, "fixed", 30, "x", 9, "fixed", 11, "t", False],
                         [{"name": "model", "type": "MODEL", "link": 1},
                          {"name": "steps", "type": "INT", "link": 2, "widget": {"name": "steps"}}]),
                    node(3, "Sink", [], [{"name": "samples", "type": "LATENT", "link": 3}])],
          "links": [[1, 1, 0, 2, 0, "MODEL"], [2, 5, 0, 2, 1, "INT"], [3, 2, 0, 3, 0, "LATENT"]]}
    wf["nodes"].append(node(5, "Loader", ["a.safetensors"]))  # pretend INT source: any real node id works
    api = ui_to_api(wf, INFO)
    assert api["1"] == {"class_type": "Loader", "inputs": {"name": "b.safetensors"}, "_meta": {"title": "Loader"}}
    assert api["2"]["inputs"]["model"] == ["1", 0]
    assert api["2"]["inputs"]["steps"] == ["5", 0]
    assert api["2"]["inputs"]["mode"] == "x" and "cfg" not in api["2"]["inputs"]
    assert api["3"]["inputs"] == {"samples": ["2", 0]}


def test_reroute_bypass_mute_primitive_and_notes() -> None:
    wf = {"nodes": [node(1, "Loader", ["a.safetensors"]),
                    {"id": 2, "type": "Reroute", "inputs": [{"name": "", "type": "*", "link": 1}], "outputs": []},
                    node(3, "Sampler", [1, "fixed", 2, "x", 3, "fixed", 4, "t"],
                         [{"name": "model", "type": "MODEL", "link": 2},
                          {"name": "seed", "type": "INT", "link": 6, "widget": {"name": "seed"}}]),
                    node(4, "Sampler", [1, "fixed", 2, "x", 3, "fixed", 4, "t"],
                         [{"name": "model", "type": "MODEL", "link": 3}], mode=4),
                    node(5, "Sink", [], [{"name": "samples", "type": "LATENT", "link": 4}]),
                    node(6, "Sampler", [], [], mode=2),
                    {"id": 7, "type": "PrimitiveNode", "outputs": [], "widgets_values": [1, "fixed"]},
                    {"id": 8, "type": "Note", "widgets_values": ["hello"]}],
          "links": [[1, 1, 0, 2, 0, "MODEL"], [2, 2, 0, 3, 0, "MODEL"], [3, 2, 0, 4, 0, "MODEL"],
                    [4, 4, 0, 5, 0, "LATENT"], [6, 7, 0, 3, 1, "INT"]]}
    wf["nodes"][3]["outputs"] = [{"name": "LATENT", "type": "LATENT", "links": [4]}]
    api = ui_to_api(wf, INFO)
    assert sorted(api) == ["1", "3", "5"]
    assert api["3"]["inputs"]["model"] == ["1", 0]  # through the reroute
    assert api["3"]["inputs"]["seed"] == 1  # a primitive's value is the widget value
    # Bypassed node 4 passes no LATENT input through, so the sink's input is dropped (the server will say so).
    assert "samples" not in api["5"]["inputs"]


def test_errors_and_load_image() -> None:
    with pytest.raises(WorkflowError, match="does not know"):
        ui_to_api({"nodes": [node(1, "Mystery")], "links": []}, INFO)
    with pytest.raises(WorkflowError, match="not in the workflow's links"):
        ui_to_api({"nodes": [node(1, "Sink", [], [{"name": "samples", "type": "LATENT", "link": 9}])], "links": []},
                  INFO)
    api = ui_to_api({"nodes": [node(3, "LoadImage", ["x.png", "image"])], "links": []}, INFO)
    assert api["3"]["inputs"] == {"image": "x.png"}  # the upload button's value is not an input
    assert fill_load_image(api, "mine.png") == "3" and api["3"]["inputs"]["image"] == "mine.png"
    with pytest.raises(WorkflowError):
        fill_load_image({"1": {"class_type": "Loader", "inputs": {}}}, "mine.png")


@pytest.mark.parametrize("path", workflow_files(), ids=lambda p: p.stem)
def test_workflow_files_are_ui_format(path) -> None:
    wf = load_workflow(path)
    assert wf["version"] == 0.4 and wf["last_node_id"] == max(n["id"] for n in wf["nodes"])
    assert wf["last_link_id"] == max(link[0] for link in wf["links"])
    by_id = {n["id"]: n for n in wf["nodes"]}
    for link_id, src, src_slot, dst, dst_slot, kind in wf["links"]:
        assert link_id in by_id[src]["outputs"][src_slot]["links"]
        assert by_id[dst]["inputs"][dst_slot]["link"] == link_id
        assert by_id[src]["outputs"][src_slot]["type"] == by_id[dst]["inputs"][dst_slot]["type"] == kind
    for n in wf["nodes"]:
        assert len(n["pos"]) == 2 and len(n["size"]) == 2
        assert n["type"].startswith("Retrace") or n["properties"]["cnr_id"] == "comfy-core"
