"""The batch runner's bookkeeping (batch/plan.py, batch/cli.py) without Ray or a host: planning and its errors,
resumability, folders that are not ours, bad images refused at planning, which failures Ray retries and which a
re-run skips, ``--set`` and the image node, and writing each result exactly once."""

from __future__ import annotations

import json
import logging
import os
import random
import re
import sys
import threading
import types
from io import BytesIO
from pathlib import Path

import pytest
from PIL import Image

import batch
from batch import cli
from batch.plan import (FAILURES_FILE, FOREIGN_FOLDER, MANIFEST, PARTIAL_DIR, RETRY_ON, STATE_DIR, BatchError,
                        HostLost, ImageFailed, Override, apply_overrides, check_choices, check_override_nodes,
                        choose_image_node, finalize, image_problem, load_workflow_file, make_plan, parse_override,
                        rename_noreplace, retryable, sha256_bytes, stale_done, task_error, task_failure)
from paths import ROOT

pytestmark = pytest.mark.core

WORKFLOW = ROOT / "workflows" / "stylegan_project_reconstruct.json"  # LoadImage is node 2


def png(seed: int, size: int = 8) -> bytes:
    """A real PNG of random pixels (the planner decodes every image it would run): distinct bytes per seed."""
    rng = random.Random(seed)
    img = Image.frombytes("RGB", (size, size), bytes(rng.randrange(256) for _ in range(size * size * 3)))
    buf = BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def images(folder: Path, *names: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        (folder / name).write_bytes(png(i))
    return folder


class RayTaskError(Exception):
    """What ``ray.get`` raises for a task that raised: the task's exception is its ``cause``."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.cause = cause


def fake_driver(monkeypatch: pytest.MonkeyPatch, fail: dict[str, BaseException] | None = None) -> list[list[str]]:
    """Replace the Ray driver (and the worker module, which imports Ray): each image of ``fail`` fails with that
    exception as the task's, the others are written as done. Returns the images each run was given."""
    calls: list[list[str]] = []

    def run(todo, out_dir, workflow, image_node, overrides, host, options, progress=None):
        calls.append([p.name for p in todo])
        outcome = types.SimpleNamespace(done=[], skipped=[], failures=[], interrupted=False)
        for p in todo:
            sha = sha256_bytes(p.read_bytes())
            if p.name in (fail or {}):
                outcome.failures.append(task_failure(p.name, sha, RayTaskError(fail[p.name])))
            else:
                assert finalize(out_dir, p, sha, workflow, result(("5", "r.png", b"x"))) == "written"
                outcome.done.append(p.name)
        return outcome

    driver = types.ModuleType("batch.driver")
    driver.run, driver.RayOptions = run, lambda **kw: kw
    worker = types.ModuleType("batch.worker")
    worker.host_options = lambda *args, **kw: {}
    for name, module in (("driver", driver), ("worker", worker)):
        monkeypatch.setitem(sys.modules, f"batch.{name}", module)
        monkeypatch.setattr(batch, name, module, raising=False)
    return calls


def ui_workflow(tmp_path: Path, nodes: list[tuple[int, str, int]], name: str = "wf.json") -> Path:
    """A UI-format workflow with (id, type, mode) nodes and no links."""
    data = {"nodes": [{"id": nid, "type": kind, "mode": mode, "inputs": [], "widgets_values": []}
                      for nid, kind, mode in nodes], "links": [], "version": 0.4}
    path = tmp_path / name
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def result(*outputs: tuple[str, str, bytes], files: tuple[tuple[str, bytes], ...] = ()) -> dict:
    """What a worker returns: outputs as (node, served filename, bytes), files as (relative path, bytes)."""
    return {"outputs": [{"node": n, "filename": f, "data": d} for n, f, d in outputs],
            "files": [{"path": p, "data": d} for p, d in files],
            "worker": {"ip": "10.0.0.7", "hostname": "node7", "pid": 11, "host_pid": 12, "gpus": []},
            "started": 1700000000.0, "finished": 1700000003.5}


def tree(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file and folder under ``folder`` with its contents and mtime (ns)."""
    out = {}
    for p in sorted(folder.rglob("*")):
        st = p.stat()
        out[p.relative_to(folder).as_posix()] = (p.read_bytes() if p.is_file() else b"<dir>", st.st_mtime_ns)
    out["."] = (b"<dir>", folder.stat().st_mtime_ns)
    return out


def no_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any import of Ray (or of the driver, which needs it) fail."""
    monkeypatch.setitem(sys.modules, "ray", None)
    monkeypatch.delitem(sys.modules, "batch.driver", raising=False)


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in args] + ["--no-progress"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# --- planning ----------------------------------------------------------------------------------------------


def test_plan_lists_images_sorted_and_sorts_them_into_todo(tmp_path: Path) -> None:
    folder = images(tmp_path / "in", "b.png", "a.JPG", "c.webp", "d.tiff", "notes.txt", ".hidden.png")
    (folder / "sub").mkdir()
    images(folder / "sub", "deep.png")
    plan = make_plan(folder, tmp_path / "out")
    assert [p.name for p in plan.images] == ["a.JPG", "b.png", "c.webp", "d.tiff"]
    assert plan.todo == plan.images and plan.done == [] and plan.failures == []
    assert [p.name for p in plan.ignored] == [".hidden.png", "notes.txt", "sub"]
    assert not (tmp_path / "out").exists(), "planning wrote something"


@pytest.mark.parametrize("case, expected", [
    ("missing images", r"image folder .*nope.* does not exist"),
    ("images is a file", r"IMAGES must be a folder.*a\.png"),
    ("empty folder", r"no images in .*\(1 other file\(s\)\).*sub-folders are not searched"),
    ("out inside images", r"OUT .* is inside IMAGES"),
    ("out is images", r"OUT .* is inside IMAGES"),
    ("out is a file", r"OUT must be a folder, but .*taken.* is a file"),
    ("stem collision", r"same name but another extension.*x\.jpg and x\.png.*rename or move"),
    ("case collision", r"same name.*Y\.png and y\.webp"),
])
def test_planning_errors_name_the_problem(tmp_path: Path, case: str, expected: str) -> None:
    src = images(tmp_path / "in", "a.png")
    out = tmp_path / "out"
    if case == "missing images":
        src = tmp_path / "nope"
    elif case == "images is a file":
        src = src / "a.png"
    elif case == "empty folder":
        src = tmp_path / "empty"
        src.mkdir()
        (src / "readme.txt").write_text("x")
        images(src / "sub", "hidden_deeper.png")
    elif case == "out inside images":
        out = src / "results"
    elif case == "out is images":
        out = src
    elif case == "out is a file":
        out = tmp_path / "taken"
        out.write_text("mine")
    elif case == "stem collision":
        images(src, "x.png", "x.jpg")
    elif case == "case collision":
        images(src, "Y.png", "y.webp")
    with pytest.raises(BatchError, match=expected):
        make_plan(src, out)


def test_planning_errors_stop_the_cli_before_any_work(tmp_path: Path, capsys, monkeypatch) -> None:
    no_ray(monkeypatch)
    src = images(tmp_path / "in", "x.png", "x.jpg")
    out = tmp_path / "out"
    code, stdout, err = run_cli(capsys, WORKFLOW, src, out)
    assert code == 2
    assert "x.jpg and x.png" in err and "Ray" not in err
    assert not out.exists() and stdout == ""
    # A missing workflow, with the images fine.
    code, _, err = run_cli(capsys, tmp_path / "missing.json", images(tmp_path / "ok", "a.png"), out)
    assert code == 2 and "missing.json" in err and "does not exist" in err and not out.exists()
    # Bad numbers and a bad --model-dir.
    code, _, err = run_cli(capsys, WORKFLOW, tmp_path / "ok", out, "--workers", "0")
    assert code == 2 and "--workers must be at least 1, got 0" in err
    code, _, err = run_cli(capsys, WORKFLOW, tmp_path / "ok", out, "--model-dir", "stylegan")
    assert code == 2 and "expected KIND=PATH" in err
    code, _, err = run_cli(capsys, WORKFLOW, tmp_path / "ok", out, "--model-dir", f"stylegan={tmp_path / 'none'}")
    assert code == 2 and "is not a folder" in err
    assert not out.exists()


@pytest.mark.parametrize("content, expected", [
    ("{not json", r"is not JSON"),
    ('{"a": 1}', r"neither a UI-format workflow .* nor an API-format prompt"),
    ("[]", r"neither a UI-format workflow"),
])
def test_workflow_file_errors(tmp_path: Path, content: str, expected: str) -> None:
    path = tmp_path / "wf.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(BatchError, match=expected):
        load_workflow_file(path)
    with pytest.raises(BatchError, match=r"does not exist.*workflows/"):
        load_workflow_file(tmp_path / "missing.json")


def test_api_format_is_accepted_as_it_is(tmp_path: Path) -> None:
    prompt = {"7": {"class_type": "LoadImage", "inputs": {"image": "x.png"}},
              "8": {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": "p"}}}
    path = tmp_path / "api.json"
    path.write_text(json.dumps(prompt), encoding="utf-8")
    wf = load_workflow_file(path)
    assert wf.is_api and wf.data == prompt and wf.sha256 == sha256_bytes(path.read_bytes())
    assert choose_image_node(wf) == "7"
    ui = load_workflow_file(WORKFLOW)
    assert not ui.is_api and len(ui.data["nodes"]) == 6


# --- resumability and folders that are not ours ------------------------------------------------------------


def test_done_folders_are_skipped_and_foreign_ones_never_touched(tmp_path: Path, capsys, monkeypatch) -> None:
    no_ray(monkeypatch)  # nothing left to run: the CLI must not need Ray
    src = images(tmp_path / "in", "a.png", "b.png", "c.png", "d.png")
    out = tmp_path / "out"
    wf = load_workflow_file(WORKFLOW)
    for name in ("a.png", "b.png"):
        assert finalize(out, src / name, sha256_bytes((src / name).read_bytes()), wf,
                        result(("5", "r_00001_.png", b"img " + name.encode()))) == "written"
    foreign = out / "c"
    foreign.mkdir()
    (foreign / "mine.txt").write_text("the user's own work")
    (out / "d").write_text("a file named like the image")  # also not ours
    before = {"c": tree(foreign), "d": (out / "d").stat().st_mtime_ns}
    done_before = tree(out / "a")

    plan = make_plan(src, out)
    assert [p.name for p in plan.done] == ["a.png", "b.png"]
    assert plan.todo == []
    assert [(f.image, f.error) for f in plan.failures] == [("c.png", f"{out / 'c'} {FOREIGN_FOLDER}"),
                                                           ("d.png", f"{out / 'd'} {FOREIGN_FOLDER}")]
    code, stdout, err = run_cli(capsys, WORKFLOW, src, out)
    assert code == 1
    assert "4 image(s)" in stdout and "0 done, 2 skipped (already done), 2 failed" in stdout
    assert "c.png: " in stdout and "exists, not a batch output; move it or choose another OUT" in stdout
    report = json.loads((out / STATE_DIR / FAILURES_FILE).read_text())
    assert [f["image"] for f in report["failures"]] == ["c.png", "d.png"]
    assert report["counts"] == {"images": 4, "done": 0, "skipped": 2, "failed": 2, "unfinished": 0,
                                "previously_failed": 0}
    assert all("sha256" not in f for f in report["failures"]), "a folder in the way is not the image's failure"
    assert tree(foreign) == before["c"] and (out / "d").stat().st_mtime_ns == before["d"]
    assert (out / "d").read_text() == "a file named like the image"
    assert tree(out / "a") == done_before

    # Everything done: exit 0 with no Ray at all.
    for name in ("c", "d"):
        (tmp_path / "moved").mkdir(exist_ok=True)
        os.rename(out / name, tmp_path / "moved" / name)
    for name in ("c.png", "d.png"):
        finalize(out, src / name, sha256_bytes((src / name).read_bytes()), wf, result(("5", "r.png", b"x")))
    code, stdout, _ = run_cli(capsys, WORKFLOW, src, out)
    assert code == 0 and "0 done, 4 skipped (already done), 0 failed." in stdout
    assert json.loads((out / STATE_DIR / FAILURES_FILE).read_text())["failures"] == []


def test_work_left_without_ray_is_a_clear_error(tmp_path: Path, capsys, monkeypatch) -> None:
    no_ray(monkeypatch)
    src = images(tmp_path / "in", "a.png")
    code, stdout, err = run_cli(capsys, WORKFLOW, src, tmp_path / "out")
    assert code == 2 and stdout == ""
    assert "needs Ray" in err and "requirements-batch.txt" in err
    assert not (tmp_path / "out" / "a").exists()


def test_stale_done_images_are_reported_but_kept(tmp_path: Path) -> None:
    src = images(tmp_path / "in", "a.png", "b.png")
    out = tmp_path / "out"
    wf = load_workflow_file(WORKFLOW)
    for name in ("a.png", "b.png"):
        finalize(out, src / name, sha256_bytes((src / name).read_bytes()), wf, result(("5", "r.png", b"x")))
    (src / "b.png").write_bytes(b"edited since")
    plan = make_plan(src, out)
    notes = stale_done(plan, wf.sha256)
    assert len(notes) == 1 and notes[0].startswith("b.png: done with another version of the image;")
    assert len(stale_done(plan, "0" * 64)) == 2
    assert [p.name for p in plan.done] == ["a.png", "b.png"]


# --- bad images, ignored files, retries and previous failures ----------------------------------------------


def bad_folder(folder: Path) -> Path:
    """good.png, a PNG cut in half, a text file named .png, and notes.txt."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "good.png").write_bytes(png(1))
    whole = png(2, size=64)
    (folder / "half.png").write_bytes(whole[:len(whole) // 2])
    (folder / "fake.png").write_text("this is not an image\n")
    (folder / "notes.txt").write_text("shot on a Tuesday")
    return folder


def test_bad_images_fail_at_planning_and_other_files_are_listed(tmp_path: Path, capsys, monkeypatch,
                                                               caplog) -> None:
    caplog.set_level(logging.INFO, logger="retrace.batch")
    src = bad_folder(tmp_path / "in")
    plan = make_plan(src, tmp_path / "out")
    assert [p.name for p in plan.todo] == ["good.png"]
    assert [p.name for p in plan.ignored] == ["notes.txt"]
    errors = {f.image: f.error for f in plan.failures}
    assert sorted(errors) == ["fake.png", "half.png"]
    assert errors["half.png"].startswith("truncated PNG: image file is truncated"), errors
    assert errors["fake.png"].startswith("not an image Pillow can read (21 bytes starting b'this is "), errors
    assert all("move it out of IMAGES" in e and "\n" not in e and "retrace_batch_" not in e for e in errors.values())
    assert all(f.sha256 == sha256_bytes((src / f.image).read_bytes()) for f in plan.failures)

    # Through the CLI: no Ray, no host for them; the summary names the failures and the ignored file.
    (src / "good.png").unlink()
    no_ray(monkeypatch)
    code, stdout, err = run_cli(capsys, WORKFLOW, src, tmp_path / "out")
    assert code == 1, err
    assert "2 image(s)" in stdout and "0 done, 0 skipped (already done), 2 failed." in stdout
    assert "  half.png: truncated PNG: image file is truncated" in stdout and "  fake.png: not an image" in stdout
    assert "ignored 1 file(s) not ending in .png, .jpg, .jpeg, .webp, .bmp, .tif, .tiff" in stdout
    assert stdout.rstrip().endswith(": notes.txt.")
    assert "ignored 1 file(s)" in caplog.text and "notes.txt" in caplog.text, "not logged at planning"
    report = json.loads((tmp_path / "out" / STATE_DIR / FAILURES_FILE).read_text())
    assert sorted(f["image"] for f in report["failures"]) == ["fake.png", "half.png"]


def test_image_problems() -> None:
    assert image_problem(png(3), ".png") is None
    jpg = BytesIO()
    Image.open(BytesIO(png(4, size=64))).save(jpg, "JPEG")
    assert image_problem(jpg.getvalue(), ".jpg") is None
    assert image_problem(jpg.getvalue()[:len(jpg.getvalue()) // 2], ".jpg").startswith("truncated JPEG: ")
    assert image_problem(b"", ".webp").startswith("not an image Pillow can read (0 bytes")
    assert image_problem(png(5)[:20], ".png").startswith("not a readable image (")


def test_decompression_bombs_are_refused_before_decoding(monkeypatch) -> None:
    data = png(6, size=64)  # 4096 pixels
    for limit in (4095, 2047, 100):  # over the limit (Pillow warns) and over twice the limit (Pillow raises)
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
        problem = image_problem(data, ".png")
        assert problem is not None and "decompression bomb" in problem, (limit, problem)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 4096)
    assert image_problem(data, ".png") is None


def test_summary_caps_the_ignored_list(tmp_path: Path) -> None:
    folder = images(tmp_path / "in", "a.png")
    for i in range(13):
        (folder / f"n{i:02d}.txt").write_text("x")
    (folder / "raw").mkdir()
    plan = make_plan(folder, tmp_path / "out")
    assert len(plan.ignored) == 14
    text = cli.summary(1, 1, 0, [], 0.1, tmp_path / "f.json", ignored=plan.ignored)
    line = text.splitlines()[-1]
    assert line.startswith("ignored 14 file(s) not ending in .png") and line.endswith("n09.txt and 4 more.")
    assert "n10.txt" not in line and "raw/" not in line
    assert "ignored" not in cli.summary(1, 1, 0, [], 0.1, tmp_path / "f.json", ignored=[])


def test_only_a_lost_host_is_retried() -> None:
    upload = "retrace_batch_0123abcd.png"
    lost = task_error(ConnectionResetError(f"reset while reading {upload}"), "cat.png", upload, host_gone=True,
                      host_code=-9)
    assert isinstance(lost, HostLost) and retryable(lost)
    assert str(lost).startswith("the host exited with code -9 while running cat.png")
    refusal = ('400 from /prompt: {"error": {"message": "Prompt outputs failed validation", "details": ""}, '
               '"node_errors": {"2": {"errors": [{"message": "Custom validation failed for node", "details": '
               f'"image - Invalid image file: {upload}"}}], "class_type": "LoadImage"}}}}}}')
    refused = task_error(RuntimeError(refusal), "cat.png", upload, host_gone=False)
    assert isinstance(refused, ImageFailed) and not retryable(refused)
    assert str(refused) == ("the host refused the prompt for cat.png at validation: node 2 (LoadImage): Custom "
                            "validation failed for node: image - Invalid image file: cat.png")
    failed = task_error(RuntimeError(f"prompt 7 failed: LoadImage: cannot read {upload}"), "cat.png", upload, False)
    assert isinstance(failed, ImageFailed) and upload not in str(failed) and "cannot read cat.png" in str(failed)
    # The host answered and is alive: a connection error is not a reason to retry either.
    assert isinstance(task_error(ConnectionRefusedError("refused"), "cat.png", upload, False), ImageFailed)
    for err in (ImageFailed("x"), RuntimeError("x"), OSError("x"), TimeoutError("x"), ValueError("x")):
        assert not retryable(err), err
    assert RETRY_ON == (HostLost,)
    # Ray gets exactly these classes (retry_exceptions=True would retry every image's own failure).
    source = (ROOT / "batch" / "driver.py").read_text(encoding="utf-8")
    assert "retry_exceptions=list(RETRY_ON)" in source and "retry_exceptions=True" not in source
    # What the driver records: the image's own failure with its bytes' SHA-256, a lost host without.
    own = task_failure("cat.png", "abc", RayTaskError(refused))
    assert own.sha256 == "abc" and own.error == str(refused)
    assert task_failure("cat.png", "abc", RayTaskError(lost)).sha256 == ""
    assert task_failure("cat.png", "abc", RuntimeError("worker died")).sha256 == ""


def test_a_rerun_skips_previous_failures_until_retried_or_changed(tmp_path: Path, capsys, monkeypatch) -> None:
    src = images(tmp_path / "in", "a.png", "b.png", "c.png", "d.png")
    (src / "c.png").write_text("not an image")
    out = tmp_path / "out"
    fail = {"b.png": ImageFailed("b.png failed on the host: ComfyError: out of luck"),
            "d.png": HostLost("the host exited with code -9 while running d.png")}
    calls = fake_driver(monkeypatch, fail)
    code, stdout, err = run_cli(capsys, WORKFLOW, src, out)
    assert code == 1 and calls == [["a.png", "b.png", "d.png"]], err
    assert "1 done, 0 skipped (already done), 3 failed." in stdout
    report = json.loads((out / STATE_DIR / FAILURES_FILE).read_text())
    shas = {f["image"]: f.get("sha256") for f in report["failures"]}
    assert shas == {"c.png": sha256_bytes((src / "c.png").read_bytes()),
                    "b.png": sha256_bytes((src / "b.png").read_bytes()), "d.png": None}

    # Re-run: b and c failed on their own bytes and are skipped; d lost its host and is tried again.
    code, stdout, _ = run_cli(capsys, WORKFLOW, src, out)
    assert code == 1 and calls[-1] == ["d.png"]
    assert "1 skipped (already done), 1 failed, 2 previously failed (skipped)." in stdout
    assert "Previously failed (2); pass --retry-failed to try them again" in stdout
    assert "  b.png: b.png failed on the host: ComfyError: out of luck" in stdout
    plan = make_plan(src, out)
    assert [f.image for f in plan.previously_failed] == ["b.png", "c.png"] and [p.name for p in plan.todo] == ["d.png"]
    report = json.loads((out / STATE_DIR / FAILURES_FILE).read_text())
    assert sorted(f["image"] for f in report["failures"]) == ["b.png", "c.png", "d.png"], "skipped ones forgotten"
    assert report["counts"]["previously_failed"] == 2

    # c is fixed (new bytes): tried again by itself; b stays skipped.
    (src / "c.png").write_bytes(png(9))
    del fail["d.png"]
    code, stdout, _ = run_cli(capsys, WORKFLOW, src, out)
    assert calls[-1] == ["c.png", "d.png"] and code == 1
    assert "2 done, 1 skipped (already done), 0 failed, 1 previously failed (skipped)." in stdout
    # --retry-failed runs b again.
    del fail["b.png"]
    code, stdout, _ = run_cli(capsys, WORKFLOW, src, out, "--retry-failed")
    assert code == 0 and calls[-1] == ["b.png"]
    assert "1 done, 3 skipped (already done), 0 failed." in stdout and "previously" not in stdout
    assert json.loads((out / STATE_DIR / FAILURES_FILE).read_text())["failures"] == []


def test_failures_files_without_sha_or_unreadable_mean_retry(tmp_path: Path) -> None:
    src = images(tmp_path / "in", "a.png", "b.png")
    state = tmp_path / "out" / STATE_DIR
    state.mkdir(parents=True)
    old = {"finished": "2025-01-01T00:00:00.000Z", "workflow": "wf.json", "counts": {},
           "failures": [{"image": "a.png", "error": "old", "detail": ""},
                        {"image": "b.png", "error": "old", "detail": "", "sha256": "0" * 64}]}
    (state / FAILURES_FILE).write_text(json.dumps(old))
    plan = make_plan(src, tmp_path / "out")
    assert [p.name for p in plan.todo] == ["a.png", "b.png"] and plan.previously_failed == []
    old["failures"][1]["sha256"] = sha256_bytes((src / "b.png").read_bytes())
    (state / FAILURES_FILE).write_text(json.dumps(old))
    plan = make_plan(src, tmp_path / "out")
    assert [p.name for p in plan.todo] == ["a.png"] and [f.image for f in plan.previously_failed] == ["b.png"]
    assert [p.name for p in make_plan(src, tmp_path / "out", retry_failed=True).todo] == ["a.png", "b.png"]
    (state / FAILURES_FILE).write_text("{broken")
    assert [p.name for p in make_plan(src, tmp_path / "out").todo] == ["a.png", "b.png"]


# --- the workflow's image input and --set ------------------------------------------------------------------


def test_image_node_choice(tmp_path: Path) -> None:
    assert choose_image_node(load_workflow_file(WORKFLOW)) == "2"
    two = load_workflow_file(ui_workflow(tmp_path, [(3, "LoadImage", 0), (4, "LoadImage", 0), (5, "SaveImage", 0)]))
    with pytest.raises(BatchError, match=r"has 2 image loaders: 3 \(LoadImage\), 4 \(LoadImage\).*--image-node"):
        choose_image_node(two)
    assert choose_image_node(two, "4") == "4"
    with pytest.raises(BatchError, match=r"--image-node 5 is a SaveImage, not an image loader.*3 \(LoadImage\)"):
        choose_image_node(two, "5")
    with pytest.raises(BatchError, match=r"--image-node 9: the workflow has no node 9"):
        choose_image_node(two, "9")
    muted = load_workflow_file(ui_workflow(tmp_path, [(3, "LoadImage", 2), (4, "LoadImage", 0)], "muted.json"))
    assert choose_image_node(muted) == "4"  # a muted loader is not a candidate
    with pytest.raises(BatchError, match=r"--image-node 3 is muted or bypassed"):
        choose_image_node(muted, "3")
    none = load_workflow_file(ui_workflow(tmp_path, [(5, "SaveImage", 0), (6, "LoadImage", 4)], "none.json"))
    with pytest.raises(BatchError, match=r"has no active LoadImage node"):
        choose_image_node(none)


@pytest.mark.parametrize("text, node, name, value", [
    ("3.steps=20", "3", "steps", 20),
    ("3.learning_rate=0.05", "3", "learning_rate", 0.05),
    ("1.generator=ffhq.pkl", "1", "generator", "ffhq.pkl"),
    ('5.filename_prefix="12"', "5", "filename_prefix", "12"),
    ("5.filename_prefix=12", "5", "filename_prefix", 12),
    ("3.optimize_noise=false", "3", "optimize_noise", False),
    ("7.text=a=b, c", "7", "text", "a=b, c"),
    ("7.text=", "7", "text", ""),
    (" 4 . seed =[1, 2]", "4", "seed", [1, 2]),
])
def test_set_parsing(text: str, node: str, name: str, value) -> None:
    assert parse_override(text) == Override(node, name, value)


@pytest.mark.parametrize("text", ["3steps=1", "3.steps", ".steps=1", "3.=1", "=1", ""])
def test_set_parsing_errors(text: str) -> None:
    with pytest.raises(BatchError, match=r"expected NODE_ID\.INPUT=VALUE"):
        parse_override(text)


def test_set_is_checked_against_the_workflow_and_the_schemas(tmp_path: Path) -> None:
    wf = load_workflow_file(WORKFLOW)
    check_override_nodes(wf, [parse_override("3.steps=5"), parse_override("1.generator=x.pkl")], "2")
    with pytest.raises(BatchError, match=r"no node 9; its nodes: 1 \(RetraceStyleGANLoader\), 2 \(LoadImage\)"):
        check_override_nodes(wf, [parse_override("9.steps=5")], "2")
    with pytest.raises(BatchError, match=r"--set 2\.image: the image input of node 2 is filled with each file"):
        check_override_nodes(wf, [parse_override("2.image=x.png")], "2")
    muted = load_workflow_file(ui_workflow(tmp_path, [(3, "LoadImage", 0), (4, "KSampler", 2)]))
    with pytest.raises(BatchError, match=r"node 4 \(KSampler\) is muted"):
        check_override_nodes(muted, [parse_override("4.steps=5")], "3")

    prompt = {"3": {"class_type": "KSampler", "inputs": {"steps": 20, "model": ["1", 0]}},
              "1": {"class_type": "Loader", "inputs": {"name": "a.ckpt"}}}
    info = {"KSampler": {"input": {"required": {"steps": ["INT", {}], "model": ["MODEL"]},
                                   "optional": {"denoise": ["FLOAT", {}]}}}}
    new = apply_overrides(prompt, [parse_override("3.steps=4"), parse_override("3.denoise=0.5"),
                                   parse_override("1.name=b.ckpt")], info)
    assert new["3"]["inputs"] == {"steps": 4, "model": ["1", 0], "denoise": 0.5}
    assert new["1"]["inputs"] == {"name": "b.ckpt"}
    assert prompt["3"]["inputs"] == {"steps": 20, "model": ["1", 0]}, "the original prompt was changed"
    with pytest.raises(BatchError, match=r"node 3 \(KSampler\) has no input 'stepz'; its inputs: denoise, model, steps"):
        apply_overrides(prompt, [parse_override("3.stepz=4")], info)
    with pytest.raises(BatchError, match=r"3\.model: that input is connected to node 1"):
        apply_overrides(prompt, [parse_override("3.model=2")], info)
    with pytest.raises(BatchError, match=r"node 6 is not in the converted prompt"):
        apply_overrides(prompt, [parse_override("6.x=2")], info)


def test_choice_values_are_checked_once_before_the_images(tmp_path: Path) -> None:
    info = {"Loader": {"input": {"required": {"name": [["a.pkl", "b.pkl"], {}], "mode": ["COMBO", {"options": ["x"]}]}}},
            "LoadImage": {"input": {"required": {"image": [["example.png"], {}]}}}}
    good = {"1": {"class_type": "Loader", "inputs": {"name": "b.pkl", "mode": "x"}},
            "2": {"class_type": "LoadImage", "inputs": {"image": "per-file.png"}}}
    check_choices(good, info, "2")  # the image node's file is filled per image
    bad = json.loads(json.dumps(good))
    bad["1"]["inputs"].update(name="ffhq.pkl", mode="y")
    with pytest.raises(BatchError) as err:
        check_choices(bad, info, "2")
    assert "node 1 (Loader) name = 'ffhq.pkl' is not one the host offers ('a.pkl', 'b.pkl')" in str(err.value)
    assert "--set 1.name=VALUE" in str(err.value) and "mode = 'y'" in str(err.value)


# --- writing results exactly once --------------------------------------------------------------------------


def test_finalize_writes_the_layout_and_manifest(tmp_path: Path) -> None:
    src = images(tmp_path / "in", "cat.png")
    out = tmp_path / "out"
    wf = load_workflow_file(WORKFLOW)
    sha = sha256_bytes((src / "cat.png").read_bytes())
    res = result(("5", "rec_00001_.png", b"A"), ("9", "prev_00001_.webp", b"B"), ("5", "rec_00002_.png", b"C"),
                 files=(("retrace/stylegan_projection_00001.safetensors", b"L"),))
    assert finalize(out, src / "cat.png", sha, wf, res, {"image_node": "2"}) == "written"
    folder = out / "cat"
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()) == [
        "5_0.png", "5_1.png", "9_0.webp", "files/retrace/stylegan_projection_00001.safetensors", MANIFEST]
    assert (folder / "5_1.png").read_bytes() == b"C" and (folder / "9_0.webp").read_bytes() == b"B"
    manifest = json.loads((folder / MANIFEST).read_text())
    assert manifest["source"] == {"file": "cat.png", "sha256": sha}
    assert manifest["workflow"] == {"file": WORKFLOW.name, "sha256": sha256_bytes(WORKFLOW.read_bytes())}
    assert [o["file"] for o in manifest["outputs"]] == ["5_0.png", "9_0.webp", "5_1.png"]
    assert manifest["outputs"][2]["sha256"] == sha256_bytes(b"C")
    assert manifest["files"] == [{"file": "files/retrace/stylegan_projection_00001.safetensors",
                                  "sha256": sha256_bytes(b"L")}]
    assert manifest["worker"]["hostname"] == "node7" and manifest["worker"]["ip"] == "10.0.0.7"
    assert manifest["started"] == "2023-11-14T22:13:20.000Z" and manifest["finished"] == "2023-11-14T22:13:23.500Z"
    assert manifest["image_node"] == "2"
    assert not (out / STATE_DIR / PARTIAL_DIR).exists()
    with pytest.raises(ValueError, match="unsafe output path"):
        finalize(out, images(tmp_path / "in", "dog.png") / "dog.png", sha, wf, result(files=(("../evil", b"x"),)))
    assert not (out / "dog").exists() and not (tmp_path / "evil").exists()
    assert not (out / STATE_DIR / PARTIAL_DIR).exists() or not any((out / STATE_DIR / PARTIAL_DIR).iterdir())


def test_finalize_twice_keeps_the_first_and_discards_the_second(tmp_path: Path) -> None:
    src = images(tmp_path / "in", "cat.png")
    out = tmp_path / "out"
    wf = load_workflow_file(WORKFLOW)
    assert finalize(out, src / "cat.png", "s", wf, result(("5", "a.png", b"first"))) == "written"
    first = tree(out / "cat")
    assert finalize(out, src / "cat.png", "s", wf, result(("5", "a.png", b"second"), ("6", "b.png", b"more"))) == "exists"
    assert tree(out / "cat") == first and (out / "cat" / "5_0.png").read_bytes() == b"first"
    partial = out / STATE_DIR / PARTIAL_DIR
    assert not partial.exists() or list(partial.iterdir()) == []


def test_finalize_never_replaces_an_empty_folder_that_appears_meanwhile(tmp_path: Path, monkeypatch) -> None:
    """The folder appears after the check and before the rename: the no-replace rename refuses (a plain rename
    would silently replace an empty folder)."""
    src = images(tmp_path / "in", "cat.png")
    out = tmp_path / "out"
    wf = load_workflow_file(WORKFLOW)
    import batch.plan as plan_module

    real = plan_module.rename_noreplace

    def racing(a: Path, b: Path) -> None:
        b.mkdir()  # someone else's folder, empty
        real(a, b)

    monkeypatch.setattr(plan_module, "rename_noreplace", racing)
    assert finalize(out, src / "cat.png", "s", wf, result(("5", "a.png", b"x"))) == "exists"
    assert (out / "cat").is_dir() and list((out / "cat").iterdir()) == []
    partial = out / STATE_DIR / PARTIAL_DIR
    assert not partial.exists() or list(partial.iterdir()) == []
    # And directly: a rename onto an existing empty folder fails, the source stays.
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "f").write_text("x")
    (tmp_path / "b").mkdir()
    with pytest.raises(FileExistsError):
        rename_noreplace(tmp_path / "a", tmp_path / "b")
    assert (tmp_path / "a" / "f").is_file() and list((tmp_path / "b").iterdir()) == []


def test_finalize_from_many_threads_writes_once(tmp_path: Path) -> None:
    src = images(tmp_path / "in", "cat.png")
    out = tmp_path / "out"
    wf = load_workflow_file(WORKFLOW)
    states: list[str] = []
    barrier = threading.Barrier(8)

    def one(i: int) -> None:
        barrier.wait()
        states.append(finalize(out, src / "cat.png", "s", wf, result(("5", "a.png", f"copy {i}".encode()))))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(states) == ["exists"] * 7 + ["written"]
    assert re.fullmatch(rb"copy \d", (out / "cat" / "5_0.png").read_bytes())
    assert sorted(p.name for p in (out / "cat").iterdir()) == ["5_0.png", MANIFEST]
    partial = out / STATE_DIR / PARTIAL_DIR
    assert not partial.exists() or list(partial.iterdir()) == []


def test_the_node_pack_never_imports_the_batch_runner() -> None:
    pattern = re.compile(r"^\s*(from\s+\.*batch\b|import\s+batch\b)", re.MULTILINE)
    sources = [ROOT / "__init__.py", *(p for d in ("nodes", "inversion", "editing", "models")
                                       for p in (ROOT / d).rglob("*.py"))]
    assert len(sources) > 10
    offenders = [str(p.relative_to(ROOT)) for p in sources if pattern.search(p.read_text(encoding="utf-8"))]
    assert offenders == []
