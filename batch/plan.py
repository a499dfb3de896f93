"""The batch runner's bookkeeping, with no Ray and no host: which images to run, what the workflow's image input
is, the ``--set`` overrides, and writing each image's results exactly once.

Layout of ``OUT``::

    OUT/<stem>/<node_id>_<k>.<ext>        the images (and other files) the workflow's output nodes listed
    OUT/<stem>/files/<path>               other files the run wrote into the host's output folder
    OUT/<stem>/retrace_batch.json         the manifest: a folder with it is done and skipped on a re-run
    OUT/.retrace_batch/failures.json      the last run's failures (an image that failed is skipped on a re-run
                                          until its bytes change or --retry-failed is given)
    OUT/.retrace_batch/partial/           results being written (moved into place with one rename)

A folder ``OUT/<stem>`` without the manifest belongs to someone else: it is never touched and its image is
reported as a failure. Every image to run is decoded once here with Pillow, so a corrupt, truncated or
non-image file is a failure before any Ray or host work. Results are staged in ``partial/`` and renamed into place with an atomic rename that
refuses to replace anything, so a result is written once or not at all and nothing is ever overwritten.
"""

from __future__ import annotations

import copy
import ctypes
import errno
import hashlib
import json
import logging
import os
import shutil
import socket
import time
import uuid
import warnings
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any

from PIL import Image, ImageFile, UnidentifiedImageError

from scripts.workflow_api import MODE_BYPASS, MODE_NEVER, VIRTUAL_NODES, ApiPrompt, set_inputs

log = logging.getLogger("retrace.batch")

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
IMAGE_LOADERS = ("LoadImage", "LoadImageMask")  # nodes that read one file from the host's input folder
MANIFEST = "retrace_batch.json"
STATE_DIR = ".retrace_batch"
PARTIAL_DIR = "partial"
FAILURES_FILE = "failures.json"
FILES_DIR = "files"
MANIFEST_VERSION = 1
FOREIGN_FOLDER = "exists, not a batch output; move it or choose another OUT"
RETRY_FAILED_HINT = "pass --retry-failed to try them again"
LISTED_NAMES = 10  # names shown in one line of the summary


class BatchError(ValueError):
    """The batch cannot start: the message says what is wrong, what was given and how to fix it."""


class HostLost(RuntimeError):
    """Infrastructure, not the image: the task's host exited (killed, out of memory, crashed) or could not be
    started. The only exception Ray retries (see :data:`RETRY_ON`)."""


class ImageFailed(RuntimeError):
    """The image failed for a reason a retry would meet again: its upload, the host refusing the prompt at
    validation, an error while running it, or --timeout. Never retried; remembered in failures.json."""


RETRY_ON: tuple[type[BaseException], ...] = (HostLost,)  # Ray's retry_exceptions; worker deaths are retried anyway


def retryable(err: BaseException) -> bool:
    """Whether Ray retries a task that raised ``err`` (it checks the same classes)."""
    return isinstance(err, RETRY_ON)


def task_error(err: BaseException, image: str, upload: str, host_gone: bool,
               host_code: int | None = None) -> HostLost | ImageFailed:
    """What an image task raises for ``err``: HostLost when its host has gone (retried), else ImageFailed. The
    message names the user's ``image``, never the temporary ``upload`` name the host saw."""
    text = str(err).replace(upload, image)
    if host_gone:
        code = f" with code {host_code}" if host_code is not None else ""
        return HostLost(f"the host exited{code} while running {image} ({type(err).__name__}: {last_line(text)})")
    for prefix in ("prompt refused: ", "400 from /prompt: "):  # node_errors in a 200 reply, or a 400 reply
        if text.startswith(prefix):
            return ImageFailed(f"the host refused the prompt for {image} at validation: "
                               f"{_refusal(text[len(prefix):])}")
    return ImageFailed(f"{image} failed on the host: {type(err).__name__}: {last_line(text)}")


def _refusal(raw: str) -> str:
    """The host's validation reply ({error, node_errors}) as one line; the raw text if it is not that JSON."""
    try:
        reply = json.loads(raw)
        if "node_errors" not in reply and "error" not in reply:
            reply = {"node_errors": reply}  # node_errors alone
        parts = []
        for nid, node in (reply.get("node_errors") or {}).items():
            for e in node.get("errors", []):
                parts.append(f"node {nid} ({node.get('class_type', '?')}): {e.get('message', '')}"
                             + (f": {e['details']}" if e.get("details") else ""))
        if not parts and isinstance(reply.get("error"), dict):
            e = reply["error"]
            parts.append(str(e.get("message", "")) + (f": {e['details']}" if e.get("details") else ""))
        return " ".join("; ".join(parts).split()) or last_line(raw)
    except (ValueError, AttributeError, TypeError):
        return last_line(raw)


@dataclass(frozen=True)
class Failure:
    image: str
    error: str  # one line
    detail: str = ""
    sha256: str = ""  # set when the failure is the image's own: a re-run skips it while its bytes stay the same

    def as_dict(self) -> dict[str, str]:
        return {"image": self.image, "error": self.error, "detail": self.detail,
                **({"sha256": self.sha256} if self.sha256 else {})}


def task_failure(image: str, sha: str, err: BaseException) -> Failure:
    """A failed image task (``err`` as ``ray.get`` raised it) as a Failure. The image's own failure (ImageFailed)
    carries its SHA-256, so a re-run skips it while the bytes stay the same; a lost host or worker (after Ray's
    retries) does not, so a re-run tries it again."""
    cause = getattr(err, "cause", None)  # Ray's RayTaskError: the exception the task raised
    raised = cause if isinstance(cause, BaseException) else err
    text = str(raised) if isinstance(raised, (HostLost, ImageFailed)) else f"{type(raised).__name__}: {raised}"
    return Failure(image, last_line(text), text[-4000:], sha if isinstance(raised, ImageFailed) else "")


@dataclass
class Plan:
    images_dir: Path
    out_dir: Path
    images: list[Path]                       # every image, sorted
    todo: list[Path] = field(default_factory=list)
    done: list[Path] = field(default_factory=list)       # a finished output folder exists: skipped
    failures: list[Failure] = field(default_factory=list)  # refused before running (foreign folder, bad image)
    ignored: list[Path] = field(default_factory=list)     # entries of images_dir that are not taken
    previously_failed: list[Failure] = field(default_factory=list)  # failed last time, same bytes: skipped


@dataclass(frozen=True)
class Override:
    node: str
    input: str
    value: Any

    def as_dict(self) -> dict[str, Any]:
        return {"node": self.node, "input": self.input, "value": self.value}


@dataclass(frozen=True)
class WorkflowFile:
    path: Path
    data: dict[str, Any]
    is_api: bool
    sha256: str


# --- files -------------------------------------------------------------------------------------------------


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def scan_folder(folder: Path) -> tuple[list[Path], list[Path]]:
    """The image files directly in ``folder`` (not in sub-folders, no hidden files) and everything else in it
    (ignored), each sorted by name."""
    images, ignored = [], []
    for p in sorted(folder.iterdir()):
        taken = p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES
        (images if taken else ignored).append(p)
    return images, ignored


def list_images(folder: Path) -> list[Path]:
    """The image files directly in ``folder`` (not in sub-folders, no hidden files), sorted by name."""
    return scan_folder(folder)[0]


def name_list(names: list[str], limit: int = LISTED_NAMES) -> str:
    """``a, b, c`` with at most ``limit`` names, then ``and N more``."""
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def ignored_note(ignored: list[Path]) -> str:
    """One line naming the folder entries the runner did not take (sub-folders with a trailing slash)."""
    names = [p.name + ("/" if p.is_dir() else "") for p in ignored]
    return (f"ignored {len(names)} file(s) not ending in {', '.join(IMAGE_SUFFIXES)} (or hidden, or folders, "
            f"which are not searched): {name_list(names)}")


def image_problem(data: bytes, suffix: str) -> str | None:
    """None when Pillow decodes all of ``data``, else why not (one line, with how to fix it). Truncated files
    fail, and so do images over Pillow's decompression-bomb limit (checked before decoding)."""
    fix = "replace the file or move it out of IMAGES"
    truncated = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            try:
                img = Image.open(BytesIO(data))
            except UnidentifiedImageError:
                return (f"not an image Pillow can read ({len(data)} bytes starting {data[:8]!r}, named {suffix}); "
                        f"{fix}")
            except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
                return f"refused as a possible decompression bomb: {last_line(str(err))}; {fix}"
            except Exception as err:  # noqa: BLE001 (a broken header raises all kinds: SyntaxError, ValueError, ...)
                return f"not a readable image ({type(err).__name__}: {last_line(str(err))}); {fix}"
            with img:
                kind = img.format or suffix.lstrip(".").upper()
                limit = Image.MAX_IMAGE_PIXELS
                if limit is not None and img.width * img.height > limit:
                    return (f"{kind} of {img.width}x{img.height} pixels, over Pillow's limit of {limit} "
                            f"(a possible decompression bomb); {fix}")
                try:
                    img.load()
                except Exception as err:  # noqa: BLE001 (OSError, SyntaxError, zlib.error, ...)
                    text = last_line(str(err)) or type(err).__name__
                    return f"{'truncated' if 'truncated' in text else 'corrupt'} {kind}: {text}; {fix}"
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = truncated
    return None


def read_failures(out_dir: Path) -> dict[str, Failure]:
    """The last run's failures that carry their image's SHA-256, by image name (older files without it, or an
    unreadable file, give none: those images are tried again)."""
    path = out_dir / STATE_DIR / FAILURES_FILE
    if not path.is_file():
        return {}
    try:
        records = json.loads(path.read_text(encoding="utf-8"))["failures"]
        return {r["image"]: Failure(r["image"], r["error"], r.get("detail", ""), r["sha256"])
                for r in records if isinstance(r, dict) and r.get("sha256")}
    except (OSError, ValueError, KeyError, TypeError) as err:
        log.warning("could not read the last run's failures from %s (%s); its failed images are tried again",
                    path, err)
        return {}


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def is_done(folder: Path) -> bool:
    return folder.is_dir() and not folder.is_symlink() and (folder / MANIFEST).is_file()


def read_manifest(folder: Path) -> dict[str, Any]:
    return json.loads((folder / MANIFEST).read_text(encoding="utf-8"))


def make_plan(images_dir: str | Path, out_dir: str | Path, retry_failed: bool = False) -> Plan:
    """List the images and sort them into to-do, done (skipped), previously failed (skipped unless
    ``retry_failed`` or their bytes changed) and refused (decoding each image to run once); raise BatchError
    before any work."""
    images_dir, out_dir = Path(images_dir), Path(out_dir)
    if not images_dir.exists():
        raise BatchError(f"the image folder {str(images_dir)!r} does not exist; pass a folder of images as IMAGES.")
    if not images_dir.is_dir():
        raise BatchError(f"IMAGES must be a folder of images, got the file {str(images_dir)!r}; "
                         "put the image(s) in a folder and pass that.")
    if out_dir.exists() and not out_dir.is_dir():
        raise BatchError(f"OUT must be a folder, but {str(out_dir)!r} is a file; choose another OUT.")
    images_real, out_real = images_dir.resolve(), out_dir.resolve()
    if _inside(out_real, images_real):
        raise BatchError(f"OUT {str(out_dir)!r} is inside IMAGES {str(images_dir)!r}; "
                         "choose an OUT folder outside the image folder.")
    images, ignored = scan_folder(images_dir)
    if not images:
        others = sum(1 for p in images_dir.iterdir() if p.is_file())
        raise BatchError(f"no images in {str(images_dir)!r} ({others} other file(s)); the runner takes files ending "
                         f"in {', '.join(IMAGE_SUFFIXES)} directly in that folder (sub-folders are not searched).")
    by_stem: dict[str, list[str]] = {}
    for path in images:
        by_stem.setdefault(path.stem.casefold(), []).append(path.name)
    clashes = [names for names in by_stem.values() if len(names) > 1]
    if clashes:
        listed = "; ".join(" and ".join(names) for names in clashes)
        raise BatchError(f"images with the same name but another extension (or case) would share one output folder: "
                         f"{listed}; rename or move all but one of each.")
    plan = Plan(images_dir=images_dir, out_dir=out_dir, images=images, ignored=ignored)
    if ignored:
        log.info("%s", ignored_note(ignored))
    failed_before = {} if retry_failed else read_failures(out_dir)
    for path in images:
        target = out_dir / path.stem
        if is_done(target):
            plan.done.append(path)
            continue
        if target.exists() or target.is_symlink():
            plan.failures.append(Failure(path.name, f"{target} {FOREIGN_FOLDER}"))
            continue
        try:
            data = path.read_bytes()
        except OSError as err:
            plan.failures.append(Failure(path.name, f"cannot read {path}: {err.strerror or err}; check its "
                                                    "permissions or move it out of IMAGES"))
            continue
        sha = sha256_bytes(data)
        before = failed_before.get(path.name)
        if before is not None and before.sha256 == sha:
            plan.previously_failed.append(before)
            continue
        problem = image_problem(data, path.suffix.lower())
        if problem is not None:
            plan.failures.append(Failure(path.name, problem, sha256=sha))
        else:
            plan.todo.append(path)
    return plan


def stale_done(plan: Plan, workflow_sha: str) -> list[str]:
    """Done images whose manifest names another version of the image or of the workflow (they stay skipped)."""
    notes = []
    for path in plan.done:
        try:
            manifest = read_manifest(plan.out_dir / path.stem)
            old_source, old_workflow = manifest["source"]["sha256"], manifest["workflow"]["sha256"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        changed = []
        if old_source != sha256_file(path):
            changed.append("image")
        if old_workflow != workflow_sha:
            changed.append("workflow")
        if changed:
            notes.append(f"{path.name}: done with another version of the {' and the '.join(changed)}; "
                         f"move {plan.out_dir / path.stem} away to run it again")
    return notes


# --- the workflow ------------------------------------------------------------------------------------------


def is_api_format(data: Any) -> bool:
    return (isinstance(data, dict) and bool(data)
            and all(isinstance(v, dict) and "class_type" in v and isinstance(v.get("inputs"), dict)
                    for v in data.values()))


def load_workflow_file(path: str | Path) -> WorkflowFile:
    """A UI-format workflow (as the editor saves it) or an API-format prompt (used as it is)."""
    path = Path(path)
    if not path.is_file():
        raise BatchError(f"the workflow {str(path)!r} does not exist; pass a workflow .json file as WORKFLOW "
                         "(for example one from workflows/).")
    raw = path.read_bytes()
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BatchError(f"the workflow {str(path)!r} is not JSON ({err}); save it from the editor "
                         "(Workflow > Save or Export).") from err
    if isinstance(data, dict) and "nodes" in data and "links" in data:
        return WorkflowFile(path, data, False, sha256_bytes(raw))
    if is_api_format(data):
        return WorkflowFile(path, data, True, sha256_bytes(raw))
    raise BatchError(f"{str(path)!r} is neither a UI-format workflow (with 'nodes' and 'links') nor an API-format "
                     "prompt ({node_id: {'class_type', 'inputs'}}); save the workflow from the editor.")


def workflow_nodes(workflow: WorkflowFile) -> dict[str, tuple[str, bool]]:
    """Node id -> (type, active). Inactive: muted, bypassed or frontend-only (absent from the converted prompt)."""
    if workflow.is_api:
        return {str(k): (v["class_type"], True) for k, v in workflow.data.items()}
    return {str(n["id"]): (n["type"], n["type"] not in VIRTUAL_NODES and n.get("mode") not in (MODE_NEVER, MODE_BYPASS))
            for n in workflow.data.get("nodes", [])}


def choose_image_node(workflow: WorkflowFile, requested: str | None = None) -> str:
    """The node that gets each image: ``requested`` (checked) or the workflow's only active image loader."""
    nodes = workflow_nodes(workflow)
    loaders = [nid for nid, (kind, active) in nodes.items() if kind in IMAGE_LOADERS and active]
    listed = ", ".join(f"{nid} ({nodes[nid][0]})" for nid in loaders) or "none"
    if requested is not None:
        requested = str(requested)
        if requested not in nodes:
            raise BatchError(f"--image-node {requested}: the workflow has no node {requested}; "
                             f"its image loaders: {listed}.")
        kind, active = nodes[requested]
        if kind not in IMAGE_LOADERS:
            raise BatchError(f"--image-node {requested} is a {kind}, not an image loader ({', '.join(IMAGE_LOADERS)}); "
                             f"the workflow's image loaders: {listed}.")
        if not active:
            raise BatchError(f"--image-node {requested} is muted or bypassed in the workflow; un-mute it in the "
                             "editor or pick another loader.")
        return requested
    if len(loaders) == 1:
        return loaders[0]
    if not loaders:
        raise BatchError(f"the workflow {workflow.path.name} has no active LoadImage node to feed the images into; "
                         "add one (or un-mute it) in the editor.")
    raise BatchError(f"the workflow {workflow.path.name} has {len(loaders)} image loaders: {listed}; "
                     "pick the one that gets the batch's images with --image-node ID.")


# --- --set overrides ---------------------------------------------------------------------------------------


def parse_override(text: str) -> Override:
    """``NODE_ID.INPUT=VALUE``; the value is parsed as JSON (numbers, true/false, lists, "strings") or else
    taken as a plain string."""
    target, sep, raw = text.partition("=")
    node, dot, name = target.strip().partition(".")
    if not sep or not dot or not node.strip() or not name.strip():
        raise BatchError(f"--set {text!r}: expected NODE_ID.INPUT=VALUE, for example --set 3.steps=20 or "
                         "--set 4.ckpt_name=my_model.safetensors.")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return Override(node.strip(), name.strip(), value)


def check_override_nodes(workflow: WorkflowFile, overrides: list[Override], image_node: str) -> None:
    """Before any work: each override names an active node of the workflow, and not the per-file image input."""
    nodes = workflow_nodes(workflow)
    for o in overrides:
        if o.node not in nodes:
            listed = ", ".join(f"{nid} ({kind})" for nid, (kind, _) in nodes.items())
            raise BatchError(f"--set {o.node}.{o.input}: the workflow has no node {o.node}; its nodes: {listed}.")
        if not nodes[o.node][1]:
            raise BatchError(f"--set {o.node}.{o.input}: node {o.node} ({nodes[o.node][0]}) is muted, bypassed or "
                             "frontend-only, so it is not part of the prompt; un-mute it in the editor.")
        if o.node == image_node and o.input == "image":
            raise BatchError(f"--set {o.node}.image: the image input of node {o.node} is filled with each file of "
                             "IMAGES; leave it out.")


def _schema_inputs(schema: dict[str, Any]) -> dict[str, Any]:
    inputs = schema.get("input") or {}
    return {**(inputs.get("required") or {}), **(inputs.get("optional") or {})}


def _is_link(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int)


def apply_overrides(prompt: ApiPrompt, overrides: list[Override],
                    object_info: dict[str, Any] | None = None) -> ApiPrompt:
    """Set the overrides on a copy of the prompt; each input must exist (in the prompt or the node's schema) and
    hold a value, not a link."""
    prompt = json.loads(json.dumps(prompt))
    for o in overrides:
        node = prompt.get(o.node)
        if node is None:
            raise BatchError(f"--set {o.node}.{o.input}: node {o.node} is not in the converted prompt.")
        known = set(node["inputs"])
        if object_info is not None and node["class_type"] in object_info:
            known |= set(_schema_inputs(object_info[node["class_type"]]))
        if o.input not in known:
            raise BatchError(f"--set {o.node}.{o.input}: node {o.node} ({node['class_type']}) has no input "
                             f"{o.input!r}; its inputs: {', '.join(sorted(known)) or 'none'}.")
        if _is_link(node["inputs"].get(o.input)):
            src = node["inputs"][o.input][0]
            raise BatchError(f"--set {o.node}.{o.input}: that input is connected to node {src}; --set only sets "
                             "values, change the connection in the editor.")
        node["inputs"][o.input] = o.value
    return prompt


def combo_options(spec: Any) -> list[Any] | None:
    if isinstance(spec, (list, tuple)) and spec:
        if isinstance(spec[0], (list, tuple)):
            return list(spec[0])
        if spec[0] == "COMBO" and len(spec) > 1 and isinstance(spec[1], dict) and "options" in spec[1]:
            return list(spec[1]["options"])
    return None


def check_choices(prompt: ApiPrompt, object_info: dict[str, Any], image_node: str) -> None:
    """Before any image runs: every choice value (model files and the like) is one the host offers, so a wrong
    file name fails once here instead of once per image."""
    problems = []
    for nid, node in prompt.items():
        specs = _schema_inputs(object_info.get(node["class_type"], {}))
        for name, value in node["inputs"].items():
            options = combo_options(specs.get(name))
            if options is None or _is_link(value) or (nid == image_node and name == "image"):
                continue
            if value not in options:
                shown = ", ".join(map(repr, options[:12])) + (", ..." if len(options) > 12 else "")
                problems.append(f"node {nid} ({node['class_type']}) {name} = {value!r} is not one the host offers "
                                f"({shown or 'none: no such files found'}); fix it with --set {nid}.{name}=VALUE "
                                "or add the folder with --model-dir KIND=PATH")
    if problems:
        raise BatchError("; ".join(problems) + ".")


def fill_image(prompt: ApiPrompt, image_node: str, name: str) -> ApiPrompt:
    """A copy of the prompt whose image loader reads ``name`` from the host's input folder."""
    prompt = copy.deepcopy(prompt)
    set_inputs(prompt, image_node, image=name)  # LoadImage or LoadImageMask
    return prompt


# --- results -----------------------------------------------------------------------------------------------


def output_name(node_id: str, k: int, filename: str) -> str:
    """``<node_id>_<k>`` with the served file's extension."""
    return f"{node_id}_{k}{Path(filename).suffix.lower() or '.bin'}"


def _safe_relative(path: str) -> Path:
    rel = Path(path)
    if rel.is_absolute() or ".." in rel.parts or not rel.parts:
        raise ValueError(f"unsafe output path {path!r}")
    return rel


_RENAME_NOREPLACE = 1
_AT_FDCWD = -100


def rename_noreplace(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst`` atomically, failing with FileExistsError if ``dst`` exists (even an empty folder,
    which a plain rename would replace). Linux renameat2; elsewhere a check then rename."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        renameat2 = None
    if renameat2 is not None:
        res = renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE)
        if res == 0:
            return
        err = ctypes.get_errno()
        if err in (errno.EEXIST, errno.ENOTEMPTY):
            raise FileExistsError(err, os.strerror(err), str(dst))
        if err not in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
            raise OSError(err, os.strerror(err), str(dst))
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
    os.rename(src, dst)


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int((t % 1) * 1000):03d}Z"


def finalize(out_dir: Path, image: Path, source_sha: str, workflow: WorkflowFile, result: dict[str, Any],
             extra: dict[str, Any] | None = None) -> str:
    """Write one image's results: stage them in OUT/.retrace_batch/partial/, then rename the folder to OUT/<stem>.

    Returns 'written', or 'exists' when OUT/<stem> appeared meanwhile (then the staged copy is discarded and
    nothing there is touched). ``result`` is what the worker returned: ``outputs`` ({node, filename, data}),
    ``files`` ({path, data}), ``worker`` and the ``started``/``finished`` times.
    """
    target = out_dir / image.stem
    if os.path.lexists(target):
        return "exists"
    stage = out_dir / STATE_DIR / PARTIAL_DIR / f"{image.stem}.{uuid.uuid4().hex}"
    for attempt in range(5):  # another finalize may remove the empty partial/ between mkdir's two steps
        try:
            stage.mkdir(parents=True)
            break
        except FileNotFoundError:
            if attempt == 4:
                raise
    try:
        outputs, counters = [], {}
        for rec in result.get("outputs", []):
            node = str(rec["node"])
            k = counters.get(node, 0)
            counters[node] = k + 1
            name = output_name(node, k, rec["filename"])
            (stage / name).write_bytes(rec["data"])
            outputs.append({"file": name, "node": node, "served_as": rec["filename"],
                            "sha256": sha256_bytes(rec["data"])})
        files = []
        for rec in result.get("files", []):
            rel = Path(FILES_DIR) / _safe_relative(rec["path"])
            (stage / rel).parent.mkdir(parents=True, exist_ok=True)
            (stage / rel).write_bytes(rec["data"])
            files.append({"file": rel.as_posix(), "sha256": sha256_bytes(rec["data"])})
        manifest = {
            "retrace_batch": MANIFEST_VERSION,
            "source": {"file": image.name, "sha256": source_sha},
            "workflow": {"file": workflow.path.name, "sha256": workflow.sha256},
            "outputs": outputs,
            "files": files,
            "worker": result.get("worker", {}),
            "started": _iso(result["started"]) if "started" in result else None,
            "finished": _iso(result["finished"]) if "finished" in result else None,
            "written": _iso(time.time()),
            "written_by": socket.gethostname(),
            **(extra or {}),
        }
        (stage / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
        rename_noreplace(stage, target)
    except FileExistsError:
        shutil.rmtree(stage, ignore_errors=True)
        log.warning("%s appeared while %s was being written; kept it, discarded this copy", target, image.name)
        return "exists"
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    _remove_empty(stage.parent)
    return "written"


def _remove_empty(*folders: Path) -> None:
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            pass


def write_failures(out_dir: Path, failures: list[Failure], counts: dict[str, int], workflow: str) -> Path:
    """OUT/.retrace_batch/failures.json: this run's failures, and those skipped as previously failed (the file is
    the runner's own, rewritten each run). A failure with ``sha256`` is skipped by the next run while its image
    keeps those bytes."""
    state = out_dir / STATE_DIR
    state.mkdir(parents=True, exist_ok=True)
    _remove_empty(state / PARTIAL_DIR)
    path = state / FAILURES_FILE
    tmp = state / f".{FAILURES_FILE}.{uuid.uuid4().hex}"
    tmp.write_text(json.dumps({"finished": _iso(time.time()), "workflow": workflow, "counts": counts,
                               "failures": [f.as_dict() for f in failures]}, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def last_line(text: str) -> str:
    lines = [line.strip() for line in str(text).strip().splitlines() if line.strip()]
    return lines[-1] if lines else "unknown error"
