"""The toy world: procedural scenes with exact ground truth, for measuring whether an edit takes and whether the
rest of the picture stays put.

A scene is two objects on a background, drawn at 64 x 64: the first object in the left half, the second in the
right half, each a coloured shape with a size and a small offset of its own. Its prompt names every attribute
("a red circle and a blue square on a white background"), each word one token of the SD1 tokenizer, so a
single-attribute edit is a one-word swap with the token count unchanged. For every edit the world gives the exact
target scene (the same scene with one attribute changed, every offset and size kept) and the mask of what may
change; ``read_attributes`` reads the attributes back from a picture, so an edit can be scored without a model.

Plain torch; never imports ComfyUI.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

SIZE = 64
COLOURS = {"red": (0.85, 0.1, 0.1), "green": (0.1, 0.7, 0.15), "blue": (0.1, 0.2, 0.9), "yellow": (0.95, 0.85, 0.1)}
SHAPES = ("circle", "square", "triangle")
BACKGROUNDS = {"white": (0.95, 0.95, 0.95), "black": (0.05, 0.05, 0.05), "gray": (0.5, 0.5, 0.5)}
# Object centres (x) of the two halves, and the jitter and size ranges, in pixels.
CENTRES = (16, 48)
JITTER = 3
SIZES = (18, 24)
EDIT_KINDS = ("colour", "shape", "background")


@dataclass(frozen=True)
class Thing:
    shape: str
    colour: str
    size: int  # the side of the shape's bounding square
    dx: int  # offset of the centre from the half's centre
    dy: int


@dataclass(frozen=True)
class Scene:
    things: tuple[Thing, Thing]
    background: str

    @property
    def prompt(self) -> str:
        a, b = self.things
        return f"a {a.colour} {a.shape} and a {b.colour} {b.shape} on a {self.background} background"


@dataclass(frozen=True)
class Edit:
    """One attribute of one scene changed: ``kind`` ("colour", "shape" or "background"), which object (0 or 1;
    None for the background), the word it replaces and the word it becomes."""

    source: Scene
    target: Scene
    kind: str
    thing: int | None
    old_word: str
    new_word: str


def sample_scene(generator: torch.Generator) -> Scene:
    """A scene drawn uniformly from the world (attributes, sizes and offsets)."""

    def pick(options: tuple | list) -> str:
        return options[int(torch.randint(len(options), (1,), generator=generator))]

    def thing() -> Thing:
        size = int(torch.randint(SIZES[0], SIZES[1] + 1, (1,), generator=generator))
        dx, dy = (int(v) for v in torch.randint(-JITTER, JITTER + 1, (2,), generator=generator))
        return Thing(pick(SHAPES), pick(list(COLOURS)), size, dx, dy)

    return Scene((thing(), thing()), pick(list(BACKGROUNDS)))


def shape_mask(thing: Thing, index: int, size: int = SIZE) -> torch.Tensor:
    """``[size, size]`` bool: the pixels ``thing`` covers as object ``index`` (0 left, 1 right)."""
    scale = size / SIZE
    cx = (CENTRES[index] + thing.dx) * scale
    cy = (SIZE / 2 + thing.dy) * scale
    half = thing.size * scale / 2
    ys, xs = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    if thing.shape == "circle":
        return (xs - cx) ** 2 + (ys - cy) ** 2 <= half**2
    if thing.shape == "square":
        side = half * 0.85  # a square of the same area as the circle looks the same size
        return ((xs - cx).abs() <= side) & ((ys - cy).abs() <= side)
    if thing.shape == "triangle":  # pointing up, base at the bottom of the bounding square
        top, bottom = cy - half, cy + half
        width = half * (ys - top) / (2 * half)
        return (ys >= top) & (ys <= bottom) & ((xs - cx).abs() <= width)
    raise ValueError(f"unknown shape {thing.shape!r}; the world has {SHAPES}")


def render(scene: Scene, size: int = SIZE) -> torch.Tensor:
    """The scene as a ``[size, size, 3]`` image in [0, 1] (the host's IMAGE layout, without the batch)."""
    image = torch.tensor(BACKGROUNDS[scene.background]).expand(size, size, 3).clone()
    for index, thing in enumerate(scene.things):
        image[shape_mask(thing, index, size)] = torch.tensor(COLOURS[thing.colour])
    return image


def edit_mask(edit: Edit, size: int = SIZE) -> torch.Tensor:
    """``[size, size]`` bool: where the edit may change the picture. An object edit: the object's old and new
    footprints. A background edit: everything but the objects."""
    if edit.kind == "background":
        return ~(shape_mask(edit.source.things[0], 0, size) | shape_mask(edit.source.things[1], 1, size))
    index = edit.thing
    return shape_mask(edit.source.things[index], index, size) | shape_mask(edit.target.things[index], index, size)


def edits_of(scene: Scene, generator: torch.Generator) -> list[Edit]:
    """One edit of each kind for ``scene``: a colour swap and a shape swap (of a random object) and a background
    swap, each to a random other value."""

    def other(options: list[str], current: str) -> str:
        choices = [o for o in options if o != current]
        return choices[int(torch.randint(len(choices), (1,), generator=generator))]

    out = []
    for kind in EDIT_KINDS:
        if kind == "background":
            new = other(list(BACKGROUNDS), scene.background)
            out.append(Edit(scene, replace(scene, background=new), kind, None, scene.background, new))
            continue
        index = int(torch.randint(2, (1,), generator=generator))
        thing = scene.things[index]
        field = "colour" if kind == "colour" else "shape"
        old = getattr(thing, field)
        new = other(list(COLOURS) if kind == "colour" else list(SHAPES), old)
        things = list(scene.things)
        things[index] = replace(thing, **{field: new})
        out.append(Edit(scene, Scene(tuple(things), scene.background), kind, index, old, new))
    return out


def edit_set(count: int, seed: int = 0) -> list[Edit]:
    """A fixed set of ``count`` edits (a multiple of 3: as many of each kind) on scenes drawn from ``seed``."""
    if count % len(EDIT_KINDS):
        raise ValueError(f"count must be a multiple of {len(EDIT_KINDS)} (one edit of each kind per scene); got {count}")
    generator = torch.Generator().manual_seed(seed)
    out: list[Edit] = []
    while len(out) < count:
        out += edits_of(sample_scene(generator), generator)
    return out


def _nearest(colour: torch.Tensor, palette: dict[str, tuple[float, float, float]]) -> str:
    names = list(palette)
    distances = torch.stack([(colour - torch.tensor(palette[n])).square().sum() for n in names])
    return names[int(distances.argmin())]


def read_attributes(image: torch.Tensor) -> dict[str, str]:
    """Read a ``[H, W, 3]`` picture of the world back into attribute words: ``background``, and ``colour0``,
    ``shape0``, ``colour1``, ``shape1`` for the left and right objects. The background is the median colour of the
    border; an object's pixels are those of its half far from the background colour, its colour their median, its
    shape the template (at their centroid and extent) that overlaps them best. A half with no such pixels reads as
    shape and colour "none"."""
    image = image.float().clamp(0, 1)
    size = image.shape[0]
    border = torch.cat((image[0], image[-1], image[:, 0], image[:, -1]))
    background = border.median(dim=0).values
    out = {"background": _nearest(background, BACKGROUNDS)}
    far = (image - background).square().sum(-1).sqrt() > 0.25
    half = size // 2
    for index in (0, 1):
        region = torch.zeros_like(far)
        columns = slice(0, half) if index == 0 else slice(half, size)
        region[:, columns] = far[:, columns]
        if int(region.sum()) < (size / SIZE) ** 2 * 20:
            out[f"colour{index}"] = out[f"shape{index}"] = "none"
            continue
        out[f"colour{index}"] = _nearest(image[region].median(dim=0).values, COLOURS)
        out[f"shape{index}"] = _best_shape(region, index, size)
    return out


def _best_shape(region: torch.Tensor, index: int, size: int) -> str:
    ys, xs = torch.nonzero(region, as_tuple=True)
    scale = SIZE / size
    # Centre and extent from the bounding box, in world pixels.
    cx = (float(xs.min() + xs.max()) / 2 + 0.5) * scale
    cy = (float(ys.min() + ys.max()) / 2 + 0.5) * scale
    extent = (float(max(xs.max() - xs.min(), ys.max() - ys.min())) + 1) * scale
    best, best_iou = SHAPES[0], -1.0
    for shape in SHAPES:
        # A square is drawn at 0.85 of its bounding size: fit its extent to that.
        side = extent / 0.85 if shape == "square" else extent
        template = shape_mask(Thing(shape, "red", max(1, round(side)), round(cx - CENTRES[index]),
                                    round(cy - SIZE / 2)), index, size)
        iou = float((template & region).sum()) / max(1.0, float((template | region).sum()))
        if iou > best_iou:
            best, best_iou = shape, iou
    return best


def attributes_of(scene: Scene) -> dict[str, str]:
    """The words ``read_attributes`` should read from a picture of ``scene``."""
    out = {"background": scene.background}
    for index, thing in enumerate(scene.things):
        out[f"colour{index}"], out[f"shape{index}"] = thing.colour, thing.shape
    return out


def psnr(a: torch.Tensor, b: torch.Tensor, peak: float, mask: torch.Tensor | None = None) -> float:
    """PSNR in dB of ``a`` against ``b`` with the given peak, over ``mask`` (broadcast; None: everywhere)."""
    error = (a.detach().float() - b.detach().float()).square()
    if mask is not None:
        mask = mask.to(error).expand_as(error)
        mse = float((error * mask).sum() / mask.sum().clamp_min(1))
    else:
        mse = float(error.mean())
    return 10 * math.log10(peak**2 / max(mse, 1e-20))
