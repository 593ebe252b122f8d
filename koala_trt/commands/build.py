from __future__ import annotations

from pathlib import Path

import click

from exporter.tolerances import PRECISIONS

from engines.libraries import LIBRARIES
from koala_trt.commands.aid_options import aid_options, apply_aids
from koala_trt.commands.common import POSITIVE, check_out_dir, components_option, json_option, log, print_json, progress_option, table

GIB = 1 << 30


def _ranges(profile_shapes: dict) -> str:
    out = []
    for name, (lo, opt, hi) in profile_shapes.items():
        dims = "x".join(str(a) if a == c else f"{a}..{c}" for a, c in zip(lo, hi))
        out.append(f"{name}[{dims}]")
    return " ".join(out)


def print_plan(plan: object, dry_run: bool) -> None:
    p = plan  # BuildPlan
    mem = p.memory  # type: ignore[attr-defined]
    rows = []
    for name, c in p.components.items():  # type: ignore[attr-defined]
        m = mem.components.get(name) if mem else None
        est = "?" if m is None else (f"{m.total_bytes / GIB:.2f}" if m.activations_bytes is not None
                                     else f">={m.total_bytes / GIB:.2f}")
        rows.append([name, c.precision, str(c.onnx_path), _ranges(c.profile_shapes), est, c.engine])
    prof = p.profile  # type: ignore[attr-defined]
    lib = p.library  # type: ignore[attr-defined]
    targets = ", ".join("sm_" + t.replace(".", "") for t in p.targets)  # type: ignore[attr-defined]
    click.echo(f"{'build plan (dry run: nothing built, TensorRT not imported)' if dry_run else 'build plan'} for "
               f"{prof.name} ({targets}, {lib.name} {p.trt_version or 'not installed'}"  # type: ignore[attr-defined]
               f"{', no GPU needed' if lib.builds_without_gpu else ''}) -> {p.out}")  # type: ignore[attr-defined]
    click.echo(table(rows, ["component", "precision", "onnx", "input shapes (min..max)", "est. GiB", "engine"]))
    f = p.flags  # type: ignore[attr-defined]
    na = f.get("not_applicable", {})
    click.echo(f"flags: strongly typed; builder optimization level {f['builder_optimization_level']}; workspace "
               f"{f['workspace_bytes'] / GIB:g} GiB; hardware compatibility "
               f"{'not applicable' if 'hardware_compatibility' in na else f['hardware_compatibility']}; version "
               f"compatible {str(f['version_compatible']).lower()}; refit {f['refit']}; timing cache "
               f"{'not applicable' if 'timing_cache' in na else f['timing_cache'] or 'off'}; TF32 off")
    for note in p.notes():  # type: ignore[attr-defined]
        click.echo(f"note: {note}")
    for name, b in p.streaming_budgets().items():  # type: ignore[attr-defined]
        budget = "automatic (TensorRT's)" if b["budget_bytes"] is None else f"{b['budget_bytes'] / GIB:.2f} GiB"
        click.echo(f"weight streaming: {name} budget {budget} (from the {b['from']})")
    if mem:
        v = mem.verdict()
        note = "" if v["complete"] else " (weights only: activations not estimated)"
        click.echo(f"memory ({v['mode']}): peak {v['peak_bytes'] / GIB:.2f} GiB of {v['usable_bytes'] / GIB:.2f} GiB usable: "
                   f"{'fits' if v['fits'] else 'DOES NOT FIT'}, margin {v['margin_gib']:+.2f} GiB{note}; engine build peak "
                   f"{mem.build_peak / GIB:.2f} GiB")


@click.command("build")
@click.option("--onnx", "onnx_dirs", required=True, multiple=True, type=click.Path(path_type=Path),
              help="Artifacts folder (repeat to combine precisions, e.g. an fp16 and an int8 folder).")
@click.option("--profile", "-p", "profile_ref", required=True,
              help="GPU profile name or TOML path; several cards (rtx2080ti,rtx3060ti,rtx4090) or all-rtx: an engine set.")
@click.option("--out", "-o", required=True, type=click.Path(path_type=Path),
              help="Engines folder to write (an engine set: one folder per card and engines-index.json).")
@components_option("default: the profile's pipeline (text_encoder,text_encoder_2,unet,vae_decoder)")
@click.option("--library", type=click.Choice(["tensorrt", "tensorrt-rtx"]),
              help="TensorRT library instead of the profile's (where both can serve: L4, A10 with tensorrt-rtx).")
@click.option("--precision", type=click.Choice(list(PRECISIONS)),
              help="Precision of the text encoders and U-Net instead of the profile's (the VAE keeps its policy; "
                   "fp8 needs sm_89+, int8-wo sm_80+).")
@click.option("--batch", type=POSITIVE, help="Images per call (static), instead of the profile's range.")
@click.option("--height", type=POSITIVE, help="Image height in px (static), instead of the profile's range.")
@click.option("--width", type=POSITIVE, help="Image width in px (static), instead of the profile's range.")
@aid_options
@click.option("--auto", is_flag=True, help="Take the memory aids `koala-trt plan` chooses for the card (needs the estimate).")
@click.option("--dry-run", is_flag=True, help="Print the whole build plan; build nothing, import no TensorRT.")
@click.option("--no-estimate", is_flag=True, help="Skip the memory estimate (it traces the model on the meta device).")
@click.option("--force", is_flag=True, help="Replace OUT if it exists (an engine set: rebuild every card listed).")
@click.option("--jobs", "-j", type=click.IntRange(min=1), default=1, show_default=True,
              help="Engine set: cards built at once (each in its own process).")
@click.option("--verbose", is_flag=True, help="Show TensorRT's and Polygraphy's build log.")
@progress_option()
@json_option("the build plan and the engines built")
def build_cmd(onnx_dirs: tuple[Path, ...], profile_ref: str, out: Path, components: tuple[str, ...],
              library: str | None, precision: str | None, batch: int | None, height: int | None, width: int | None,
              vae_tile: int | None, residency: str | None, weight_streaming: bool, weight_streaming_budget: float | None,
              auto: bool, dry_run: bool, no_estimate: bool, force: bool, jobs: int, verbose: bool, as_json: bool) -> None:
    """Build one strongly typed TensorRT engine per component for a GPU profile, from the artifacts
    folder(s) holding the precision the profile asks for; --dry-run prints the plan only.
    Profiles of GeForce cards build with TensorRT-RTX, here, without a GPU. Several cards
    (--profile rtx3060ti,rtx4090 or all-rtx) build an engine set: OUT/<card>/ each, and OUT/engines-index.json."""
    from engines.buildplan import auto_plan, make_build_plan
    from engines.engine_set import is_engine_set, is_set
    from koala_core.errors import UsageError
    from engines.profile import load_profile
    from exporter.specs import parse_components

    if auto and no_estimate:
        raise UsageError("--auto takes the memory plan's choice: drop --no-estimate")
    if is_set(profile_ref) or is_engine_set(out):  # several cards, or one card into an existing set
        from koala_trt.commands.build_set import build_set

        options = {"onnx": [str(Path(d).resolve()) for d in onnx_dirs], "components": list(components) or None,
                   "library": library, "precision": precision, "batch": batch, "height": height, "width": width,
                   "vae_tile": vae_tile, "residency": residency, "weight_streaming": weight_streaming,
                   "weight_streaming_budget": weight_streaming_budget, "auto": auto, "no_estimate": no_estimate,
                   "verbose": verbose}
        return build_set(profile_ref, onnx_dirs, out, options, jobs, dry_run, force, as_json, log)
    if jobs != 1:
        raise UsageError("--jobs is for an engine set (--profile with several cards, or all-rtx)")

    profile = load_profile(profile_ref)
    if library:
        profile = profile.with_library(library)
    profile = profile.with_overrides(batch, height, width, precision)
    profile = apply_aids(profile, vae_tile, residency, weight_streaming, weight_streaming_budget)
    comps = parse_components(components, default=tuple(profile.components())) if components else None
    args = {"onnx": [str(Path(d).resolve()) for d in onnx_dirs],
            "profile": profile_ref if not Path(profile_ref).exists() else str(Path(profile_ref).resolve()),
            "components": comps, "library": library, "precision": precision, "batch": batch, "height": height,
            "width": width, "vae_tile": vae_tile, "residency": residency, "weight_streaming": weight_streaming or None,
            "weight_streaming_budget": weight_streaming_budget}
    lib = LIBRARIES[profile.build.library]
    if not dry_run:
        check_out_dir(out, force)

    def make(version: str | None) -> object:
        if auto:
            plan, choice = auto_plan(list(onnx_dirs), profile, out, comps, version, args)
            log(f"--auto: {choice.summary()}")
            return plan
        return make_build_plan(list(onnx_dirs), profile, out, comps, version, not no_estimate, args)

    if dry_run:
        plan = make(lib.installed_version())
        if as_json:
            print_json({"dry_run": True, **plan.to_json()})
        else:
            print_plan(plan, dry_run=True)
        return
    from engines.build import check_requirements, run_build

    check_requirements(lib)
    from engines import trt

    trt.use_library(lib.name)
    plan = make(trt.version())
    if not as_json:
        print_plan(plan, dry_run=False)
    data = run_build(plan, force=force, verbose=verbose, log=log)
    if as_json:
        print_json({"dry_run": False, "engines": str(out),
                    **{k: data[k] for k in ("library", "targets", "build_host", "flags", "notes", "engines", "build")}})
        return
    targets = ",".join("sm" + t.replace(".", "") for t in data["targets"]["compute_capabilities"])
    rows = [[e["file"], f"{e['bytes'] / 2**20:,.1f}", e["precision"], targets,
             "?" if e.get("weights_bytes") is None else f"{e['weights_bytes'] / 2**20:,.1f}",
             f"{e['device_memory_bytes'] / 2**20:,.1f}", f"{e['build_seconds']:.1f}"] for e in data["engines"].values()]
    click.echo(table(rows, ["file", "MiB", "precision", "targets", "weights MiB", "activations MiB", "build s"]))
    host = data["build_host"]
    click.echo(f"engines: {out} ({data['library']['name']} {data['library']['version']}, built on "
               f"{host['gpu']['name'] if host['gpu'] else 'a CPU without a GPU (' + host['cpu'] + ')'}, "
               f"{data['build']['seconds']:.1f} s)")
    for name, e in data["engines"].items():
        if e.get("loras"):
            click.echo(f"LoRA in {name}: " + ", ".join(f"{a['file']} x{a['scale']:g} (sha256 {a['sha256'][:12]}, "
                                                        f"{a['layers'].get(name, 0)} layers)" for a in e["loras"]))
