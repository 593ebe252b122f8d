"""`pack`, `unpack` and `verify`: self-contained bundles for machines that do not build."""

from __future__ import annotations

from pathlib import Path

import click

from koala_trt.commands.common import check_out_dir, check_out_file, json_option, log, print_json, progress_option
from koala_core.errors import KoalaError


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def _requirements_line(req: dict) -> str:
    comps = ", ".join(f"{c} {v['precision']}" + (" (engine)" if v.get("backend") == "tensorrt" else "")
                      for c, v in (req.get("components") or {}).items())
    if req.get("backend") == "tensorrt" and "engine_set" in req:
        from shipping.bundle import set_cards

        cards = set_cards(req, "bundle.json").cards.values()
        return f"an engine set of {len(cards)} card(s): {', '.join(c.describe() for c in cards)}; {comps}"
    if req.get("backend") == "tensorrt":
        from engines.compat import describe
        from shipping.bundle import requirements_compat

        return f"{describe(requirements_compat(req, 'bundle.json'))}; {comps}"
    return f"ONNX Runtime (opset {req.get('onnx_opset')}; CPU or GPU); {comps}"


@click.command("pack")
@click.option("--artifacts", "-a", required=True, type=click.Path(path_type=Path), help="Artifacts folder (from export, or an unpacked bundle).")
@click.option("--engines", "-e", type=click.Path(path_type=Path), help="Engines folder from `koala-trt build` to include under engines/.")
@click.option("--out", "-o", required=True, type=click.Path(path_type=Path), help="Archive to write (BUNDLE.tar.gz).")
@click.option("--card", "cards", metavar="CARDS",
              help="With an engine set as --engines: pack only these cards' engines (comma-separated, e.g. rtx4090).")
@click.option("--graphs/--no-graphs", default=True, show_default=True,
              help="With --engines: keep (default) or leave out the ONNX graphs of components that have an engine.")
@click.option("--level", default=1, show_default=True, type=click.IntRange(0, 9),
              help="gzip level; weights barely compress (about 7%): 0 stores them and packed ~8x faster here.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@progress_option()
@json_option()
def pack_cmd(artifacts: Path, engines: Path | None, cards: str | None, out: Path, graphs: bool, level: int, force: bool,
             as_json: bool) -> None:
    """Pack an artifacts folder (and engines: one folder, or an engine set) into one archive with every file's
    sha256 and the runtime requirements."""
    from shipping.bundle import pack

    check_out_file(out)
    names = None if cards is None else [c.strip() for c in cards.split(",")]
    r = pack(artifacts, out, engines, graphs=graphs, level=level, force=force, log=log, cards=names)
    if as_json:
        print_json({"bundle": str(r.path), "archive_bytes": r.archive_bytes, "archive_sha256": r.archive_sha256,
                    "files": r.files, "data_bytes": r.data_bytes, "requirements": r.requirements, "omitted": r.omitted})
        return
    click.echo(f"bundle {r.path}: {r.files} files, {_size(r.data_bytes)} -> {_size(r.archive_bytes)}")
    click.echo(f"requires {_requirements_line(r.requirements)}")
    if r.omitted:
        click.echo(f"left out {len(r.omitted)} graph files (--no-graphs): this bundle runs with TensorRT only")
    click.echo(f"sha256 {r.archive_sha256}  {r.path.name}")


@click.command("unpack")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--out", "-o", required=True, type=click.Path(path_type=Path), help="Folder to create (an artifacts folder usable as --artifacts).")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@progress_option()
@json_option()
def unpack_cmd(bundle: Path, out: Path, force: bool, as_json: bool) -> None:
    """Unpack a bundle, checking every file's sha256 as it is written; refuses unsafe or partial archives."""
    from shipping.bundle import unpack

    check_out_dir(out, force)
    r = unpack(bundle, out, force=force, log=log)
    if as_json:
        print_json({**r.to_json(), "out": str(out)})
        return
    click.echo(f"unpacked {r.files} files ({_size(r.data_bytes)}) to {out}, every sha256 checked")
    click.echo(f"requires {_requirements_line(r.requirements)}")
    if r.requirements.get("backend") == "tensorrt":
        click.echo(f"run `koala-trt verify {out}` on the target machine to check its GPU and TensorRT")


@click.command("verify")
@click.argument("bundle", metavar="BUNDLE_OR_DIR", type=click.Path(path_type=Path))
@click.option("--no-device-check", is_flag=True, help="Check integrity only, not this machine's GPU and TensorRT.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON (also on failure).")
def verify_cmd(bundle: Path, no_device_check: bool, as_json: bool) -> None:
    """Check a bundle (archive or unpacked folder): hashes, completeness, and for engines this machine's GPU and TensorRT."""
    from shipping.bundle import verify

    r = verify(bundle, device_check=not no_device_check, log=log)
    for w in r.warnings:
        log(f"warning: {w}")
    if as_json:
        print_json(r.to_json())
    if not r.ok:
        raise KoalaError(r.problem if str(r.problem).startswith(str(bundle)) else f"{bundle}: {r.problem}")
    if as_json:
        return
    click.echo(f"OK {bundle}: {r.files} files ({_size(r.data_bytes)}), every sha256 matches, nothing missing or extra")
    click.echo(f"requires {_requirements_line(r.requirements)}")
    for a in r.loras.get("artifacts", []):
        click.echo(f"LoRA {a['file']} x{a['scale']:g} (sha256 {a['sha256'][:12]}) in the weights of "
                   f"{', '.join(c for c, n in a.get('layers', {}).items() if n)}")
    if r.requirements.get("backend") == "tensorrt":
        if r.device_checked:
            gpus = ", ".join(f"{g['name']} ({g['compute_capability']})" for g in (r.device or {}).get("gpus", []))
            lib = ((r.requirements.get("engines") or {}).get("library") or {}).get("name", "tensorrt")
            if r.engines_folder:
                lib = next(iter(r.requirements["engine_set"]["cards"].values()))["library"]["name"]
            version = (r.device or {}).get("tensorrt_rtx_version" if lib == "tensorrt-rtx" else "tensorrt_version")
            used = f": would use {Path(bundle) / r.engines_folder}" if r.engines_folder else ": matches"
            click.echo(f"this machine: {gpus}, {'TensorRT-RTX' if lib == 'tensorrt-rtx' else 'TensorRT'} {version}{used}")
        else:
            click.echo("device check skipped (--no-device-check)")
