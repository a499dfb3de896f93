"""The host side of attention store and inject: which attention calls a model makes, and hooks that record or
edit them through the host's sanctioned seams only.

A hook is installed on a clone of the MODEL as
- ``transformer_options["optimized_attention_override"]``: sees every attention call (UNet and DiT alike),
  chained to any override already there;
- an ``APPLY_MODEL`` wrapper: per network call, the step (from the sigma), the conditional rows (from
  ``cond_or_uncond``) and the layer counter;
- an ``OUTER_SAMPLE`` wrapper: per sampling run, the store's reset (recording) or the check that the store fits
  this run (injecting), before any network call;
- a ``PREDICT_NOISE`` wrapper: the denoised estimate the sampler steps with, recorded or locally blended.
Nothing in the host is replaced or patched.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import comfy.patcher_extension
import torch
from comfy.ldm.modules.attention import BasicTransformerBlock
from comfy.ldm.modules.diffusionmodules.openaimodel import Downsample, Upsample

from ..editing import prompt_to_prompt as p2p
from ..editing.attention_store import AttentionStore, LayerSpec
from ..inversion.schedules import SIGMA_MATCH, step_index
from ._host import model_family, model_name

log = logging.getLogger("retrace")

KEY = "retrace_attention"
# A guider marks the model calls of a branch that must be neither recorded nor edited (direct inversion's
# source branch on the inverted trajectory) with this transformer_options key.
BRANCH_KEY = "retrace_branch"
SOURCE_BRANCH = "source"


def identity_of(model: Any) -> dict[str, str]:
    return {"model": model_name(model), "family": model_family(model)}


def _unet_specs(unet: torch.nn.Module, height: int, width: int, text: int) -> list[LayerSpec]:
    """Attention calls of a host UNet in forward order: each transformer block's self then cross attention."""
    specs: list[LayerSpec] = []
    sizes = [(height, width)]

    def add_blocks(block: torch.nn.Module) -> None:
        rows, cols = sizes[-1]
        for module in block.modules():
            if isinstance(module, BasicTransformerBlock):
                for attn, kind in ((module.attn1, "self"), (module.attn2, "cross")):
                    if attn is None:
                        continue
                    heads = attn.heads
                    dim_head = attn.to_q.out_features // heads
                    keys = rows * cols if kind == "self" else text
                    specs.append(LayerSpec(kind, heads, dim_head, rows * cols, keys, 0 if kind == "self" else text,
                                           (rows, cols)))

    for block in unet.input_blocks:
        add_blocks(block)
        if any(isinstance(m, Downsample) for m in block.modules()):
            rows, cols = sizes[-1]
            sizes.append((math.ceil(rows / 2), math.ceil(cols / 2)))
    add_blocks(unet.middle_block)
    for block in unet.output_blocks:
        add_blocks(block)
        if any(isinstance(m, Upsample) for m in block.modules()) and len(sizes) > 1:
            sizes.pop()
    return specs


def layer_specs(diffusion_model: torch.nn.Module, latent_shape: tuple[int, ...], text: int) -> list[LayerSpec]:
    """The attention calls one forward pass of ``diffusion_model`` makes for a latent of ``latent_shape`` and a
    prompt of ``text`` tokens, in call order."""
    height, width = latent_shape[-2:]
    if hasattr(diffusion_model, "input_blocks"):
        return _unet_specs(diffusion_model, height, width, text)
    if hasattr(diffusion_model, "double_blocks"):  # Flux
        patch = diffusion_model.patch_size
        grid = (math.ceil(height / patch), math.ceil(width / patch))
        heads = diffusion_model.num_heads
        joint = LayerSpec("joint", heads, diffusion_model.hidden_size // heads, grid[0] * grid[1],
                          text + grid[0] * grid[1], text, grid)
        return [joint] * (len(diffusion_model.double_blocks) + len(diffusion_model.single_blocks))
    if hasattr(diffusion_model, "joint_blocks"):  # SD3 (MMDiT)
        patch = diffusion_model.patch_size
        grid = (math.ceil(height / patch), math.ceil(width / patch))
        text += getattr(diffusion_model, "register_length", 0)
        specs = []
        for block in diffusion_model.joint_blocks:
            attn = block.x_block.attn
            dim_head = attn.qkv.out_features // 3 // attn.num_heads
            specs.append(LayerSpec("joint", attn.num_heads, dim_head, grid[0] * grid[1], text + grid[0] * grid[1],
                                   text, grid))
            if block.x_block.x_block_self_attn:
                specs.append(LayerSpec("self", attn.num_heads, dim_head, grid[0] * grid[1], grid[0] * grid[1], 0,
                                       grid))
        return specs
    raise ValueError(f"Retrace attention store/inject supports SD1.x and SDXL UNets, Flux and SD3; this model's "
                     f"network is {type(diffusion_model).__name__}.")


def self_ordinals(specs: list[LayerSpec]) -> list[int]:
    """For each layer, its position among the layers with self-attention (MasaCtrl counts layers this way)."""
    out, count = [], 0
    for spec in specs:
        out.append(count)
        count += spec.kind != "cross"
    return out


def _to_heads(t: torch.Tensor, heads: int, skip_reshape: bool) -> torch.Tensor:
    if skip_reshape:
        return t
    b, n = t.shape[:2]  # SD3 hands values over as [batch, tokens, heads, dim_head]
    return t.reshape(b, n, heads, -1).transpose(1, 2)


def _from_heads(t: torch.Tensor, skip_output_reshape: bool) -> torch.Tensor:
    if skip_output_reshape:
        return t
    b, h, n, d = t.shape
    return t.transpose(1, 2).reshape(b, n, h * d)


def _substituted(t: torch.Tensor, parts: list[tuple[slice, torch.Tensor]], skip_reshape: bool) -> torch.Tensor:
    """``t`` (in the layout the host handed it over) with the given rows replaced by ``[b, heads, n, d]`` tensors;
    ``t`` itself where they hold its own values, so the call sees the very tensor the host made."""
    changed = [(rows, part if skip_reshape else part.transpose(1, 2).reshape(t[rows].shape)) for rows, part in parts]
    changed = [(rows, part) for rows, part in changed if not torch.equal(part, t[rows])]
    if not changed:
        return t
    out = t.clone()
    for rows, part in changed:
        out[rows] = part
    return out


@dataclass
class Call:
    """One network call: its step (None off the schedule), its row chunks and which are conditional."""

    step: int | None
    chunks: list[tuple[slice, bool]]
    skip: bool
    layer: int = 0


@dataclass
class Run:
    """One sampling run."""

    sigmas: torch.Tensor | None = None
    specs: list[LayerSpec] | None = None
    latent_shape: tuple[int, ...] | None = None
    blend_source: torch.Tensor | None = None
    blend_target: torch.Tensor | None = None
    blend_coverage: list[float] = field(default_factory=list)
    blend_mask: torch.Tensor | None = None  # the last step's local-blend mask, [images, 1, h, w] on the CPU
    warned: bool = False

    @property
    def steps(self) -> int:
        return 0 if self.sigmas is None else len(self.sigmas) - 1


def _attention_args(args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, bool, bool]:
    q, k, v = args[:3]
    heads = args[3] if len(args) > 3 else kwargs["heads"]
    return q, k, v, heads, bool(kwargs.get("skip_reshape", False)), bool(kwargs.get("skip_output_reshape", False))


class AttentionHook:
    """Shared by every clone of the patched model (the host deep-copies model options on clone)."""

    def __init__(self, identity: dict[str, str], previous: Callable | None):
        self.identity = identity
        self.previous = previous
        self.call: Call | None = None
        self.run = Run()

    def __deepcopy__(self, memo: dict) -> AttentionHook:
        return self

    def install(self, model: Any) -> Any:
        """``model``, a clone, with this hook in place."""
        options = model.model_options.setdefault("transformer_options", {})
        options["optimized_attention_override"] = self
        model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, KEY, self.outer_sample)
        model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, KEY, self.apply_model)
        model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.PREDICT_NOISE, KEY, self.predict_noise)
        return model

    # -- per run and per call -------------------------------------------------------------------------------

    def outer_sample(self, executor: Any, noise, latent_image, sampler, sigmas, *args: Any, **kwargs: Any):
        self.begin_run(tuple(latent_image.shape), sigmas)
        out = executor(noise, latent_image, sampler, sigmas, *args, **kwargs)
        self.end_run()
        return out

    def begin_run(self, latent_shape: tuple[int, ...], sigmas: torch.Tensor) -> None:
        self.run = Run(sigmas=sigmas.detach().to("cpu", torch.float64).clone(), latent_shape=latent_shape)

    def end_run(self) -> None:
        pass

    def step_of(self, sigma: float) -> int | None:
        return None if self.run.sigmas is None else step_index(self.run.sigmas[:-1], sigma)

    def apply_model(self, executor: Any, x, t, c_concat=None, c_crossattn=None, control=None,
                    transformer_options={}, **kwargs: Any):  # noqa: B006 (the host's signature)
        skip = transformer_options.get(BRANCH_KEY) == SOURCE_BRANCH
        groups = transformer_options.get("cond_or_uncond") or [0]
        rows = x.shape[0] // len(groups)
        chunks = [(slice(i * rows, (i + 1) * rows), g == 0) for i, g in enumerate(groups)]
        step = self.step_of(float(t.flatten()[0]))
        if self.run.specs is None:
            text = 0 if c_crossattn is None else c_crossattn.shape[1]
            self.run.specs = layer_specs(executor.class_obj.diffusion_model, tuple(x.shape), text)
            self.plan(self.run.specs, rows)
        if step is None and not skip and not self.run.warned:
            self.run.warned = True
            log.warning("Retrace attention: a model call at sigma %.4g is not a step of the sampled schedule; such "
                        "calls are neither recorded nor edited. Use a first-order sampler (Euler/DDIM).",
                        float(t.flatten()[0]))
        self.call = Call(step=step, chunks=chunks, skip=skip or step is None)
        try:
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        finally:
            self.call = None

    def plan(self, specs: list[LayerSpec], images: int) -> None:
        pass

    def predict_noise(self, executor: Any, x, timestep, model_options={}, seed=None):  # noqa: B006
        return executor(x, timestep, model_options, seed)

    # -- attention ------------------------------------------------------------------------------------------

    def plain(self, func: Callable, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.previous is not None:
            return self.previous(func, *args, **kwargs)
        return func(*args, **kwargs)

    def __call__(self, func: Callable, *args: Any, **kwargs: Any) -> torch.Tensor:
        call = self.call
        if call is None:
            return self.plain(func, *args, **kwargs)
        index = call.layer
        call.layer += 1
        specs = self.run.specs
        if index >= len(specs):
            raise RuntimeError(f"Retrace attention: this model made more attention calls than the {len(specs)} "
                               f"expected from its layout; it is not a supported SD1.x/SDXL/Flux/SD3 network.")
        if call.skip or kwargs.get("mask") is not None:
            return self.plain(func, *args, **kwargs)
        spec = specs[index]
        q, k, v, heads, skip_reshape, skip_out = _attention_args(args, kwargs)
        tokens = q.shape[2] if skip_reshape else q.shape[1]
        expected = spec.queries + (spec.text if spec.kind == "joint" else 0)
        if tokens != expected:
            raise RuntimeError(f"Retrace attention: layer {index} has {tokens} query tokens, {expected} expected from "
                               f"the model's layout; this network is not supported.")
        return self.attention(func, args, kwargs, index, spec, call)

    def attention(self, func: Callable, args: tuple, kwargs: dict, index: int, spec: LayerSpec,
                  call: Call) -> torch.Tensor:
        return self.plain(func, *args, **kwargs)


class AttentionRecorder(AttentionHook):
    """Fills a store during the sampling run that uses the patched model (reset at its start)."""

    def __init__(self, store: AttentionStore, identity: dict[str, str], previous: Callable | None):
        super().__init__(identity, previous)
        self.store = store

    def begin_run(self, latent_shape: tuple[int, ...], sigmas: torch.Tensor) -> None:
        super().begin_run(latent_shape, sigmas)
        self.store.begin(self.identity, latent_shape, sigmas)

    def end_run(self) -> None:
        self.store.finish()

    def plan(self, specs: list[LayerSpec], images: int) -> None:
        self.store.plan(specs, images)

    def predict_noise(self, executor: Any, x, timestep, model_options={}, seed=None):  # noqa: B006
        out = executor(x, timestep, model_options, seed)
        step = self.step_of(float(timestep.flatten()[0]))
        if step is not None:
            self.store.put_denoised(step, out)
        return out

    def attention(self, func: Callable, args: tuple, kwargs: dict, index: int, spec: LayerSpec,
                  call: Call) -> torch.Tensor:
        out = self.plain(func, *args, **kwargs)
        names = self.store.layers.get(index)
        cond = next((rows for rows, is_cond in call.chunks if is_cond), None)
        if names and cond is not None:
            q, k, v, heads, skip_reshape, _ = _attention_args(args, kwargs)
            tensors = {"q": q, "k": k, "v": v}
            picked = {}
            for name in names:
                t = _to_heads(tensors[name][cond], heads, skip_reshape)
                picked[name] = t[:, :, spec.text:] if (name == "q" and spec.kind == "joint") else t
            self.store.put(call.step, index, picked)
        return out


def records_attention(model_options: dict) -> bool:
    """Whether a model's options carry a Retrace attention recorder (a guider must then call the model)."""
    return isinstance(model_options.get("transformer_options", {}).get("optimized_attention_override"),
                      AttentionRecorder)


def store_of(model_options: dict) -> AttentionStore | None:
    """The attention store a model's Retrace recorder fills or its inject reads; None without either."""
    hook = model_options.get("transformer_options", {}).get("optimized_attention_override")
    return getattr(hook, "store", None) if isinstance(hook, (AttentionRecorder, AttentionInjector)) else None


def source_branch_options(model_options: dict) -> dict:
    """A copy of ``model_options`` whose model calls attention hooks leave alone."""
    options = {**model_options.get("transformer_options", {}), BRANCH_KEY: SOURCE_BRANCH}
    return {**model_options, "transformer_options": options}


# A local-blend mask this full (or this empty) blends nothing: the edit passes everywhere (or nowhere).
BLEND_FULL, BLEND_EMPTY = 0.9, 0.01


def report_blend_coverage(coverage: list[float], threshold: float) -> None:
    """Warn when the blend mask covered (nearly) the whole latent or nothing, with the fraction it covered."""
    if not coverage:
        return
    mean = sum(coverage) / len(coverage)
    if mean >= BLEND_FULL:
        log.warning("Retrace Attention Inject: the local-blend mask covered %.0f%% of the latent (mean over %d "
                    "steps at threshold %.2f), so the blend kept almost nothing of the source. That is expected for a "
                    "word that fills the picture (a background); otherwise the words' attention is not localised in "
                    "this model. Raise blend_threshold, or look at the words' maps with Retrace Attention Maps.", 100 * mean, len(coverage), threshold)
    elif mean <= BLEND_EMPTY:
        log.warning("Retrace Attention Inject: the local-blend mask covered %.1f%% of the latent (mean over %d "
                    "steps at threshold %.2f), so the edit was blended away; lower blend_threshold.",
                    100 * mean, len(coverage), threshold)


class AttentionInjector(AttentionHook):
    """Edits the conditional rows' attention from a filled store (or reweights without one)."""

    def __init__(self, store: AttentionStore | None, settings: p2p.InjectSettings, identity: dict[str, str],
                 previous: Callable | None):
        super().__init__(identity, previous)
        self.store = store
        self.settings = settings
        self.ordinals: list[int] = []

    def begin_run(self, latent_shape: tuple[int, ...], sigmas: torch.Tensor) -> None:
        super().begin_run(latent_shape, sigmas)
        if self.store is not None:
            check_store_fits(self.store, self.identity, latent_shape, sigmas)

    def plan(self, specs: list[LayerSpec], images: int) -> None:
        if self.store is not None and self.store.specs is not None and self.store.specs != specs:
            raise ValueError("Retrace Attention Inject: this model's attention layers differ from the store's "
                             "(another model or resolution). Store and edit with the same model and latent.")
        self.ordinals = self_ordinals(specs)

    def predict_noise(self, executor: Any, x, timestep, model_options={}, seed=None):  # noqa: B006
        out = executor(x, timestep, model_options, seed)
        step = self.step_of(float(timestep.flatten()[0]))
        settings = self.settings
        if step is None or self.store is None or not settings.blend_active(step, self.run.steps):
            return out
        if self.run.blend_source is None and self.run.blend_target is None:
            return out
        mask = p2p.blend_mask(self.run.blend_source, self.run.blend_target, settings.blend_threshold)
        self.run.blend_coverage.append(float(mask.mean()))
        self.run.blend_mask = mask.detach().to("cpu", torch.float32)
        if step == self.run.steps - 1:
            report_blend_coverage(self.run.blend_coverage, settings.blend_threshold)
        return p2p.local_blend(out, self.store.denoised[step].to(out), mask)

    def _accumulate(self, which: str, maps: torch.Tensor | None, positions: tuple[int, ...], spec: LayerSpec) -> None:
        if maps is None or not positions:
            return
        size = tuple(self.run.latent_shape[-2:])
        grid = p2p.to_latent_grid(p2p.word_maps(maps, positions), spec.grid, size)
        name = f"blend_{which}"
        total = getattr(self.run, name)
        setattr(self.run, name, grid if total is None else total + grid.to(total))

    def attention(self, func: Callable, args: tuple, kwargs: dict, index: int, spec: LayerSpec,
                  call: Call) -> torch.Tensor:
        settings, step, steps = self.settings, call.step, self.run.steps
        source_entry = None if self.store is None else self.store.get(step, index)
        edit: p2p.TokenEdit | None = None
        if spec.kind != "self" and settings.cross_active(step, steps):
            edit = settings.edit
            has_source_maps = source_entry is not None and "q" in source_entry
            if (edit.mapper is not None and not has_source_maps) or (edit.mapper is None and edit.weights is None):
                edit = None
        self_mode = "off"
        if spec.kind != "cross" and source_entry is not None:
            if settings.self_replace_active(step, steps) and "q" in source_entry:
                self_mode = "replace"
            elif settings.mutual_active(step, self.ordinals[index]) and "v" in source_entry:
                self_mode = "mutual"
        blend = settings.blends and spec.kind != "self"
        if edit is None and self_mode == "off" and not blend:
            return self.plain(func, *args, **kwargs)
        q, k, v, heads, skip_reshape, skip_out = _attention_args(args, kwargs)
        cond_rows = []
        for rows, is_cond in call.chunks:
            if is_cond:
                qh, kh, vh = (_to_heads(t[rows], heads, skip_reshape) for t in (q, k, v))
                source = None if source_entry is None else {n: t.to(qh) for n, t in source_entry.items()}
                if blend:
                    self._accumulate_blend(qh, kh, source, spec)
                cond_rows.append((rows, qh, kh, vh, source))
        single = [p2p.one_call(qh, kh, vh, spec.kind, spec.text, source, edit, self_mode)
                  for _, qh, kh, vh, source in cond_rows]
        if all(term is not None for term in single):
            # The very call the unedited layer makes, with the conditional rows' tensors substituted.
            q, k, v = (_substituted(t, [(c[0], term[i]) for c, term in zip(cond_rows, single)], skip_reshape)
                       for i, t in enumerate((q, k, v)))
            return self.plain(func, q, k, v, *args[3:], **kwargs)
        attend = self._host_kernel(func, heads, kwargs)
        outs, cond = [], iter(cond_rows)
        for rows, is_cond in call.chunks:
            if not is_cond:
                outs.append(self.plain(func, q[rows], k[rows], v[rows], *args[3:], **kwargs))
                continue
            _, qh, kh, vh, source = next(cond)
            if spec.kind == "self":
                out = p2p.self_attention(qh, kh, vh, source, self_mode, attend)
            elif spec.kind == "joint":
                out = p2p.joint_attention(qh, kh, vh, spec.text, source, edit, self_mode, attend)
            else:
                out = p2p.cross_attention(qh, kh, vh, source, edit or p2p.TokenEdit(), attend)
            outs.append(_from_heads(out, skip_out))
        return torch.cat(outs, dim=0) if len(outs) > 1 else outs[0]

    def _accumulate_blend(self, q: torch.Tensor, k: torch.Tensor, source: dict[str, torch.Tensor] | None,
                          spec: LayerSpec) -> None:
        """Add this layer's maps of the blend words, target and source, to the run's totals (P2P sums them over
        layers and steps)."""
        settings = self.settings
        image = q[:, :, spec.text:] if spec.kind == "joint" else q
        self._accumulate("target", p2p.text_maps(image, k, spec.text), settings.blend_target, spec)
        if source is not None and "q" in source:
            source_text = source["k"].shape[2] - (spec.queries if spec.kind == "joint" else 0)
            self._accumulate("source", p2p.text_maps(source["q"], source["k"], source_text), settings.blend_source,
                             spec)

    def _host_kernel(self, func: Callable, heads: int, kwargs: dict) -> p2p.Attend:
        """The host's attention (and any override before ours) on ``[batch, heads, tokens, dim]`` tensors."""
        options = {k: v for k, v in kwargs.items() if k in ("attn_precision", "transformer_options")}

        def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return self.plain(func, q, k, v, heads, skip_reshape=True, skip_output_reshape=True, **options)
        return attend


def check_store_fits(store: AttentionStore, identity: dict[str, str], latent_shape: tuple[int, ...] | None,
                     sigmas: torch.Tensor | None) -> None:
    """Raise, naming both sides, unless ``store`` holds a finished run of this model, latent and schedule."""
    if not store.complete:
        raise ValueError("Retrace Attention Inject: the attention store is empty. Sample the source pass with the "
                         "model from Retrace Attention Store first, and connect its output latent to source_result so "
                         "the edit runs after it.")
    if store.identity != identity:
        raise ValueError(f"Retrace Attention Inject: the store was filled by a {store.identity.get('model')} model; "
                         f"this is {identity.get('model')}. Store and edit with the same model.")
    if latent_shape is not None and tuple(latent_shape) != store.latent_shape:
        raise ValueError(f"Retrace Attention Inject: the store was filled for a latent of shape "
                         f"{list(store.latent_shape)}; this run's is {list(latent_shape)}. Edit the same image at the "
                         f"same resolution.")
    if sigmas is not None:
        ours = sigmas.detach().to("cpu", torch.float64)
        theirs = store.sigmas
        same = len(ours) == len(theirs) and bool(
            ((ours - theirs).abs() <= SIGMA_MATCH * theirs.abs().clamp_min(1e-6)).all())
        if not same:
            raise ValueError(f"Retrace Attention Inject: the edit samples {len(ours) - 1} steps from sigma "
                             f"{float(ours[0]):.4g}; the store's source pass sampled {store.steps} steps from "
                             f"{float(theirs[0]):.4g}. Sample both passes on the same schedule (the same inversion).")
