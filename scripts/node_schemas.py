"""The compatibility snapshot of Retrace's node schemas: ids, inputs in widget order with their types, outputs.

Shared workflow files store widget values by position and links by slot, so a renamed node, a reordered or
retyped input, or a changed output breaks every file that uses it. ``tests/data/node_schemas.json`` records what
has landed; the end-to-end layer compares the live server's ``/object_info`` with it. Adding a node, or an
optional input after the existing ones, or an output after the existing ones, stays compatible. To change the
snapshot on purpose (and break old files knowingly): ``python -m scripts.node_schemas --update``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from scripts.comfy_server import ComfyServer
from scripts.workflow_api import ordered_inputs

ROOT = Path(__file__).resolve().parents[1]
SNAPSHOT = ROOT / "tests" / "data" / "node_schemas.json"
log = logging.getLogger("retrace.node_schemas")


def _type_of(spec: Any) -> str:
    kind = spec[0] if isinstance(spec, (list, tuple)) and spec else spec
    return "COMBO" if isinstance(kind, (list, tuple)) else str(kind)


def schemas(object_info: dict[str, Any]) -> dict[str, dict[str, list[list[str]] | list[str]]]:
    """Per Retrace node: ``inputs`` as [name, type, required|optional] in widget order, ``outputs`` as types."""
    out = {}
    for node_id in sorted(k for k in object_info if k.startswith("Retrace") and not k.startswith("RetraceTest")):
        info = object_info[node_id]
        required = set((info.get("input") or {}).get("required") or {})
        out[node_id] = {
            "inputs": [[name, _type_of(spec), "required" if name in required else "optional"]
                       for name, spec in ordered_inputs(info)],
            "outputs": [str(t) for t in info.get("output", [])],
        }
    return out


def incompatibilities(snapshot: dict[str, Any], live: dict[str, Any]) -> list[str]:
    """What in ``live`` would break a workflow written against ``snapshot``."""
    problems = []
    for node_id, old in snapshot.items():
        new = live.get(node_id)
        if new is None:
            problems.append(f"{node_id}: the node is gone (renamed or removed)")
            continue
        for i, (name, kind, section) in enumerate(old["inputs"]):
            if i >= len(new["inputs"]) or new["inputs"][i] != [name, kind, section]:
                got = new["inputs"][i] if i < len(new["inputs"]) else "nothing"
                problems.append(f"{node_id}: input {i} was {[name, kind, section]}, now {got}")
                break
        added = new["inputs"][len(old["inputs"]):]
        if any(section == "required" for _, _, section in added):
            problems.append(f"{node_id}: new required inputs {[n for n, _, s in added if s == 'required']} "
                            "(old files lack them; make them optional)")
        if new["outputs"][:len(old["outputs"])] != old["outputs"]:
            problems.append(f"{node_id}: outputs were {old['outputs']}, now {new['outputs']}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--update", action="store_true", help="rewrite the snapshot from a fresh headless server")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with ComfyServer(run_dir=ROOT / ".cache" / "node_schemas") as server:
        live = schemas(server.client().object_info())
    if args.update:
        SNAPSHOT.write_text(json.dumps(live, indent=1) + "\n", encoding="utf-8")
        log.info("wrote %s (%d nodes)", SNAPSHOT.relative_to(ROOT), len(live))
        return 0
    problems = incompatibilities(json.loads(SNAPSHOT.read_text(encoding="utf-8")), live)
    for p in problems:
        log.error(p)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
