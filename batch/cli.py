"""``python -m batch WORKFLOW IMAGES OUT [options]``: run a workflow over every image of a folder with Ray.

Everything that can be checked without Ray or a host is checked first (the folders, the workflow, its image
input, the ``--set`` overrides, and each image, decoded once); a re-run with every image finished (or failed
before with the same bytes) exits there, without starting anything. Exit status: 0 when no image failed, 1 when
some did, were skipped as failed before, or the run was interrupted, 2 when the batch could not start.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

from batch.plan import (RETRY_FAILED_HINT, BatchError, Failure, check_override_nodes, choose_image_node,
                        ignored_note, load_workflow_file, make_plan, parse_override, stale_done, write_failures)

log = logging.getLogger("retrace.batch")

DEFAULT_WORK_DIR = Path(tempfile.gettempdir()) / "retrace_batch"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m batch",
        description="Run a ComfyUI workflow (UI format, as the editor saves it, or API format) over every image in "
                    "a folder. Ray distributes the images over hosts (a local Ray instance, or the cluster at "
                    "RAY_ADDRESS); each image's results go to OUT/<image name>/. Finished images are skipped on a "
                    "re-run; nothing in OUT is overwritten.",
        epilog="Example: python -m batch workflows/stylegan_project_reconstruct.json photos/ out/ "
               "--model-dir stylegan=/data/gan --set 1.generator=ffhq.pkl --set 3.steps=500")
    p.add_argument("workflow", type=Path, help="the workflow .json (UI or API format)")
    p.add_argument("images", type=Path, help="a folder of images (png, jpg, jpeg, webp, bmp, tif, tiff; not recursive)")
    p.add_argument("out", type=Path, help="the output folder (created if missing; must not be inside IMAGES)")
    p.add_argument("--image-node", metavar="ID", default=None,
                   help="the LoadImage node that gets each image (needed when the workflow has several)")
    p.add_argument("--set", dest="sets", metavar="NODE_ID.INPUT=VALUE", action="append", default=[],
                   help="override a node's input after conversion, e.g. 3.steps=20 or 4.ckpt_name=model.safetensors "
                        "(the value is read as JSON if it parses, else as text); repeatable")
    p.add_argument("--model-dir", metavar="KIND=PATH", action="append", default=[],
                   help="a model folder for the hosts, e.g. checkpoints=/data/ckpt or stylegan=/data/gan; repeatable "
                        "(on a cluster the path must exist on every node)")
    p.add_argument("--workers", type=int, default=2, metavar="N",
                   help="CPUs of the local Ray instance: with one CPU per task, the hosts running at once (default 2; "
                        "ignored with RAY_ADDRESS, where the cluster's resources count)")
    p.add_argument("--cpus-per-task", type=int, default=1, metavar="N",
                   help="CPUs each task reserves and its CPU host's torch threads (default 1)")
    p.add_argument("--retries", type=int, default=2, metavar="N",
                   help="how often Ray retries an image whose task failed (default 2)")
    p.add_argument("--timeout", type=float, default=600.0, metavar="S",
                   help="seconds one image may take on its host (default 600)")
    p.add_argument("--host-start-timeout", type=float, default=300.0, metavar="S",
                   help="seconds a host may take to start (default 300)")
    p.add_argument("--work-dir", type=Path, default=DEFAULT_WORK_DIR, metavar="PATH",
                   help=f"node-local folder for the hosts' run folders (default {DEFAULT_WORK_DIR})")
    p.add_argument("--max-in-flight", type=int, default=None, metavar="N",
                   help="images submitted to Ray at once (default: twice the task slots)")
    p.add_argument("--retry-failed", action="store_true",
                   help="run again the images that failed last time (by default they are skipped until their file "
                        "changes; the list is OUT/.retrace_batch/failures.json)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging, and the workers' logs")
    return p


def parse_model_dirs(items: list[str], must_exist: bool) -> dict[str, list[str]]:
    dirs: dict[str, list[str]] = {}
    for item in items:
        kind, sep, path = item.partition("=")
        if not sep or not kind.strip() or not path.strip():
            raise BatchError(f"--model-dir {item!r}: expected KIND=PATH, for example --model-dir "
                             "checkpoints=/data/checkpoints or --model-dir stylegan=/data/stylegan.")
        folder = Path(path.strip()).expanduser().absolute()
        if must_exist and not folder.is_dir():
            raise BatchError(f"--model-dir {item!r}: {folder} is not a folder; pass an existing folder of "
                             f"{kind.strip()} models.")
        dirs.setdefault(kind.strip(), []).append(str(folder))
    return dirs


def _check_numbers(args: argparse.Namespace) -> None:
    for name, low in (("workers", 1), ("cpus_per_task", 1), ("retries", 0), ("max_in_flight", 1)):
        value = getattr(args, name)
        if value is not None and value < low:
            raise BatchError(f"--{name.replace('_', '-')} must be at least {low}, got {value}.")
    for name in ("timeout", "host_start_timeout"):
        if getattr(args, name) <= 0:
            raise BatchError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}.")


def summary(total: int, done: int, skipped: int, failures: list[Failure], seconds: float, failures_file: Path,
            unfinished: int = 0, previously_failed: list[Failure] | None = None,
            ignored: list[Path] | None = None) -> str:
    """The run's last words on stdout: the counts, each failure, the images skipped as failed before and the
    folder's entries that were not taken."""
    before = previously_failed or []
    lines = [f"Retrace batch: {total} image(s) in {seconds:.1f} s: {done} done, {skipped} skipped (already done), "
             f"{len(failures)} failed" + (f", {unfinished} unfinished (interrupted)" if unfinished else "")
             + (f", {len(before)} previously failed (skipped)" if before else "") + "."]
    if failures:
        lines.append("Failed:")
        lines.extend(f"  {f.image}: {f.error}" for f in failures)
    if before:
        lines.append(f"Previously failed ({len(before)}); {RETRY_FAILED_HINT} (or change the file):")
        lines.extend(f"  {f.image}: {f.error}" for f in before)
    if failures or before:
        lines.append(f"Details: {failures_file}")
    if ignored:
        lines.append(ignored_note(ignored) + ".")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    t0 = time.monotonic()
    on_cluster = bool(os.environ.get("RAY_ADDRESS"))
    try:
        _check_numbers(args)
        workflow = load_workflow_file(args.workflow)
        plan = make_plan(args.images, args.out, retry_failed=args.retry_failed)
        image_node = choose_image_node(workflow, args.image_node)
        overrides = [parse_override(text) for text in args.sets]
        check_override_nodes(workflow, overrides, image_node)
        model_dirs = parse_model_dirs(args.model_dir, must_exist=not on_cluster)
    except BatchError as err:
        sys.stderr.write(f"retrace batch: error: {err}\n")
        return 2
    for note in stale_done(plan, workflow.sha256):
        log.warning(note)
    log.info("%d image(s) in %s: %d to run, %d already done, %d refused, %d previously failed",
             len(plan.images), plan.images_dir, len(plan.todo), len(plan.done), len(plan.failures),
             len(plan.previously_failed))
    for failure in plan.failures:
        log.error("%s: %s", failure.image, failure.error)
    if plan.previously_failed:
        log.warning("skipping %d image(s) that failed last time with the same bytes: %s; %s",
                    len(plan.previously_failed), ", ".join(f.image for f in plan.previously_failed),
                    RETRY_FAILED_HINT)

    done: list[str] = []
    skipped = len(plan.done)
    failures = list(plan.failures)
    unfinished = 0
    if plan.todo:
        try:
            from batch import driver
        except ImportError as err:
            if (err.name or "").split(".")[0] != "ray":
                raise
            sys.stderr.write("retrace batch: error: the batch runner needs Ray, an optional extra; install it with "
                             f"`{sys.executable} -m pip install -r requirements-batch.txt` (`make batch` does).\n")
            return 2
        from tqdm import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm

        from batch.worker import host_options

        host = host_options(str(args.work_dir.expanduser().absolute()), model_dirs, timeout=args.timeout,
                            threads=args.cpus_per_task, start_timeout=args.host_start_timeout)
        options = driver.RayOptions(workers=args.workers, retries=args.retries, cpus_per_task=args.cpus_per_task,
                                    max_in_flight=args.max_in_flight, verbose=args.verbose)
        with tqdm(total=len(plan.todo), unit="image", file=sys.stderr, disable=args.no_progress,
                  dynamic_ncols=True) as bar, logging_redirect_tqdm():
            try:
                outcome = driver.run(plan.todo, plan.out_dir, workflow, image_node, overrides, host, options, bar)
            except BatchError as err:
                bar.close()
                sys.stderr.write(f"retrace batch: error: {err}\n")
                return 2
            except KeyboardInterrupt:
                bar.close()
                sys.stderr.write("retrace batch: interrupted before the images were submitted.\n")
                return 130
        done = outcome.done
        skipped += len(outcome.skipped)
        failures += outcome.failures
        unfinished = len(plan.todo) - len(outcome.done) - len(outcome.skipped) - len(outcome.failures)
    before = plan.previously_failed
    counts = {"images": len(plan.images), "done": len(done), "skipped": skipped, "failed": len(failures),
              "unfinished": unfinished, "previously_failed": len(before)}
    # The skipped ones stay listed, so the run after this one skips them too.
    failures_file = write_failures(plan.out_dir, failures + before, counts, workflow.path.name)
    sys.stdout.write(summary(len(plan.images), len(done), skipped, failures, time.monotonic() - t0, failures_file,
                             unfinished, before, plan.ignored))
    sys.stdout.flush()
    return 0 if not failures and not unfinished and not before else 1
