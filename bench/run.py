"""`make bench`: Retrace's numbers, measured side by side in one run on this machine.

Writes bench/out/latest.json (a flat object, metric -> number) and prints a markdown table.
Times are CPU wall-clock ratios; absolute times are only meaningful from a GPU run.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from bench.timing import best_time  # noqa: E402
from paths import ensure_host, ensure_package  # noqa: E402
from scripts.images import image_batch  # noqa: E402

log = logging.getLogger("retrace.bench")
DESCRIPTIONS = {
    "oracle_euler_order": "Euler/DDIM one-way convergence order (bimodal oracle; expect ~1)",
    "oracle_solver2_order": "midpoint (RF-Solver style) one-way convergence order (expect ~2)",
    "oracle_euler_roundtrip_order": "Euler invert+reconstruct round-trip order",
    "oracle_solver2_roundtrip_order": "midpoint invert+reconstruct round-trip order",
    "invert_overhead_ratio": "50-step host-path inversion / 50 bare UNet calls, tiny SD1.5 (goal <= 1.10)",
    "sd15_roundtrip_rel_err": "SD1.5 tiny, 50 steps, guidance 1, relative L2 in latent space",
    "sd15_roundtrip_rel_err_midpoint": "same, midpoint solver (25 steps, same model-call count)",
    "flux_roundtrip_rel_err": "Flux tiny, 50 steps, guidance 1, relative L2 in latent space",
    "flux_roundtrip_rel_err_midpoint": "same, midpoint solver (25 steps, same model-call count)",
    "vae_refine_psnr_before_db": "decode(encode(image)) PSNR, random-weight SD VAE, 64x64 (32x32 quick)",
    "vae_refine_psnr_gain_db": "PSNR gain of 20 decoder-refinement steps",
    "ddim_rel_err_cfg75": "tiny SD1.5 checkpoint, 50 steps: invert at guidance 1, reconstruct at 7.5 (relative L2)",
    "nti_rel_err_cfg75": "null-text, defaults (start from the source prompt, 1 Gauss-Newton iteration per step)",
    "nti_cost_ratio": "null-text (inversion + optimisation, which yields the reconstruction) / DDIM invert + "
                      "reconstruct (goal <= 3 with nti_rel_err within 10% of nti_full_rel_err)",
    "nti_full_rel_err_cfg75": "null-text, the paper's recipe without early stop (from the negative, Adam, 10 inner steps)",
    "nti_full_cost_ratio": "its cost, as nti_cost_ratio",
    "npi_rel_err_cfg75": "negative-prompt inversion at 7.5",
    "direct_rel_err_cfg75": "direct inversion at 7.5 (source branch)",
    "nti_peak_mem_mb": "peak resident memory added during the default null-text optimisation (CPU RSS)",
    "attn_store_overhead_ratio": "tiny SD1.5 checkpoint, 50 steps at 7.5: store pass (every layer's cross and self "
                                 "queries/keys, float16) / plain pass (goal <= 1.15)",
    "attn_inject_overhead_ratio": "edit pass with P2P defaults (replace 0.8, self replace 0.4, local blend) / plain "
                                  "pass (goal <= 1.15)",
    "attn_store_mb_per_step": "tiny SD1.5 checkpoint, stored per step at default layers (its one level has no "
                              "self-attention below the finest)",
    "attn_store_mb_per_step_all": "the same, every layer",
    "attn_store_mb_per_step_sd15_512": "full-size SD1.5 at 512 px, default layers, from its layer shapes (goal <= 64)",
}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def oracle_metrics() -> dict[str, float]:
    from oracle_cases import oneway_errors, order, roundtrip_errors

    return {
        "oracle_euler_order": order(oneway_errors("ve", "euler")),
        "oracle_solver2_order": order(oneway_errors("ve", "midpoint")),
        "oracle_euler_roundtrip_order": order(roundtrip_errors("ve", "euler")),
        "oracle_solver2_roundtrip_order": order(roundtrip_errors("ve", "midpoint")),
    }


def roundtrip(model, latent: dict, cond: list, steps: int, solver: str) -> float:
    from retrace.nodes.inversion import invert, sample_inversion
    from retrace.nodes.samplers import ode_sampler

    _, inv = invert(model, latent, cond, None, steps, 1.0, "normal", ode_sampler(solver))
    out = sample_inversion(model, inv, cond, None, 1.0)
    return rel_err(out["samples"], latent["samples"])


def host_metrics(quick: bool) -> dict[str, float]:
    ensure_host()
    import comfy.sd
    import comfy.utils
    import tiny_checkpoint
    import tiny_models

    from retrace.nodes.inversion import invert
    from retrace.nodes.vae_encode import encode_for_inversion

    comfy.utils.PROGRESS_BAR_ENABLED = False
    metrics: dict[str, float] = {}
    ckpt = tiny_checkpoint.write_checkpoint()
    model, _, vae, _ = comfy.sd.load_checkpoint_guess_config(str(ckpt), output_vae=True, output_clip=False)
    steps = 50
    # A 256x256 image's latent: large enough that a UNet call costs what it costs, small enough for a CPU.
    size = 16 if quick else 32
    latent = tiny_models.latent("sd15", height=size, width=size)  # an encoded photo's scale, not unit noise
    cond = tiny_models.conditioning("sd15")

    base = model.model
    x = base.process_latent_in(latent["samples"])
    sigmas = torch.linspace(0.03, 14.6, steps)
    context = cond[0][0]

    def bare() -> None:
        with torch.inference_mode():
            for s in sigmas:
                base.apply_model(x, s.reshape(1), c_crossattn=context)

    def host_path() -> None:
        with torch.inference_mode():
            invert(model, latent, cond, None, steps, 1.0, "normal")

    repeats = 1 if quick else 2
    host_path()  # warm-up: first use loads the model through the host's model manager
    t_bare, t_host = [], []
    for _ in range(repeats):  # interleaved, so both see the same machine state
        t_bare.append(best_time(bare, 1))
        t_host.append(best_time(host_path, 1))
    metrics["invert_overhead_ratio"] = min(t_host) / min(t_bare)
    log.info("bare %.2fs, host path %.2fs", min(t_bare), min(t_host))

    with torch.inference_mode():
        metrics["sd15_roundtrip_rel_err"] = roundtrip(model, latent, cond, steps, "euler")
        metrics["sd15_roundtrip_rel_err_midpoint"] = roundtrip(model, latent, cond, steps // 2, "midpoint")
        flux = tiny_models.build_model("flux")
        flux_latent = tiny_models.latent("flux", height=16, width=16)
        flux_cond = tiny_models.conditioning("flux")
        metrics["flux_roundtrip_rel_err"] = roundtrip(flux, flux_latent, flux_cond, steps, "euler")
        metrics["flux_roundtrip_rel_err_midpoint"] = roundtrip(flux, flux_latent, flux_cond, steps // 2, "midpoint")

        image = image_batch(32 if quick else 64)
        _, before, after = encode_for_inversion(vae, image, 20, 0.05)
    metrics["vae_refine_psnr_before_db"] = before
    metrics["vae_refine_psnr_gain_db"] = after - before
    return metrics


def peak_rss_growth_mb(fn: Callable[[], object]) -> float:
    """Peak resident memory added while ``fn`` runs (Linux: reset the high-water mark, read it back)."""
    def status(key: str) -> float:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key):
                return float(line.split()[1]) / 1024
        return float("nan")

    Path("/proc/self/clear_refs").write_text("5")
    before = status("VmRSS:")
    fn()
    return status("VmHWM:") - before


def null_text_metrics(quick: bool) -> dict[str, float]:
    """Guidance-7.5 reconstruction by DDIM, null-text (default, paper, paper without early stop), negative-prompt
    and direct inversion, side by side on the tiny SD1.5 checkpoint (GUIDE section 5 for real-model numbers)."""
    import comfy.sd
    import tiny_checkpoint
    import tiny_models

    from retrace.inversion.null_text import NullTextSettings
    from retrace.nodes.inversion import invert, sample_inversion, sample_with_guider
    from retrace.nodes.inversion_guiders import DirectInversionGuider
    from retrace.nodes._host import make_guider
    from retrace.nodes.null_text import optimize_null_text

    model, _, _, _ = comfy.sd.load_checkpoint_guess_config(str(tiny_checkpoint.write_checkpoint()), output_vae=False,
                                                           output_clip=False)
    size, steps = (16, 50) if quick else (32, 50)
    latent = tiny_models.latent("sd15", height=size, width=size)
    source, negative = tiny_models.conditioning("sd15", seed=0), tiny_models.conditioning("sd15", seed=1)
    x0 = model.model.process_latent_in(latent["samples"])

    def err(out: dict) -> float:
        return rel_err(model.model.process_latent_in(out["samples"]), x0)

    metrics: dict[str, float] = {}
    with torch.inference_mode():
        invert(model, latent, source, None, 2, 1.0, "normal")  # warm-up
        start = time.perf_counter()
        _, inv = invert(model, latent, source, None, steps, 1.0, "normal")
        t_invert = time.perf_counter() - start
        start = time.perf_counter()
        ddim = sample_inversion(model, inv, source, negative, 7.5)
        t_reconstruct = time.perf_counter() - start
        baseline = t_invert + t_reconstruct
        metrics["ddim_rel_err_cfg75"] = err(ddim)
        recipes = {"nti": NullTextSettings()}
        if not quick:
            recipes["nti_full"] = NullTextSettings(solver="adam", start="negative", early_stop=0.0,
                                                   early_stop_growth=0.0)
        for name, settings in recipes.items():
            result: list = []
            start = time.perf_counter()
            peak = peak_rss_growth_mb(
                lambda s=settings: result.append(optimize_null_text(model, inv, source, negative, 7.5, s)))
            metrics[f"{name}_cost_ratio"] = (t_invert + time.perf_counter() - start) / baseline
            metrics[f"{name}_rel_err_cfg75"] = err(result[0][1])
            if name == "nti":
                metrics["nti_peak_mem_mb"] = peak
            log.info("%s: error %.4g, cost %.2fx", name, metrics[f"{name}_rel_err_cfg75"], metrics[f"{name}_cost_ratio"])
        metrics["npi_rel_err_cfg75"] = err(sample_with_guider(model, inv, make_guider(model, source, source, 7.5)))
        direct = DirectInversionGuider(model, inv, source, source, negative, 7.5)
        metrics["direct_rel_err_cfg75"] = err(sample_with_guider(model, inv, direct))
    return metrics


# Full-size SD1.5's UNet config in the host's layout (the checkpoint's detected config).
SD15_UNET = {"use_checkpoint": False, "image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 320,
             "num_res_blocks": [2, 2, 2, 2], "channel_mult": [1, 2, 4, 4], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
             "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], "transformer_depth_middle": 1,
             "use_spatial_transformer": True, "context_dim": 768, "num_heads": 8, "num_head_channels": -1,
             "legacy": False, "use_linear_in_transformer": False, "adm_in_channels": None,
             "use_temporal_attention": False, "use_temporal_resblock": False}


def attention_metrics(quick: bool) -> dict[str, float]:
    """Store and inject passes against a plain pass, side by side, on the tiny SD1.5 checkpoint; store size per
    step there and, from its layer shapes, for full-size SD1.5 at 512 px."""
    import comfy.ops
    import comfy.samplers
    import comfy.sd
    import tiny_checkpoint
    import tiny_models
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    from retrace.editing.attention_store import AttentionStore, StoreSettings, bytes_per_step
    from retrace.editing.prompt_to_prompt import InjectSettings, TokenEdit
    from retrace.nodes._attention_hooks import AttentionInjector, AttentionRecorder, identity_of, layer_specs

    model, _, _, _ = comfy.sd.load_checkpoint_guess_config(str(tiny_checkpoint.write_checkpoint()), output_vae=False,
                                                           output_clip=False)
    size, steps, repeats = (16, 10, 1) if quick else (32, 50, 3)
    x0 = model.model.process_latent_in(tiny_models.latent("sd15", height=size, width=size)["samples"])
    source, negative = tiny_models.conditioning("sd15", seed=0), tiny_models.conditioning("sd15", seed=1)
    target = [[source[0][0].clone(), dict(source[0][1])]]
    target[0][0][:, 4:6] = tiny_models.conditioning("sd15", seed=2)[0][0][:, 4:6]  # a word swap
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", steps).float()

    def sample(patched, positive: list) -> torch.Tensor:
        guider = comfy.samplers.CFGGuider(patched)
        guider.set_conds(positive, negative)
        guider.set_cfg(7.5)
        with torch.inference_mode():
            return guider.sample(noise, torch.zeros_like(x0), comfy.samplers.sampler_object("euler"), sigmas, seed=0,
                                 disable_pbar=True)

    identity = identity_of(model)
    stores = {name: AttentionStore(StoreSettings(layers=name)) for name in ("auto", "all")}
    recorders = {name: AttentionRecorder(store, identity, None).install(model.clone()) for name, store in stores.items()}
    settings = InjectSettings(edit=TokenEdit(mapper=torch.eye(77)), blend_target=(4, 5), blend_source=(4, 5))
    injector = AttentionInjector(stores["all"], settings, identity, None).install(model.clone())
    sample(model, source)  # warm-up
    times = {"plain": [], "store": [], "inject": []}
    for _ in range(repeats):  # interleaved, so drifts of the machine fall on all three alike
        for name, fn in (("plain", lambda: sample(model, source)), ("store", lambda: sample(recorders["all"], source)),
                         ("inject", lambda: sample(injector, target))):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    sample(recorders["auto"], source)
    plain = min(times["plain"])
    metrics = {"attn_store_overhead_ratio": min(times["store"]) / plain,
               "attn_inject_overhead_ratio": min(times["inject"]) / plain}
    for name, key in (("auto", "attn_store_mb_per_step"), ("all", "attn_store_mb_per_step_all")):
        metrics[key] = stores[name].stored_bytes() / steps / 2**20
    with torch.device("meta"):
        unet = UNetModel(**SD15_UNET, device="meta", operations=comfy.ops.disable_weight_init)
    metrics["attn_store_mb_per_step_sd15_512"] = bytes_per_step(layer_specs(unet, (1, 4, 64, 64), 77),
                                                                StoreSettings()) / 2**20
    log.info("attention: %s", {k: round(v, 4) for k, v in metrics.items()})
    return metrics


def gan_group(quick: bool) -> dict[str, float]:
    ensure_package()
    from bench.gan import gan_metrics

    return gan_metrics(quick)


def directions_group(quick: bool) -> dict[str, float]:
    ensure_package()
    from bench.gan import direction_metrics

    return direction_metrics(quick)


def quality_group(quick: bool) -> dict[str, float]:
    ensure_package()
    from bench.quality import measure

    return measure(6 if quick else 24)


GROUPS: dict[str, Callable[[bool], dict[str, float]]] = {
    "oracle": lambda quick: oracle_metrics(), "host": host_metrics, "null_text": null_text_metrics,
    "attention": attention_metrics, "gan": gan_group,
    "directions": directions_group, "quality": quality_group,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller latents and one repeat (under 3 minutes)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "out"))
    parser.add_argument("--only", choices=sorted(GROUPS), action="append",
                        help="run only these groups (repeatable); the default runs all")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(2)
    ensure_host()
    started = time.perf_counter()
    metrics: dict[str, float] = {}
    for name in args.only or GROUPS:
        group_started = time.perf_counter()
        metrics.update(GROUPS[name](args.quick))
        log.info("%s metrics in %.0fs", name, time.perf_counter() - group_started)
    metrics["bench_seconds"] = time.perf_counter() - started
    metrics["quick"] = 1.0 if args.quick else 0.0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "latest.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    lines = ["| metric | value | what |", "|---|---|---|"]
    from bench.gan import DESCRIPTIONS as GAN_DESCRIPTIONS
    from bench.quality import DESCRIPTIONS as QUALITY_DESCRIPTIONS

    described = {**DESCRIPTIONS, **GAN_DESCRIPTIONS, **QUALITY_DESCRIPTIONS}
    lines += [f"| {k} | {v:.4g} | {described.get(k, '')} |" for k, v in metrics.items()]
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
