"""The node-schema compatibility rules (scripts/node_schemas.py), without a server."""

from __future__ import annotations

import copy
import re

import pytest

from scripts.node_schemas import incompatibilities

pytestmark = pytest.mark.core

OLD = {"RetraceX": {"inputs": [["model", "MODEL", "required"], ["steps", "INT", "required"],
                               ["mask", "MASK", "optional"]],
                    "outputs": ["LATENT", "IMAGE"]}}


def changed(edit) -> dict:
    new = copy.deepcopy(OLD)
    edit(new["RetraceX"])
    return new


def test_the_same_schemas_and_compatible_additions_pass() -> None:
    assert incompatibilities(OLD, OLD) == []
    assert incompatibilities(OLD, changed(lambda n: n["inputs"].append(["seed", "INT", "optional"]))) == []
    assert incompatibilities(OLD, changed(lambda n: n["outputs"].append("MASK"))) == []
    assert incompatibilities(OLD, {**OLD, "RetraceY": OLD["RetraceX"]}) == []


@pytest.mark.parametrize("edit, message", [
    (lambda n: n["inputs"].reverse(), "input 0 was"),
    (lambda n: n["inputs"][1].__setitem__(0, "num_steps"), "input 1 was"),
    (lambda n: n["inputs"][1].__setitem__(1, "FLOAT"), "input 1 was"),
    (lambda n: n["inputs"].pop(), "input 2 was"),
    (lambda n: n["inputs"].append(["seed", "INT", "required"]), "new required inputs \\['seed'\\]"),
    (lambda n: n["outputs"].reverse(), "outputs were"),
])
def test_incompatible_changes_are_named(edit, message: str) -> None:
    (problem,) = incompatibilities(OLD, changed(edit))
    assert problem.startswith("RetraceX: ")
    assert re.search(message, problem), problem


def test_a_removed_node_is_named() -> None:
    assert incompatibilities(OLD, {}) == ["RetraceX: the node is gone (renamed or removed)"]
