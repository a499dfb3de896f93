"""Convert a ComfyUI UI-format workflow (version 0.4, as the frontend saves it) to the API format.

The UI format stores each node's widget values as a positional list, ``widgets_values``, and its
connections in a separate ``links`` table ``[id, from_node, from_slot, to_node, to_slot, type]``. The API
format that ``POST /prompt`` takes is ``{node_id: {"class_type": ..., "inputs": {name: value | [src, slot]}}}``.
The positions are resolved against the host's ``GET /object_info`` schemas: widget values map, in order,
onto the required then optional inputs that are widgets; an INT (or COMBO) with ``control_after_generate``
(or, when the flag is absent, an INT named ``seed``/``noise_seed``, as the frontend does) has one extra
value in the list ("fixed", "randomize", ...), which is skipped. A linked input takes its link, and its
widget value (still present in the list) is dropped.

CLI: ``python -m scripts.workflow_api WORKFLOW.json --url http://127.0.0.1:8188 [--out api.json]``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

log = logging.getLogger("retrace.workflow_api")

WIDGET_TYPES = frozenset({"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"})
SEED_NAMES = ("seed", "noise_seed")
# Frontend-only nodes: they never reach the server.
VIRTUAL_NODES = frozenset({"Note", "MarkdownNote", "PrimitiveNode", "Reroute"})
MODE_NEVER = 2   # muted: not executed, outputs unavailable
MODE_BYPASS = 4  # bypassed: inputs pass through to outputs of the same type

ApiPrompt = dict[str, dict[str, Any]]


class WorkflowError(ValueError):
    """The workflow cannot be converted (unknown node, broken link, unsupported feature)."""


def _spec_type(spec: Any) -> Any:
    return spec[0] if isinstance(spec, (list, tuple)) and spec else spec


def _spec_options(spec: Any) -> dict[str, Any]:
    if isinstance(spec, (list, tuple)) and len(spec) > 1 and isinstance(spec[1], dict):
        return spec[1]
    return {}


def is_widget(spec: Any) -> bool:
    """Whether an /object_info input spec is shown as a widget (and so has a slot in ``widgets_values``)."""
    kind, options = _spec_type(spec), _spec_options(spec)
    if options.get("forceInput"):
        return False
    return isinstance(kind, (list, tuple)) or kind in WIDGET_TYPES


def has_control_widget(name: str, spec: Any) -> bool:
    """Whether the frontend adds a 'control after generate' widget after this one (its value is in the list)."""
    kind, options = _spec_type(spec), _spec_options(spec)
    flag = options.get("control_after_generate")
    if kind == "INT":
        return bool(flag) if flag is not None else name in SEED_NAMES
    return bool(flag) and (kind == "COMBO" or isinstance(kind, (list, tuple)))


def ordered_inputs(schema: dict[str, Any]) -> list[tuple[str, Any]]:
    """The schema's required then optional inputs, in the order the frontend creates their widgets."""
    inputs = schema.get("input", {})
    order = schema.get("input_order") or {}
    out: list[tuple[str, Any]] = []
    for section in ("required", "optional"):
        specs = inputs.get(section) or {}
        names = order.get(section) or list(specs)
        out.extend((name, specs[name]) for name in names if name in specs)
    return out


def map_widget_values(node: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    """Widget name -> value for one UI node, by position in ``widgets_values`` (or by name if it is a dict)."""
    values = node.get("widgets_values")
    if values is None:
        return {}
    widget_inputs = [(name, spec) for name, spec in ordered_inputs(schema) if is_widget(spec)]
    if isinstance(values, dict):
        return {name: values[name] for name, _ in widget_inputs if name in values}
    out: dict[str, Any] = {}
    i = 0
    for name, spec in widget_inputs:
        if i >= len(values):
            break
        out[name] = values[i]
        i += 2 if has_control_widget(name, spec) else 1
    return out


def _links_by_id(workflow: dict[str, Any]) -> dict[int, tuple[int, int, int, int, str]]:
    table: dict[int, tuple[int, int, int, int, str]] = {}
    for link in workflow.get("links") or []:
        if isinstance(link, dict):  # the serialisation of some newer frontends
            link = [link["id"], link["origin_id"], link["origin_slot"], link["target_id"], link["target_slot"],
                    link.get("type", "*")]
        link_id, from_node, from_slot, to_node, to_slot, kind = link[:6]
        table[int(link_id)] = (int(from_node), int(from_slot), int(to_node), int(to_slot), kind)
    return table


def ui_to_api(workflow: dict[str, Any], object_info: dict[str, Any]) -> ApiPrompt:
    """Convert a UI-format workflow to an API-format prompt, using the server's node schemas."""
    if (workflow.get("definitions") or {}).get("subgraphs"):
        raise WorkflowError("workflows with subgraphs are not supported; unpack them in the editor first.")
    nodes = {int(n["id"]): n for n in workflow.get("nodes", [])}
    links = _links_by_id(workflow)

    def source_of(link_id: int, seen: int = 0) -> tuple[int, int] | None:
        """The (node, slot) an input link really comes from: through reroutes and bypassed nodes."""
        if link_id not in links or seen > len(nodes):
            raise WorkflowError(f"link {link_id} is not in the workflow's links table.")
        from_node, from_slot, _, _, kind = links[link_id]
        src = nodes.get(from_node)
        if src is None:
            raise WorkflowError(f"link {link_id} comes from node {from_node}, which is not in the workflow.")
        if src["type"] == "PrimitiveNode":
            return None  # its value is mirrored in the target's widgets_values
        if src["type"] == "Reroute" or src.get("mode") == MODE_BYPASS:
            ins = [i for i in src.get("inputs") or [] if i.get("link") is not None]
            if src["type"] != "Reroute":
                out_type = (src.get("outputs") or [])[from_slot].get("type", kind)
                ins = [i for i in ins if i.get("type") == out_type]
            if not ins:
                return None
            return source_of(int(ins[0]["link"]), seen + 1)
        if src.get("mode") == MODE_NEVER:
            return None
        return from_node, from_slot

    prompt: ApiPrompt = {}
    for node_id, node in sorted(nodes.items()):
        class_type = node["type"]
        if class_type in VIRTUAL_NODES or node.get("mode") in (MODE_NEVER, MODE_BYPASS):
            continue
        schema = object_info.get(class_type)
        if schema is None:
            raise WorkflowError(f"node {node_id} has type {class_type!r}, which this server does not know.")
        inputs: dict[str, Any] = dict(map_widget_values(node, schema))
        for slot in node.get("inputs") or []:
            if slot.get("link") is None:
                continue
            src = source_of(int(slot["link"]))
            if src is not None:
                inputs[slot["name"]] = [str(src[0]), src[1]]
        prompt[str(node_id)] = {"class_type": class_type, "inputs": inputs,
                                "_meta": {"title": node.get("title") or class_type}}
    return prompt


def nodes_of_type(prompt: ApiPrompt, class_type: str) -> list[str]:
    return [nid for nid, node in prompt.items() if node["class_type"] == class_type]


def set_inputs(prompt: ApiPrompt, node_id: str | int, **values: Any) -> None:
    """Set widget inputs of one node (a link there is replaced)."""
    node = prompt.get(str(node_id))
    if node is None:
        raise KeyError(f"no node {node_id} in the prompt.")
    node["inputs"].update(values)


def fill_load_image(prompt: ApiPrompt, image: str, node_id: str | int | None = None) -> str:
    """Point a LoadImage node (the only one, or ``node_id``) at ``image`` in the server's input dir; return its id."""
    if node_id is None:
        ids = nodes_of_type(prompt, "LoadImage")
        if len(ids) != 1:
            raise WorkflowError(f"expected exactly one LoadImage node, found {len(ids)}; pass node_id.")
        node_id = ids[0]
    if prompt[str(node_id)]["class_type"] != "LoadImage":
        raise WorkflowError(f"node {node_id} is a {prompt[str(node_id)]['class_type']}, not LoadImage.")
    set_inputs(prompt, node_id, image=image)
    return str(node_id)


def load_workflow(path: str | Path) -> dict[str, Any]:
    workflow = json.loads(Path(path).read_text(encoding="utf-8"))
    if "nodes" not in workflow or "links" not in workflow:
        raise WorkflowError(f"{path} is not a UI-format workflow (no 'nodes'/'links'); it may already be API format.")
    return workflow


def main(argv: list[str] | None = None) -> int:
    from .comfy_server import ComfyClient

    parser = argparse.ArgumentParser(description="Convert a UI-format ComfyUI workflow to API format.")
    parser.add_argument("workflow", type=Path)
    parser.add_argument("--url", default="http://127.0.0.1:8188", help="a running server, for /object_info")
    parser.add_argument("--object-info", type=Path, default=None, help="a saved /object_info JSON instead of --url")
    parser.add_argument("--out", type=Path, default=None, help="write here instead of stdout")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.object_info is not None:
        info = json.loads(args.object_info.read_text(encoding="utf-8"))
    else:
        info = ComfyClient(args.url).object_info()
    text = json.dumps(ui_to_api(load_workflow(args.workflow), info), indent=2)
    if args.out is None:
        sys.stdout.write(text + "\n")
    else:
        args.out.write_text(text + "\n", encoding="utf-8")
        log.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
