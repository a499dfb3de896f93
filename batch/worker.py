"""The Ray side of the batch runner: tasks that run in Ray worker processes, each with its own headless host.

A worker process starts the real host (:class:`scripts.comfy_server.ComfyServer`) the first time a task needs it
and keeps it in a module global for the tasks that follow; a host that has died is replaced by a new one on the
next task. Retrying a failed task (on this worker or another) is Ray's job, for infrastructure failures only: a
task whose host died (or would not start) raises :class:`~batch.plan.HostLost`, which Ray retries; anything the
image itself causes (its upload, the host refusing or failing the prompt, --timeout) raises
:class:`~batch.plan.ImageFailed`, which it does not. Both name the user's image, not its temporary upload name.
Each host has its own run folder under the node-local work folder; it dies with its worker (PDEATHSIG).
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import shutil
import socket
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import ray

from batch.plan import HostLost, ImageFailed, fill_image, last_line, task_error
from scripts.comfy_server import ComfyServer

log = logging.getLogger("retrace.batch.worker")

TASK_MARKER = "current_task.json"  # in the host's run folder while it runs an image
HOST_PREFIX = "host-"
EXIT_GRACE_S = 5.0  # after a connection error: how long to wait for a dying host's exit to be seen

_HOST: ComfyServer | None = None
_HOST_KEY: str | None = None


def host_options(work_dir: str, model_dirs: dict[str, list[str]], timeout: float = 600.0, threads: int = 1,
                 start_timeout: float = 300.0) -> dict[str, Any]:
    """What the workers need to start and use a host (plain data: it travels through Ray)."""
    return {"work_dir": str(work_dir), "model_dirs": {k: [str(p) for p in v] for k, v in model_dirs.items()},
            "timeout": float(timeout), "threads": int(threads), "start_timeout": float(start_timeout)}


def _alive(server: ComfyServer) -> bool:
    return server.process is not None and server.process.poll() is None


def _gone(server: ComfyServer, grace: float = 0.0) -> bool:
    """Whether the host has exited, waiting up to ``grace`` s for it: after a lost connection, the socket closes
    a moment before the exit can be seen."""
    if server.process is None:
        return True
    try:
        server.process.wait(grace)
    except subprocess.TimeoutExpired:
        return False
    return True


def _exit_code(server: ComfyServer) -> int | None:
    return server.process.returncode if server.process is not None else None


def _host_for(options: dict[str, Any], what: str) -> ComfyServer:
    """get_host, with a failure to start one raised as HostLost (retried: it may start on another try or node)."""
    try:
        return get_host(options)
    except Exception as err:  # noqa: BLE001 (the host's start-up raises RuntimeError, TimeoutError, OSError)
        raise HostLost(f"could not start a host for {what}: {type(err).__name__}: {last_line(str(err))}") from None


def _discard_host() -> None:
    global _HOST, _HOST_KEY
    server, _HOST, _HOST_KEY = _HOST, None, None
    if server is not None:
        server.stop()
        shutil.rmtree(server.run_dir, ignore_errors=True)


atexit.register(_discard_host)


def sweep_stale(work_dir: Path) -> None:
    """Remove run folders of this machine's hosts whose worker process is gone (a worker killed with its host
    leaves its folder behind)."""
    prefix = f"{HOST_PREFIX}{socket.gethostname()}-"
    for folder in work_dir.glob(f"{prefix}*"):
        pid = folder.name[len(prefix):].split("-")[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def get_host(options: dict[str, Any]) -> ComfyServer:
    """This worker's host: the running one, or a new one if there is none, it died or the options changed."""
    global _HOST, _HOST_KEY
    gpus = ray.get_gpu_ids()
    key = json.dumps([options["work_dir"], options["model_dirs"], options["threads"],
                      os.environ.get("CUDA_VISIBLE_DEVICES")], sort_keys=True)
    if _HOST is not None and not _alive(_HOST):
        code = _HOST.process.returncode if _HOST.process is not None else None
        log.warning("the host (exit code %s) is gone; starting a new one. Its log ended with:\n%s",
                    code, _HOST.log_tail(2000))
        _discard_host()
    if _HOST is not None and _HOST_KEY != key:
        _discard_host()
    if _HOST is None:
        dirs = {kind: [Path(p) for p in paths] for kind, paths in options["model_dirs"].items()}
        sweep_stale(Path(options["work_dir"]))
        run_dir = Path(options["work_dir"]) / f"{HOST_PREFIX}{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        server = ComfyServer(run_dir=run_dir, checkpoint_dirs=dirs.pop("checkpoints", []), model_dirs=dirs,
                             threads=None if gpus else options["threads"], cpu=not gpus)
        try:
            server.start(timeout=options["start_timeout"])
        except BaseException:
            shutil.rmtree(run_dir, ignore_errors=True)
            raise
        _HOST, _HOST_KEY = server, key
    return _HOST


def _worker_info(server: ComfyServer) -> dict[str, Any]:
    return {"ip": ray.util.get_node_ip_address(), "hostname": socket.gethostname(), "pid": os.getpid(),
            "host_pid": server.process.pid if server.process is not None else None,
            "gpus": [str(g) for g in ray.get_gpu_ids()]}


def _clear(folder: Path) -> None:
    if not folder.is_dir():
        return
    for child in folder.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)


def collect_outputs(server: ComfyServer, entry: dict[str, Any]) -> tuple[list[dict], list[dict]]:
    """The files the prompt's output nodes listed (in history order, read over /view) and any other file the run
    left in the host's output folder (saved latents and records)."""
    client = server.client()
    outputs, served = [], set()
    for node_id, node_out in (entry.get("outputs") or {}).items():
        for kind, records in node_out.items():
            if not isinstance(records, list):
                continue
            for rec in records:
                if not isinstance(rec, dict) or "filename" not in rec or rec.get("type", "output") != "output":
                    continue
                subfolder = rec.get("subfolder", "") or ""
                data = client.view(rec["filename"], subfolder, "output")
                outputs.append({"node": str(node_id), "kind": kind, "filename": rec["filename"],
                                "subfolder": subfolder, "data": data})
                served.add(os.path.normpath(os.path.join(subfolder, rec["filename"])))
    files = []
    for path in sorted(server.output_dir.rglob("*")):
        rel = path.relative_to(server.output_dir).as_posix()
        if path.is_file() and not path.is_symlink() and os.path.normpath(rel) not in served:
            files.append({"path": rel, "data": path.read_bytes()})
    return outputs, files


@ray.remote
def fetch_object_info(options: dict[str, Any]) -> dict[str, Any]:
    """The host's /object_info (node schemas), for converting the workflow on the driver."""
    server = _host_for(options, "the node schemas")
    try:
        return server.client().object_info()
    except Exception as err:  # noqa: BLE001
        if _gone(server, EXIT_GRACE_S if isinstance(err, OSError) else 0.0):
            raise HostLost(f"the host exited with code {_exit_code(server)} while it was asked for its node "
                           f"schemas ({type(err).__name__}: {last_line(str(err))})") from None
        raise


@ray.remote
def run_image(prompt: dict[str, Any], image_node: str, image_name: str, image_bytes: bytes,
              options: dict[str, Any]) -> dict[str, Any]:
    """Run the prompt on one image: write it into the host's input folder under a unique name, point the image
    node at it, queue, wait, and return the output files' bytes and names (the driver writes them)."""
    server = _host_for(options, image_name)
    started = time.time()
    _clear(server.output_dir)
    name = f"retrace_batch_{uuid.uuid4().hex}{Path(image_name).suffix.lower()}"
    source = server.input_dir / name
    try:
        source.write_bytes(image_bytes)
    except OSError as err:
        source.unlink(missing_ok=True)
        raise ImageFailed(f"could not upload {image_name} into its host's input folder: "
                          f"{err.strerror or type(err).__name__}") from None
    marker = server.run_dir / TASK_MARKER
    marker.write_text(json.dumps({"image": image_name, "input": name, "started": started,
                                  "worker_pid": os.getpid()}), encoding="utf-8")
    try:
        client = server.client()
        try:
            prompt_id = client.queue_prompt(fill_image(prompt, image_node, name))
            entry = client.wait(prompt_id, timeout=options["timeout"], poll=0.2)
            outputs, files = collect_outputs(server, entry)
        except TimeoutError as err:
            if _gone(server):
                raise task_error(err, image_name, name, True, _exit_code(server)) from None
            # It is still busy with the prompt we gave up on: the next task gets a fresh host.
            _discard_host()
            raise ImageFailed(f"{image_name} did not finish within {options['timeout']:g} s (--timeout); "
                              "its host was stopped") from None
        except Exception as err:  # noqa: BLE001 (the host's refusals, its errors, lost connections)
            gone = _gone(server, EXIT_GRACE_S if isinstance(err, OSError) else 0.0)
            raise task_error(err, image_name, name, gone, _exit_code(server) if gone else None) from None
    finally:
        marker.unlink(missing_ok=True)
        source.unlink(missing_ok=True)
    _clear(server.output_dir)
    _clear(server.run_dir / "temp")  # previews
    return {"outputs": outputs, "files": files, "worker": _worker_info(server), "started": started,
            "finished": time.time(), "prompt_id": prompt_id}
