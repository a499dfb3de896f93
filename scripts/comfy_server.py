"""Start the host's server headless with its own directories, talk to it over HTTP, stop it by pid.

Shared by the end-to-end tests and ``make demo``. Everything the server writes (output, input, temp,
user, logs) goes under one run directory in the git-ignored cache; the host's own folders stay clean.
Extra model folders and extra custom-node folders (the test loaders) come in through a generated
``--extra-model-paths-config`` file, so nothing is installed into the host.
"""

from __future__ import annotations

import atexit
import ctypes
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .hosts import host_dir

ROOT = Path(__file__).resolve().parents[1]
HOST = host_dir()
CACHE = ROOT / ".cache"
TINY_CHECKPOINT_SCRIPT = ROOT / "tests" / "tiny_checkpoint.py"

log = logging.getLogger("retrace.server")


class ComfyError(RuntimeError):
    """The server refused a prompt or its execution failed."""


def _die_with_parent() -> None:
    """In the child before exec (Linux): get SIGTERM when the process that started the server dies."""
    try:
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ensure_tiny_checkpoint(timeout: float = 600.0) -> Path:
    """Write the seeded tiny SD1.5 checkpoint (tests/tiny_checkpoint.py) unless cached; return its path.

    Runs in a child process so the caller never imports the host or holds the models in memory.
    """
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    result = subprocess.run([sys.executable, str(TINY_CHECKPOINT_SCRIPT), "--print-path"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"writing the tiny checkpoint failed:\n{result.stderr[-4000:]}")
    return Path(result.stdout.strip().splitlines()[-1])


class ComfyClient:
    """The few HTTP endpoints the tests and the demo use."""

    def __init__(self, url: str, client_id: str | None = None):
        self.url = url.rstrip("/")
        self.client_id = client_id or uuid.uuid4().hex

    def _request(self, path: str, data: dict | None = None, timeout: float = 30.0) -> bytes:
        body = None if data is None else json.dumps(data).encode("utf-8")
        req = urllib.request.Request(self.url + path, data=body,
                                     headers={"Content-Type": "application/json"} if body else {})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 (a local server)
                return resp.read()
        except urllib.error.HTTPError as err:
            detail = err.read().decode("utf-8", "replace")
            raise ComfyError(f"{err.code} from {path}: {detail[:4000]}") from err

    def get_json(self, path: str, timeout: float = 30.0) -> Any:
        return json.loads(self._request(path, timeout=timeout))

    def system_stats(self) -> dict[str, Any]:
        return self.get_json("/system_stats", timeout=5.0)

    def object_info(self) -> dict[str, Any]:
        return self.get_json("/object_info", timeout=120.0)

    def queue_prompt(self, prompt: dict[str, Any]) -> str:
        reply = json.loads(self._request("/prompt", {"prompt": prompt, "client_id": self.client_id}))
        if reply.get("node_errors"):
            raise ComfyError(f"prompt refused: {json.dumps(reply['node_errors'])[:4000]}")
        return reply["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 300.0, poll: float = 0.5) -> dict[str, Any]:
        """Poll /history until the prompt has finished; return its entry or raise with the host's error."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            history = self.get_json(f"/history/{prompt_id}")
            entry = history.get(prompt_id)
            if entry is not None and entry.get("status", {}).get("completed") is not None:
                status = entry["status"]
                if status.get("status_str") == "error" or not status.get("completed"):
                    errors = [m[1] for m in status.get("messages", []) if m[0] == "execution_error"]
                    detail = "; ".join(f"{e.get('node_type')}: {e.get('exception_message', '').strip()}"
                                       for e in errors)
                    raise ComfyError(f"prompt {prompt_id} failed: {detail or status}")
                return entry
            time.sleep(poll)
        raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout:.0f} s")

    def run(self, prompt: dict[str, Any], timeout: float = 300.0) -> dict[str, Any]:
        return self.wait(self.queue_prompt(prompt), timeout)

    def view(self, filename: str, subfolder: str = "", kind: str = "output") -> bytes:
        query = urllib.parse.urlencode({"filename": filename, "subfolder": subfolder, "type": kind})
        return self._request(f"/view?{query}")


def history_images(entry: dict[str, Any], node_id: str | None = None) -> list[dict[str, str]]:
    """The image records ({filename, subfolder, type}) a history entry lists, for one node or all."""
    outputs = entry.get("outputs", {})
    ids = [node_id] if node_id is not None else list(outputs)
    return [img for nid in ids for img in outputs.get(nid, {}).get("images", [])]


@dataclass
class ComfyServer:
    """A headless host server in its own run directory. Use as a context manager; stop() is idempotent."""

    run_dir: Path
    checkpoint_dirs: list[Path] = field(default_factory=list)
    custom_node_dirs: list[Path] = field(default_factory=list)
    model_dirs: dict[str, list[Path]] = field(default_factory=dict)  # other model folders, e.g. {"stylegan": [...]}
    port: int = 0
    extra_args: list[str] = field(default_factory=list)
    threads: int | None = None
    cpu: bool = True  # False: the host uses the GPU it sees (CUDA_VISIBLE_DEVICES), as the batch runner's workers do
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def input_dir(self) -> Path:
        return self.run_dir / "input"

    @property
    def output_dir(self) -> Path:
        return self.run_dir / "output"

    @property
    def log_file(self) -> Path:
        return self.run_dir / "server.log"

    def client(self) -> ComfyClient:
        return ComfyClient(self.url)

    def _write_paths_config(self) -> Path:
        """The --extra-model-paths-config file: model folders and (test-only) custom-node folders."""
        lines = ["retrace_run:"]
        folders = [("checkpoints", self.checkpoint_dirs), ("custom_nodes", self.custom_node_dirs),
                   *self.model_dirs.items()]
        for key, dirs in folders:
            if dirs:
                lines.append(f"  {key}: |")
                lines.extend(f"    {Path(d).resolve()}" for d in dirs)
        path = self.run_dir / "extra_model_paths.yaml"
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        return path

    def start(self, timeout: float = 180.0) -> ComfyServer:
        if not (HOST / "main.py").is_file():
            raise FileNotFoundError(f"no host at {HOST}; run `make setup` first.")
        for sub in ("output", "input", "temp", "user"):
            (self.run_dir / sub).mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        cmd = [sys.executable, "main.py", *(["--cpu"] if self.cpu else []),
               "--listen", "127.0.0.1", "--port", str(self.port),
               "--disable-auto-launch", "--database-url", "sqlite:///:memory:",
               "--output-directory", str(self.output_dir), "--input-directory", str(self.input_dir),
               "--temp-directory", str(self.run_dir / "temp"), "--user-directory", str(self.run_dir / "user"),
               "--extra-model-paths-config", str(self._write_paths_config()), *self.extra_args]
        env = dict(os.environ)
        if self.threads is not None:
            env["OMP_NUM_THREADS"] = str(self.threads)
        log.info("starting the host on port %d (log: %s)", self.port, self.log_file)
        with open(self.log_file, "wb") as out:
            self.process = subprocess.Popen(cmd, cwd=HOST, env=env, stdout=out, stderr=subprocess.STDOUT,
                                            start_new_session=True,
                                            preexec_fn=_die_with_parent if sys.platform == "linux" else None)
        atexit.register(self.stop)
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        client = self.client()
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                code = self.process.returncode
                raise RuntimeError(f"the host exited with {code} during start-up:\n{self.log_tail()}")
            try:
                client.system_stats()
                log.info("host ready at %s", self.url)
                return
            except (OSError, ComfyError):
                time.sleep(0.5)
        raise TimeoutError(f"the host did not answer /system_stats within {timeout:.0f} s:\n{self.log_tail()}")

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_file.read_text(encoding="utf-8", errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self, timeout: float = 15.0) -> None:
        """Stop the server by its pid: SIGTERM, then SIGKILL if it does not exit in time."""
        proc, self.process = self.process, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)
        log.info("host on port %d stopped", self.port)

    def add_input_file(self, source: Path, name: str | None = None) -> str:
        """Copy a file into the server's input directory (the source is never touched); return its name."""
        name = name or Path(source).name
        shutil.copyfile(source, self.input_dir / name)
        return name

    def __enter__(self) -> ComfyServer:
        return self.start() if self.process is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()
