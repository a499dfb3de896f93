"""The fuzz layer's prompts: seeded random widget values, within each schema and outside it (beyond min/max, unknown
options, NaN, infinity, wrong types, long and odd strings), put into the shared workflows on tiny
models and posted to the real server's /prompt. Every refusal names an input, at validation or as a ValueError of
the node; nothing else fails; the server stays up; its peak memory stays bounded. Plus every Retrace node alone,
with every widget fuzzed: the host validates what it is given and names the inputs it refuses."""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import random
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from e2e_support import WORKFLOW_KINDS, prepare_workflow, workflow_files
from fuzz_records import memory_mib

pytestmark = pytest.mark.fuzz

log = logging.getLogger("retrace.fuzz")

SEED = int(os.environ.get("RETRACE_FUZZ_SEED", "20261207"))  # another seed: other cases
BUDGET_S = 60.0  # the workflow cases stop here (the layer is bounded to about a minute)
MIN_CASES = 25   # ... but not before this many have run
STEPS = 4
# Errors a node may answer bad input with: ValueError and its subclasses (the alignment, file and batch errors).
REFUSALS = {"ValueError", "AlignmentError", "UnsupportedFileError", "UnsafeFileError", "FileNotFoundError"}
# A run's peak memory beyond that of its workflow as shipped. Tiny models at other in-schema values take a few
# MiB more, but turning on VAE refinement (shipped with 0 steps) optimises through the tiny checkpoint's full-size
# VAE: up to 516 MiB over 4 seeds. An odd value must never ask for more (a 549-byte file claiming an 8192-wide
# generator once took 1.4 GB, one claiming 16384 asked for 8 GiB).
PEAK_RISE_MIB = 1024
ODD_STRINGS = ["", " ", ",", "auto", "cat, dog", "a photo of a dog", "x" * 400, "\x00", "ünïcødé 🐈", "../../etc/passwd",
               "retrace-no-such-option", "0", "-1", "NaN"]


def widgets(spec: dict[str, Any]) -> dict[str, tuple[Any, dict]]:
    """A node's widget inputs from /object_info: name -> (type or option list, settings)."""
    out = {}
    for section in ("required", "optional"):
        for name, entry in spec["input"].get(section, {}).items():
            kind, extra = entry[0], (entry[1] if len(entry) > 1 and isinstance(entry[1], dict) else {})
            if isinstance(kind, list) or kind in ("INT", "FLOAT", "COMBO", "BOOLEAN", "STRING"):
                out[name] = (kind, extra)
    return out


def options_of(kind: Any, extra: dict) -> list | None:
    return kind if isinstance(kind, list) else extra.get("options") if kind == "COMBO" else None


def within(rng: random.Random, kind: Any, extra: dict, current: Any) -> Any:
    """A value the schema allows; integers stay near the workflow's value so a case costs seconds, not hours."""
    options = options_of(kind, extra)
    if options is not None:
        return rng.choice(options) if options else current
    if kind == "INT":
        lo, hi = extra.get("min", 0), extra.get("max", 2**31)
        base = current if isinstance(current, int) else extra.get("default", lo)
        return rng.randint(lo, max(lo, min(hi, 2 * abs(base) + 3)))
    if kind == "FLOAT":
        lo, hi = extra.get("min", -10.0), extra.get("max", 10.0)
        return rng.choice([lo, hi, rng.uniform(lo, min(hi, lo + 100.0))])
    if kind == "BOOLEAN":
        return rng.random() < 0.5
    return rng.choice(ODD_STRINGS)


def outside(rng: random.Random, kind: Any, extra: dict) -> Any:
    """A value the schema does not allow, or one no schema can (NaN, infinity, a wrong type, a dangling link)."""
    options = options_of(kind, extra)
    choices: list[Any] = [float("nan"), float("inf"), -float("inf"), None, [], {"a": 1}, True]
    if options is not None:
        choices += ["retrace-no-such-option", 3]
    elif kind in ("INT", "FLOAT"):
        step = 1 if kind == "INT" else 0.5
        choices += [extra["min"] - step] if "min" in extra else []
        choices += [extra["max"] + step, 10**30] if "max" in extra else []
        choices += ["seven", 1.5 if kind == "INT" else "1.5"]
    elif kind == "STRING":
        choices += [7, 2.5]
    return rng.choice(choices)


def post(url: str, prompt: dict) -> tuple[int, dict]:
    body = json.dumps({"prompt": prompt, "client_id": "retrace-fuzz"}).encode()  # NaN and Infinity as JSON does
    req = urllib.request.Request(url + "/prompt", data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:  # noqa: S310 (the local test server)
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def wait(client: Any, prompt_id: str, timeout: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        entry = client.get_json(f"/history/{prompt_id}").get(prompt_id)
        if entry is not None and entry.get("status", {}).get("completed") is not None:
            return entry
        time.sleep(0.1)
    raise TimeoutError(f"prompt {prompt_id} still running after {timeout:.0f} s: a within-schema value is too costly")


def names_an_input(error: dict, inputs: set[str]) -> bool:
    text = json.dumps(error)
    return error.get("extra_info", {}).get("input_name") in inputs or any(f"{name}" in text for name in inputs)


def run_measured(client: Any, pid: int, prompt: dict) -> tuple[int, dict, dict | None, float]:
    """Post ``prompt`` and wait for it: (HTTP status, reply, history entry or None if refused, the most memory the
    server held meanwhile beyond what it held before, in MiB). The peak is reset first (Linux clear_refs 5), so
    the measure is this prompt's alone, whatever ran before."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        pass
    resident = memory_mib(pid, "VmRSS")
    status, reply = post(client.url, prompt)
    entry = wait(client, reply["prompt_id"]) if status == 200 else None
    return status, reply, entry, memory_mib(pid, "VmHWM") - resident


def check_validation(reply: dict, prompt: dict, object_info: dict, problems: list[str], label: str) -> None:
    """Every node error names one of that node's inputs; a refusal with no node error must be about the graph."""
    node_errors = reply.get("node_errors") or {}
    for node_id, entry in node_errors.items():
        inputs = set(object_info[prompt[node_id]["class_type"]]["input"].get("required", {}))
        inputs |= set(object_info[prompt[node_id]["class_type"]]["input"].get("optional", {}))
        for error in entry.get("errors", []):
            if not names_an_input(error, inputs):
                problems.append(f"{label}: node {node_id} refused without naming an input: {json.dumps(error)[:300]}")
    if not node_errors and reply.get("error", {}).get("type") not in ("prompt_no_outputs", "invalid_prompt"):
        problems.append(f"{label}: refused without node errors: {json.dumps(reply)[:300]}")


@pytest.fixture(scope="module")
def prepared(object_info: dict, input_image: str, tiny_checkpoint: Path, tiny_stylegan: Path) -> dict[str, dict]:
    return {path.name: prepare_workflow(path, object_info, input_image, tiny_checkpoint.name, tiny_stylegan.name,
                                        STEPS) for path in workflow_files()}


def test_fuzzed_workflows_run_or_are_refused_naming_an_input(server, client, object_info: dict,
                                                            prepared: dict[str, dict]) -> None:
    rng = random.Random(SEED)
    names = sorted(prepared)
    assert set(names) == set(WORKFLOW_KINDS)
    outcomes: Counter[str] = Counter()
    problems: list[str] = []
    mutated_nodes: set[str] = set()
    rises: list[tuple[float, str]] = []  # a run's peak memory beyond its workflow's as shipped
    shipped: dict[str, float] = {}
    pid = server.process.pid
    t0 = time.monotonic()
    cases = 0
    while cases < MIN_CASES or time.monotonic() - t0 < BUDGET_S:
        name = rng.choice(names)
        if name not in shipped:  # first as shipped: what its models take is not the fuzzed values' memory
            status, reply, entry, shipped[name] = run_measured(client, pid, prepared[name])
            assert status == 200 and not [m for m in entry["status"].get("messages", [])
                                          if m[0] == "execution_error"], f"{name} as shipped failed: {reply}"
        for _ in range(rng.randint(1, 4)):  # a few cases on one workflow: the host's cache keeps its upstream
            prompt = copy.deepcopy(prepared[name])
            changes = []
            targets = [(nid, w) for nid, node in prompt.items() if node["class_type"].startswith("Retrace")
                       for w in widgets(object_info[node["class_type"]])
                       if not isinstance(node["inputs"].get(w), list)]
            for nid, widget in rng.sample(targets, min(len(targets), rng.randint(1, 3))):
                kind, extra = widgets(object_info[prompt[nid]["class_type"]])[widget]
                value = (within(rng, kind, extra, prompt[nid]["inputs"].get(widget)) if rng.random() < 0.6
                         else outside(rng, kind, extra))
                prompt[nid]["inputs"][widget] = value
                changes.append(f"{prompt[nid]['class_type']}.{widget}={value!r:.40}")
                mutated_nodes.add(prompt[nid]["class_type"])
            label = f"case {cases} {name} {changes}"
            cases += 1
            status, reply, entry, peak = run_measured(client, pid, prompt)
            if entry is None:
                outcomes["refused at validation"] += 1
                check_validation(reply, prompt, object_info, problems, label)
                continue
            rises.append((peak - shipped[name], label))
            errors = [m[1] for m in entry["status"].get("messages", []) if m[0] == "execution_error"]
            if not errors:
                outcomes["ran"] += 1
                continue
            error = errors[0]
            outcomes[f"refused by {error['node_type']}"] += 1
            if error.get("exception_type", "").split(".")[-1] not in REFUSALS or not error.get("exception_message"):
                problems.append(f"{label}: {error['node_type']} failed with {error.get('exception_type')}: "
                                f"{error.get('exception_message', '')[:300]}")
    seconds = time.monotonic() - t0
    assert client.system_stats()["system"], "the server went down"
    worst = max(rises, default=(0.0, ""))
    log.warning("fuzz: %d workflow cases in %.0f s over %d node types: %s; the server's peak during a run, beyond "
                "the same workflow's as shipped: at most %+.0f MiB (%s)", cases, seconds, len(mutated_nodes),
                dict(outcomes), worst[0], worst[1])
    assert not problems, "\n".join(problems[:20])
    assert outcomes["ran"] and sum(v for k, v in outcomes.items() if k.startswith("refused")), outcomes
    if not math.isnan(worst[0]):
        assert worst[0] < PEAK_RISE_MIB, worst


def test_every_node_alone_with_fuzzed_widgets_is_refused_naming_an_input(client, object_info: dict) -> None:
    """Every Retrace node in /object_info, alone with every widget fuzzed (its links missing): the host refuses
    it, and names an input in every error."""
    rng = random.Random(SEED + 1)
    retrace = sorted(k for k in object_info if k.startswith("Retrace") and not k.startswith("RetraceTest"))
    assert len(retrace) >= 44
    problems: list[str] = []
    for round_ in range(3):
        for class_type in retrace:
            inputs = {w: (within(rng, k, e, e.get("default")) if rng.random() < 0.5 else outside(rng, k, e))
                      for w, (k, e) in widgets(object_info[class_type]).items()}
            prompt = {"1": {"class_type": class_type, "inputs": inputs}}
            if object_info[class_type]["output"]:  # a node that is no output node needs one after it
                prompt["2"] = {"class_type": "PreviewAny", "inputs": {"source": ["1", 0]}}
            status, reply = post(client.url, prompt)
            if status == 200:  # a node whose every input is a widget within its schema may run: fine, if it does
                entry = wait(client, reply["prompt_id"])
                errors = [m[1] for m in entry["status"].get("messages", []) if m[0] == "execution_error"]
                if errors and errors[0].get("exception_type", "").split(".")[-1] not in REFUSALS:
                    problems.append(f"{class_type} {inputs}: {errors[0].get('exception_type')}")
                continue
            check_validation(reply, prompt, object_info, problems, f"round {round_} {class_type} {inputs!r:.200}")
    assert client.system_stats()["system"], "the server went down"
    assert not problems, "\n".join(problems[:20])
