"""The Ray driver of the batch runner: connect (or start a local instance), convert the workflow with a worker
host's /object_info, submit one task per image, and write each result as it comes back.

Only imported when there is work to do: a re-run with everything finished needs neither Ray nor a host.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ["RAY_USAGE_STATS_ENABLED"] = "0"  # no phoning home (before ray is imported)

import ray  # noqa: E402

from batch import worker  # noqa: E402
from batch.plan import (MANIFEST, RETRY_ON, BatchError, Failure, Override, WorkflowFile,  # noqa: E402
                        apply_overrides, check_choices, finalize, last_line, sha256_bytes, task_failure)
from scripts.workflow_api import WorkflowError, ui_to_api  # noqa: E402

log = logging.getLogger("retrace.batch")

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Outcome:
    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # finished elsewhere while this run was on it
    failures: list[Failure] = field(default_factory=list)
    interrupted: bool = False


@dataclass
class RayOptions:
    workers: int = 2
    retries: int = 2
    cpus_per_task: int = 1
    max_in_flight: int | None = None
    verbose: bool = False


def start_ray(options: RayOptions) -> None:
    """A Ray cluster when RAY_ADDRESS is set, else a new local instance with ``workers`` CPUs. The repository is
    put on the workers' import path (code_search_path): cluster nodes need it at the same path."""
    address = os.environ.get("RAY_ADDRESS") or None
    job_config = ray.job_config.JobConfig(code_search_path=[str(ROOT)])
    common = dict(job_config=job_config, log_to_driver=options.verbose,
                  logging_level=logging.INFO if options.verbose else logging.WARNING)
    if address:
        log.info("connecting to the Ray cluster at %s", address)
        ray.init(address=address, **common)
    else:
        # "local": always a new instance of our own, never one that happens to run on this machine.
        ray.init(address="local", num_cpus=options.workers, include_dashboard=False, **common)


def _error_text(err: BaseException) -> str:
    cause = getattr(err, "cause", None)  # RayTaskError: the exception the task raised
    if isinstance(cause, BaseException):
        return f"{type(cause).__name__}: {cause}"
    return f"{type(err).__name__}: {err}"


def convert(workflow: WorkflowFile, image_node: str, overrides: list[Override], host: dict[str, Any],
            task: dict[str, Any]) -> dict[str, Any]:
    """The API prompt: converted with the node schemas of a worker's host, overrides applied and checked."""
    ref = worker.fetch_object_info.options(**task).remote(host)
    try:
        object_info = ray.get(ref)
    except ray.exceptions.RayError as err:
        raise BatchError(f"could not start a host on a Ray worker to read the node schemas: "
                         f"{last_line(_error_text(err))}") from err
    try:
        prompt = workflow.data if workflow.is_api else ui_to_api(workflow.data, object_info)
    except WorkflowError as err:
        raise BatchError(f"cannot convert {workflow.path.name}: {err}") from err
    prompt = apply_overrides(prompt, overrides, object_info)
    missing = sorted({n["class_type"] for n in prompt.values() if n["class_type"] not in object_info})
    if missing:
        raise BatchError(f"the workers' host does not know the node type(s) {', '.join(missing)}; install the "
                         "custom nodes the workflow needs into .host/ComfyUI/custom_nodes on every node.")
    check_choices(prompt, object_info, image_node)
    return prompt


def run(todo: list[Path], out_dir: Path, workflow: WorkflowFile, image_node: str, overrides: list[Override],
        host: dict[str, Any], options: RayOptions, progress: Any = None) -> Outcome:
    """Run every image of ``todo`` through Ray and write the results; the caller has already planned."""
    outcome = Outcome()
    start_ray(options)
    try:
        gpus = int(ray.cluster_resources().get("GPU", 0))
        # Ray retries a dead worker by itself; of the tasks' exceptions, only a lost host (never the image's own
        # failures: they would fail again).
        task = dict(num_cpus=options.cpus_per_task, num_gpus=1 if gpus else 0, max_retries=options.retries,
                    retry_exceptions=list(RETRY_ON))
        slots = gpus or max(1, int(ray.cluster_resources().get("CPU", 1)) // options.cpus_per_task)
        window = options.max_in_flight or 2 * slots
        log.info("Ray: %d node(s), %d CPU(s), %d GPU(s): %d task slot(s)%s", len(ray.nodes()),
                 int(ray.cluster_resources().get("CPU", 0)), gpus, slots, ", one GPU per task" if gpus else "")
        prompt = convert(workflow, image_node, overrides, host, task)
        prompt_ref = ray.put(prompt)
        pending: dict[Any, tuple[Path, str]] = {}
        queue = list(reversed(todo))
        try:
            while queue or pending:
                while queue and len(pending) < window:
                    image = queue.pop()
                    try:
                        data = image.read_bytes()
                    except OSError as err:
                        outcome.failures.append(Failure(image.name, f"cannot read {image}: {err.strerror or err} "
                                                                    "(moved during the run?); run the batch again"))
                        log.error("%s failed: %s", image.name, outcome.failures[-1].error)
                        if progress is not None:
                            progress.update(1)
                        continue
                    ref = worker.run_image.options(**task).remote(prompt_ref, image_node, image.name, data, host)
                    pending[ref] = (image, sha256_bytes(data))
                if not pending:
                    continue
                ready, _ = ray.wait(list(pending), num_returns=1)
                for ref in ready:
                    image, sha = pending.pop(ref)
                    _collect(ref, image, sha, out_dir, workflow, image_node, overrides, outcome)
                    if progress is not None:
                        progress.update(1)
        except KeyboardInterrupt:
            outcome.interrupted = True
            for ref in pending:
                ray.cancel(ref, force=True)
            log.warning("interrupted: %d image(s) left unfinished (a re-run picks them up)", len(pending) + len(queue))
    finally:
        ray.shutdown()
    return outcome


def _collect(ref: Any, image: Path, sha: str, out_dir: Path, workflow: WorkflowFile, image_node: str,
             overrides: list[Override], outcome: Outcome) -> None:
    try:
        result = ray.get(ref)
    except ray.exceptions.RayError as err:
        failure = task_failure(image.name, sha, err)
        outcome.failures.append(failure)
        log.error("%s failed: %s", image.name, failure.error)
        return
    extra = {"image_node": image_node, "overrides": [o.as_dict() for o in overrides],
             "prompt_id": result.get("prompt_id")}
    t0 = time.monotonic()
    state = finalize(out_dir, image, sha, workflow, result, extra)
    if state == "written":
        outcome.done.append(image.name)
        log.debug("%s written in %.2f s", image.name, time.monotonic() - t0)
    elif (out_dir / image.stem / MANIFEST).is_file():
        outcome.skipped.append(image.name)
    else:
        outcome.failures.append(Failure(image.name, f"{out_dir / image.stem} appeared during the run and is not a "
                                                    "batch output; move it or choose another OUT"))

