"""The host enforces every Retrace schema: for every node (from ALL_NODES, so a new node is covered), a number below
its min or above its max and an option its combo lacks are refused by the host's own prompt validation
(``execution.validate_inputs``), with the input named. Retrace's validate_inputs never switch that off."""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
from typing import Any

import pytest

from paths import HOST, ensure_host

if not HOST.is_dir():
    pytest.skip(f"no host at {HOST}: run `make setup` (GUIDE section 1)", allow_module_level=True)
ensure_host()

import execution  # noqa: E402
import nodes  # noqa: E402

from retrace.nodes import ALL_NODES  # noqa: E402
from retrace.nodes._api import RetraceNode, float_inputs  # noqa: E402
from scripts.hosts import host_version  # noqa: E402

pytestmark = pytest.mark.host

HOST_REFUSALS = {"value_smaller_than_min", "value_bigger_than_max", "value_not_in_list"}


def own_validate(cls: type) -> Any:
    """The node's own validate_inputs (the host ignores the API base class's, as here), or None."""
    for klass in cls.__mro__:
        if "validate_inputs" in klass.__dict__:
            return getattr(cls, "validate_inputs") if klass.__module__.startswith("retrace") else None
    return None


def own_checks(cls: type) -> set[str]:
    """The inputs a node's validate_inputs checks itself (a file that must exist); the host checks the rest."""
    check = own_validate(cls)
    return set(inspect.signature(check).parameters) - {"cls"} if check is not None else set()


# ComfyUI before 0.4 checks only list-typed combos; V3 combos ("COMBO" with options) reach the node unchecked.
OLD_HOST = tuple(int(v) for v in host_version(HOST).split(".")[:2]) < (0, 4)


def widget_inputs(cls: type) -> dict[str, tuple[Any, dict]]:
    spec = cls.INPUT_TYPES()
    out = {}
    for section in ("required", "optional"):
        for name, entry in spec.get(section, {}).items():
            kind, extra = entry[0], (entry[1] if len(entry) > 1 else {})
            if isinstance(kind, list) or kind in ("INT", "FLOAT", "COMBO", "BOOLEAN", "STRING"):
                out[name] = (kind, extra or {})
    return out


def default_of(kind: Any, extra: dict) -> Any:
    if "default" in extra:
        return extra["default"]
    options = kind if isinstance(kind, list) else extra.get("options", [])
    return options[0] if options else {"INT": 0, "FLOAT": 0.0, "BOOLEAN": False, "STRING": ""}.get(kind, "")


def bad_values(kind: Any, extra: dict) -> list[tuple[str, Any]]:
    if kind in ("INT", "FLOAT"):
        step = 1 if kind == "INT" else 1.0
        return ([("below min", extra["min"] - step)] if "min" in extra else []) + \
               ([("above max", extra["max"] + step)] if "max" in extra else [])
    if isinstance(kind, list) or kind == "COMBO":
        return [("unknown option", "retrace-no-such-option")]
    return []


CASES = [(schema_cls, name, label, value)
         for schema_cls in ALL_NODES
         for name, (kind, extra) in widget_inputs(schema_cls).items()
         for label, value in bad_values(kind, extra)]


def errors_for(node_id: str, inputs: dict[str, Any]) -> list[dict]:
    prompt = {"1": {"class_type": node_id, "inputs": inputs}}
    validate = execution.validate_inputs
    args = ("retrace-test", prompt, "1", {}) if "prompt_id" in inspect.signature(validate).parameters else (
        prompt, "1", {})
    # A thread of its own: asyncio.run refuses a thread where another layer's event loop still runs.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        _valid, errors, _unique_id = pool.submit(asyncio.run, validate(*args)).result()
    return errors


@pytest.fixture(scope="module", autouse=True)
def registered() -> None:
    for cls in ALL_NODES:
        nodes.NODE_CLASS_MAPPINGS.setdefault(cls.define_schema().node_id, cls)


def test_no_node_switches_the_host_checks_off() -> None:
    """A validate_inputs taking **kwargs makes the host skip every range and option check of that node."""
    catch_all = [cls.__name__ for cls in ALL_NODES if own_validate(cls) is not None
                 and any(p.kind is p.VAR_KEYWORD for p in inspect.signature(own_validate(cls)).parameters.values())]
    assert catch_all == []


def test_every_node_with_widgets_is_covered() -> None:
    covered = {cls for cls, *_ in CASES}
    with_limits = {cls for cls in ALL_NODES if any(bad_values(k, e) for k, e in widget_inputs(cls).values())}
    assert covered == with_limits and len(covered) >= 30


@pytest.mark.parametrize("cls, name, label, value", CASES,
                         ids=[f"{c.define_schema().node_id}.{n}:{lbl}" for c, n, lbl, _ in CASES])
def test_the_host_refuses_an_input_outside_the_schema(cls: type, name: str, label: str, value: Any) -> None:
    node_id = cls.define_schema().node_id
    if OLD_HOST and widget_inputs(cls)[name][0] == "COMBO" and name not in own_checks(cls):
        pytest.xfail(f"ComfyUI {host_version(HOST)} does not check V3 combo options")
    inputs = {n: default_of(k, e) for n, (k, e) in widget_inputs(cls).items()}
    inputs[name] = value
    refusals = HOST_REFUSALS | ({"custom_validation_failed"} if name in own_checks(cls) else set())
    named = [e for e in errors_for(node_id, inputs)
             if e["type"] in refusals and (e.get("extra_info", {}).get("input_name") == name
                                           or e.get("details", "").split(" ")[0].rstrip(":") == name)]
    assert named, f"{node_id}.{name} = {value!r} ({label}) was not refused with the input named"


FLOAT_CASES = [(cls, name) for cls in ALL_NODES for name in float_inputs(cls)]


@pytest.mark.parametrize("cls, name", FLOAT_CASES,
                         ids=[f"{c.define_schema().node_id}.{n}" for c, n in FLOAT_CASES])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
def test_every_float_input_refuses_nan_and_infinity_before_any_work(cls: type, name: str, value: float) -> None:
    """The host lets JSON NaN past min/max; the node refuses it first thing, before it looks at anything else
    (every other input is None here, so any work at all would fail differently)."""
    inputs = {i.id: None for i in cls.define_schema().inputs}
    inputs[name] = value
    with pytest.raises(ValueError, match=rf"{name} is {value}; it needs a finite number"):
        cls.execute(**inputs)


def test_every_node_is_a_retrace_node() -> None:
    assert [cls.__name__ for cls in ALL_NODES if not issubclass(cls, RetraceNode)] == []
    assert len(FLOAT_CASES) >= 20
