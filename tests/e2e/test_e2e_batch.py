"""The batch runner end to end: a local Ray instance with two workers, each running the real host headless, runs
a StyleGAN projection workflow over six images; one worker's host is killed (SIGKILL) mid-image. Every image must
end up done exactly once, and a re-run must skip everything without Ray or a host. Bad files fail at planning, a
prompt the host refuses is reported under the user's file name, and Ray retries a lost host but never an image's
own failure.

Needs Ray (requirements-batch.txt, part of requirements-dev.txt); skipped, with the reason, without it. The run's
timings go to tests/out/batch_timing.json.
"""

from __future__ import annotations

import calendar
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from PIL import Image

from paths import ROOT, TEST_OUT
from scripts.images import make_test_image

try:
    import ray  # noqa: F401  (only to know it is there; the runner runs in its own process)
except ImportError as err:  # pragma: no cover
    pytest.skip(f"Ray is not installed ({err}); the batch runner's end-to-end test needs it: "
                "pip install -r requirements-batch.txt", allow_module_level=True)

from batch.plan import (FAILURES_FILE, MANIFEST, PARTIAL_DIR, RETRY_ON, STATE_DIR, HostLost,  # noqa: E402
                        ImageFailed, sha256_bytes)
from batch.worker import TASK_MARKER  # noqa: E402

pytestmark = pytest.mark.e2e

WORKFLOW = ROOT / "workflows" / "stylegan_project_reconstruct.json"  # 1 loader, 2 LoadImage, 3 project, 5 save
IMAGES = 6
STEPS = 120          # a few seconds per image on one thread
RUN_LIMIT = 150.0    # seconds for the first run
EXPECTED_FILES = {"5_0.png", "files/retrace/stylegan_projection_00001.safetensors", MANIFEST}


def _epoch(stamp: str) -> float:
    """The manifests' UTC times ('2026-01-01T12:00:00.123Z') as epoch seconds."""
    whole, frac = stamp.rstrip("Z").split(".")
    return calendar.timegm(time.strptime(whole, "%Y-%m-%dT%H:%M:%S")) + int(frac) / 1000


def _finished(out: Path) -> int:
    return sum(1 for p in out.glob(f"*/{MANIFEST}")) if out.is_dir() else 0


def _family(pid: int) -> set[tuple[int, float]]:
    """(pid, start time) of a process and everything under it."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return set()
    found = set()
    for p in procs:
        try:
            found.add((p.pid, p.create_time()))
        except psutil.Error:
            pass
    return found


def _alive(procs: set[tuple[int, float]]) -> list[str]:
    left = []
    for pid, started in procs:
        try:
            p = psutil.Process(pid)
            if p.create_time() == started and p.status() != psutil.STATUS_ZOMBIE:
                left.append(f"{pid} {' '.join(p.cmdline())[:160]}")
        except psutil.Error:
            pass
    return left


def _hosts(work: Path) -> list[tuple[psutil.Process, Path]]:
    """The host servers running under the work folder, with their run folders."""
    hosts = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = p.info["cmdline"] or []
        if "main.py" in cmd and "--output-directory" in cmd:
            output = Path(cmd[cmd.index("--output-directory") + 1])
            if work in output.parents:
                hosts.append((p, output.parent))
    return hosts


def _kill_a_busy_host(work: Path, out: Path) -> dict | None:
    """SIGKILL the host that started its current image last (it is furthest from finishing)."""
    busy = []
    for proc, run_dir in _hosts(work):
        try:
            task = json.loads((run_dir / TASK_MARKER).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        busy.append((task["started"], proc, task))
    if not busy:
        return None
    _, proc, task = max(busy, key=lambda b: b[0])
    done_before = _finished(out)
    os.kill(proc.pid, signal.SIGKILL)
    return {"pid": proc.pid, "image": task["image"], "worker_pid": task["worker_pid"], "time": time.time(),
            "task_started": task["started"], "done_before": done_before}


def _snapshot(out: Path) -> dict[str, tuple[int, int]]:
    return {p.relative_to(out).as_posix(): (p.stat().st_mtime_ns, p.stat().st_size)
            for p in sorted(out.rglob("*")) if STATE_DIR not in p.relative_to(out).parts}


def _run(cmd: list[str], log: Path, env: dict[str, str], watch=None) -> tuple[int, set, float]:
    """Run the CLI; call ``watch()`` while it runs; return its exit code, its processes and its duration."""
    t0 = time.monotonic()
    family: set[tuple[int, float]] = set()
    with open(log, "wb") as sink:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT)
        try:
            while proc.poll() is None:
                if time.monotonic() - t0 > RUN_LIMIT:
                    pytest.fail(f"the batch run took over {RUN_LIMIT:.0f} s:\n{log.read_text()[-4000:]}")
                family |= _family(proc.pid)
                if watch is not None:
                    watch()
                time.sleep(0.05)
        finally:
            if proc.poll() is None:
                for pid, _ in _family(proc.pid):
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                proc.wait(30)
    return proc.returncode, family, time.monotonic() - t0


def test_batch_survives_a_killed_host_and_resumes(tmp_path: Path, tiny_stylegan: Path) -> None:
    t_start, wall_start = time.monotonic(), time.time()
    gan = tmp_path / "gan"  # a private copy: other sessions' fixtures may rewrite theirs
    gan.mkdir()
    shutil.copyfile(tiny_stylegan, gan / tiny_stylegan.name)
    src = tmp_path / "images"
    src.mkdir()
    for i in range(IMAGES):
        make_test_image(48, seed=i).save(src / f"photo_{i}.png")
    out, work = tmp_path / "out", tmp_path / "work"
    cmd = [sys.executable, "-m", "batch", str(WORKFLOW), str(src), str(out), "--workers", "2", "--retries", "2",
           "--timeout", "120", "--work-dir", str(work), "--model-dir", f"stylegan={gan}",
           "--set", f"1.generator={tiny_stylegan.name}", "--set", f"3.steps={STEPS}", "--no-progress"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["OMP_NUM_THREADS"] = "1"
    log1 = tmp_path / "run1.log"
    killed: dict = {}

    def watch() -> None:
        if not killed and _finished(out) >= 1:
            killed.update(_kill_a_busy_host(work, out) or {})

    code, family, first_s = _run(cmd, log1, env, watch)
    text = log1.read_text(encoding="utf-8", errors="replace")
    assert code == 0, text[-6000:]
    assert f"{IMAGES} done, 0 skipped (already done), 0 failed." in text, text[-3000:]

    # Every image exactly once: one folder with its manifest and the expected files, nothing else.
    assert sorted(p.name for p in out.iterdir()) == sorted([STATE_DIR] + [f"photo_{i}" for i in range(IMAGES)])
    manifests = {}
    for i in range(IMAGES):
        folder = out / f"photo_{i}"
        files = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
        assert files == EXPECTED_FILES, (folder, files)
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        assert manifest["source"] == {"file": f"photo_{i}.png", "sha256": sha256_bytes((src / f"photo_{i}.png").read_bytes())}
        assert [o["file"] for o in manifest["outputs"]] == ["5_0.png"]
        assert manifest["outputs"][0]["sha256"] == sha256_bytes((folder / "5_0.png").read_bytes())
        with Image.open(folder / "5_0.png") as img:
            assert img.size == (32, 32)
        manifests[i] = manifest
    partial = out / STATE_DIR / PARTIAL_DIR
    assert not partial.exists() or list(partial.iterdir()) == []
    assert json.loads((out / STATE_DIR / FAILURES_FILE).read_text())["failures"] == []

    # The kill happened mid-run, to a host that was running an image, and that image was redone by another host.
    assert killed, f"no host was killed: the run finished before one was busy after the first image\n{text[-3000:]}"
    assert not psutil.pid_exists(killed["pid"]) or psutil.Process(killed["pid"]).status() == psutil.STATUS_ZOMBIE
    written = {i: _epoch(m["written"]) for i, m in manifests.items()}
    after_kill = [i for i, t in written.items() if t > killed["time"]]
    assert after_kill and killed["done_before"] < IMAGES, (killed, written)
    redone = manifests[int(Path(killed["image"]).stem.split("_")[1])]
    assert redone["worker"]["host_pid"] != killed["pid"], "the killed host had already finished its image"
    assert _epoch(redone["written"]) > killed["time"]
    assert all(m["worker"]["host_pid"] != killed["pid"] for i, m in manifests.items() if i in after_kill)
    host_pids = {m["worker"]["host_pid"] for m in manifests.values()}
    # The worker that lost its host started a new one for its next task (Ray retried the image meanwhile).
    replacements = sorted({m["worker"]["host_pid"] for m in manifests.values()
                           if m["worker"]["pid"] == killed["worker_pid"]} - {killed["pid"]})
    assert replacements, (killed, [m["worker"] for m in manifests.values()])
    assert len({m["worker"]["pid"] for m in manifests.values()}) >= 2, "one Ray worker did all the images"
    assert len(host_pids) >= 3, host_pids  # two workers' hosts and the replacement

    # Nothing left running: Ray, its workers and every host went with the driver.
    assert any(pid == killed["pid"] for pid, _ in family), "the hosts were not seen among the run's processes"
    deadline = time.monotonic() + 30
    while _alive(family) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _alive(family), _alive(family)
    assert not _hosts(work)

    # A re-run skips everything, changes nothing and needs neither Ray nor a host: `ray` cannot even be imported.
    before = _snapshot(out)
    hosts_before = sorted(p.name for p in work.iterdir()) if work.exists() else []
    blocker = tmp_path / "no_ray" / "ray"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('the re-run must not import ray')\n")
    env2 = {**env, "PYTHONPATH": str(blocker.parent)}
    log2 = tmp_path / "run2.log"
    code2, family2, rerun_s = _run(cmd, log2, env2)
    text2 = log2.read_text(encoding="utf-8", errors="replace")
    assert code2 == 0, text2[-3000:]
    assert f"{IMAGES} image(s)" in text2 and f"0 done, {IMAGES} skipped (already done), 0 failed." in text2, text2
    assert _snapshot(out) == before
    assert (sorted(p.name for p in work.iterdir()) if work.exists() else []) == hosts_before
    assert rerun_s < 20, rerun_s

    total_s = time.monotonic() - t_start
    TEST_OUT.mkdir(parents=True, exist_ok=True)
    per_image = sorted(_epoch(m["finished"]) - _epoch(m["started"]) for m in manifests.values())
    (TEST_OUT / "batch_timing.json").write_text(json.dumps({
        "test_s": round(total_s, 1), "first_run_s": round(first_s, 1), "rerun_s": round(rerun_s, 1),
        "images": IMAGES, "steps": STEPS, "workers": 2, "per_image_s": [round(t, 2) for t in per_image],
        "killed": {"host_pid": killed["pid"], "image": killed["image"], "done_before_kill": killed["done_before"],
                   "after_s": round(killed["time"] - wall_start, 1)},
        "host_pids": sorted(host_pids), "replacement_hosts": replacements, "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }, indent=1) + "\n", encoding="utf-8")
    assert total_s < 180, f"the batch test took {total_s:.0f} s"


def test_batch_runs_on_an_existing_cluster_named_by_ray_address(tmp_path: Path, tiny_stylegan: Path) -> None:
    """RAY_ADDRESS set: the runner joins that cluster (a head started with `ray start` on 127.0.0.1) instead of
    starting a Ray instance of its own, and its workers run the images."""
    from scripts.comfy_server import free_port

    gan = tmp_path / "gan"
    gan.mkdir()
    shutil.copyfile(tiny_stylegan, gan / tiny_stylegan.name)
    src = tmp_path / "images"
    src.mkdir()
    for i in range(2):
        make_test_image(40, seed=10 + i).save(src / f"shot_{i}.png")
    port = free_port()
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_AUTH_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    ray_cli = [sys.executable, "-m", "ray.scripts.scripts"]
    head = subprocess.run([*ray_cli, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
                           "--num-cpus=2", "--include-dashboard=false", "--disable-usage-stats"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert head.returncode == 0, head.stdout[-2000:] + head.stderr[-2000:]
    try:
        out = tmp_path / "out"
        cmd = [sys.executable, "-m", "batch", str(WORKFLOW), str(src), str(out), "--work-dir", str(tmp_path / "work"),
               "--model-dir", f"stylegan={gan}", "--set", f"1.generator={tiny_stylegan.name}", "--set", "3.steps=20",
               "--no-progress"]
        log = tmp_path / "cluster.log"
        gcs_seen: set[int] = set()

        def watch() -> None:  # a Ray instance of the runner's own would bring a second GCS server
            gcs_seen.update(p.pid for p in psutil.process_iter(["name"]) if p.info["name"] == "gcs_server")

        code, _, _ = _run(cmd, log, {**env, "RAY_ADDRESS": f"127.0.0.1:{port}"}, watch)
        text = log.read_text(encoding="utf-8", errors="replace")
        assert code == 0, text[-4000:]
        assert f"connecting to the Ray cluster at 127.0.0.1:{port}" in text, text[-3000:]
        assert "2 done, 0 skipped (already done), 0 failed." in text, text[-3000:]
        assert len(gcs_seen) == 1, gcs_seen
        for i in range(2):
            manifest = json.loads((out / f"shot_{i}" / MANIFEST).read_text(encoding="utf-8"))
            assert [o["file"] for o in manifest["outputs"]] == ["5_0.png"] and manifest["worker"]["host_pid"]
    finally:
        subprocess.run([*ray_cli, "stop", "--force"], env=env, capture_output=True, timeout=120)


def test_ray_retries_a_lost_host_and_never_the_images_own_failure(tmp_path: Path) -> None:
    """The driver's retry_exceptions=list(RETRY_ON) as Ray applies it: HostLost is retried, ImageFailed is not."""
    import ray

    @ray.remote
    def attempt(kind: str, folder: str) -> int:
        n = len(list(Path(folder).glob(f"{kind}-*")))
        (Path(folder) / f"{kind}-{n}").touch()
        if kind == "lost" and n < 2:
            raise HostLost(f"the host exited with code -9 while running cat.png (try {n})")
        if kind == "own":
            raise ImageFailed("the host refused the prompt for cat.png at validation: no")
        return n

    folder = tmp_path / "attempts"
    folder.mkdir()
    # Not the driver's start_ray: its code_search_path makes Ray import tasks by module name, and this one is the
    # test's. The workers import batch.plan (the exception classes) from ROOT.
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": path, "RAY_USAGE_STATS_ENABLED": "0"}})
    try:
        task = dict(num_cpus=1, max_retries=2, retry_exceptions=list(RETRY_ON))
        assert ray.get(attempt.options(**task).remote("lost", str(folder))) == 2
        with pytest.raises(ImageFailed, match="refused the prompt for cat.png"):
            ray.get(attempt.options(**task).remote("own", str(folder)))
    finally:
        ray.shutdown()
    assert len(list(folder.glob("lost-*"))) == 3 and len(list(folder.glob("own-*"))) == 1


def test_bad_files_fail_before_ray_and_a_refused_prompt_names_the_image(tmp_path: Path, tiny_stylegan: Path) -> None:
    """A truncated PNG and a text file named .jpg fail at planning, notes.txt is listed as ignored, the host's
    validation refusal (steps=0, under its minimum) names shot_0.png, not its upload name; a re-run skips all three
    without Ray."""
    gan = tmp_path / "gan"
    gan.mkdir()
    shutil.copyfile(tiny_stylegan, gan / tiny_stylegan.name)
    src = tmp_path / "images"
    src.mkdir()
    make_test_image(40, seed=20).save(src / "shot_0.png")
    make_test_image(40, seed=21).save(src / "whole.png")
    whole = (src / "whole.png").read_bytes()
    (src / "whole.png").unlink()
    (src / "broken.png").write_bytes(whole[:len(whole) // 2])
    (src / "fake.jpg").write_text("not a picture")
    (src / "notes.txt").write_text("a note")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "batch", str(WORKFLOW), str(src), str(out), "--workers", "1", "--retries", "2",
           "--work-dir", str(tmp_path / "work"), "--model-dir", f"stylegan={gan}",
           "--set", f"1.generator={tiny_stylegan.name}", "--set", "3.steps=0", "--no-progress"]
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "OMP_NUM_THREADS": "1"}
    log = tmp_path / "bad.log"
    code, _, _ = _run(cmd, log, env)
    text = log.read_text(encoding="utf-8", errors="replace")
    assert code == 1, text[-4000:]
    assert "3 image(s)" in text and "0 done, 0 skipped (already done), 3 failed." in text, text[-3000:]
    assert "  broken.png: truncated PNG: image file is truncated" in text, text[-3000:]
    assert "  fake.jpg: not an image Pillow can read" in text, text[-3000:]
    refused = [line for line in text.splitlines() if line.startswith("  shot_0.png: ")]
    assert len(refused) == 1 and "the host refused the prompt for shot_0.png at validation" in refused[0], text[-3000:]
    assert "node 3 (RetraceStyleGANProject)" in refused[0] and "steps" in refused[0], refused
    assert not re.search(r"retrace_batch_[0-9a-f]{32}", text), "a temporary upload name reached the user"
    assert "ignored 1 file(s)" in text and text.rstrip().endswith(": notes.txt."), text[-1000:]
    assert sorted(p.name for p in out.iterdir()) == [STATE_DIR]
    report = json.loads((out / STATE_DIR / FAILURES_FILE).read_text(encoding="utf-8"))
    assert {f["image"]: f.get("sha256") for f in report["failures"]} == {
        name: sha256_bytes((src / name).read_bytes()) for name in ("broken.png", "fake.jpg", "shot_0.png")}

    # The re-run skips all three (same bytes) and needs no Ray.
    blocker = tmp_path / "no_ray" / "ray"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('the re-run must not import ray')\n")
    code2, _, _ = _run(cmd, tmp_path / "rerun.log", {**env, "PYTHONPATH": str(blocker.parent)})
    text2 = (tmp_path / "rerun.log").read_text(encoding="utf-8", errors="replace")
    assert code2 == 1, text2[-3000:]
    assert "0 failed, 3 previously failed (skipped)." in text2 and "pass --retry-failed" in text2, text2[-3000:]
