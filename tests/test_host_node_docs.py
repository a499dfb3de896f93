"""Every node explains itself in the UI: a description, a tooltip on every input and output, and a help page
(web/docs/<NodeId>.md, shown by the host's node help) with the same sections in the same order for every node."""

from __future__ import annotations

import re

import pytest

from paths import ROOT, ensure_host

pytestmark = pytest.mark.host

DOCS = ROOT / "web" / "docs"
SECTIONS = ["## Inputs", "## Outputs", "## Models", "## Defaults", "## Common mistakes", "## Workflows"]


def _schemas() -> list:
    ensure_host()
    from retrace.nodes import ALL_NODES

    return [node.define_schema() for node in ALL_NODES]


def _output_name(output) -> str:
    return output.display_name or output.io_type


def test_every_node_has_a_description_and_every_input_and_output_a_tooltip() -> None:
    missing = []
    for schema in _schemas():
        if len(schema.description or "") < 40:
            missing.append(f"{schema.node_id}: description")
        missing += [f"{schema.node_id}.{i.id}: tooltip" for i in schema.inputs if not i.tooltip]
        missing += [f"{schema.node_id} -> {_output_name(o)}: tooltip" for o in schema.outputs if not o.tooltip]
    assert missing == []


def test_every_node_has_a_help_page_in_the_shared_format() -> None:
    schemas = _schemas()
    assert sorted(p.stem for p in DOCS.glob("*.md")) == sorted(s.node_id for s in schemas), "one page per node"
    problems = []
    for schema in schemas:
        text = (DOCS / f"{schema.node_id}.md").read_text(encoding="utf-8")
        lines = text.splitlines()
        if lines[0] != f"# {schema.display_name}":
            problems.append(f"{schema.node_id}: the title line is {lines[0]!r}, not '# {schema.display_name}'")
        headings = [line.strip() for line in lines if line.startswith("## ")]
        if headings != SECTIONS:
            problems.append(f"{schema.node_id}: sections {headings}, expected {SECTIONS}")
        names = [i.id for i in schema.inputs] + [_output_name(o) for o in schema.outputs]
        problems += [f"{schema.node_id}: '{name}' is not described (**{name}**)" for name in names
                     if f"**{name}**" not in text]
        named = set(re.findall(r"`(workflows/[\w.-]+\.json)`", text))
        using = {f"workflows/{w.name}" for w in (ROOT / "workflows").glob("*.json")
                 if f'"type": "{schema.node_id}"' in w.read_text(encoding="utf-8")}
        problems += [f"{schema.node_id}: {path} uses the node but its page does not name it" for path in using - named]
        for path in re.findall(r"`(workflows/[\w.-]+\.json)`", text):
            workflow = ROOT / path
            if not workflow.is_file() or f'"{schema.node_id}"' not in workflow.read_text(encoding="utf-8"):
                problems.append(f"{schema.node_id}: names {path}, which does not use the node")
    assert problems == []
