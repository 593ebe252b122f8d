"""The CLI's contract: fast help, one-line errors, exit codes (2 usage, 1 failure)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import run_cli


def test_help_is_instant_and_imports_no_torch() -> None:
    code = ("import sys; from koala_trt.cli import main; rc = main(['--help']); "
            "bad = [m for m in ('torch', 'diffusers', 'transformers', 'onnxruntime') if m in sys.modules]; "
            "print('heavy:', bad); sys.exit(rc)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0
    assert "heavy: []" in r.stdout
    assert "export" in r.stdout and "inspect" in r.stdout


def assert_one_line_error(code: int, err: str, expected_code: int, *needles: str) -> None:
    assert code == expected_code, err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert lines and lines[-1].startswith("Error:"), err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[-1], lines[-1]


def test_unknown_preset(tmp_path: Path) -> None:
    code, _, err = run_cli("export", "--model", "random:nope", "--out", tmp_path / "a")
    assert_one_line_error(code, err, 2, "unknown preset", "random:tiny")


def test_missing_path(tmp_path: Path) -> None:
    code, _, err = run_cli("inspect", str(tmp_path / "no" / "such" / "model"))
    assert_one_line_error(code, err, 2, "not found")


def test_folder_that_is_no_diffusers_model(tmp_path: Path) -> None:
    (tmp_path / "junk").mkdir()
    code, _, err = run_cli("export", "--model", tmp_path / "junk", "--out", tmp_path / "a")
    assert_one_line_error(code, err, 2, "model_index.json")


def test_unknown_component(tmp_path: Path) -> None:
    code, _, err = run_cli("export", "--model", "random:tiny", "--out", tmp_path / "a", "--components", "unet,vea")
    assert_one_line_error(code, err, 2, "unknown component 'vea'")


def _cli_in_read_only_bind(folder: Path, *args: str) -> tuple[int, str]:
    """Run `koala-trt ARGS` as root with `folder` bind-mounted read-only onto itself, in a mount
    namespace of its own (nothing outside the child sees the mount). Root writes through any
    chmod, but not through a read-only mount: os.access(W_OK) reports EROFS, the refusal under test."""
    script = "import sys; from koala_trt.cli import main; sys.exit(main(sys.argv[1:]))"
    cmd = 'mount --bind -o ro "$0" "$0" || exit 97; exec "$1" -c "$2" "${@:3}"'
    r = subprocess.run(["unshare", "--mount", "--propagation", "private", "bash", "-c", cmd, str(folder), sys.executable, script,
                        *map(str, args)], capture_output=True, text=True, timeout=120)
    if r.returncode == 97 or r.stderr.startswith("unshare:"):  # the mount namespace could not be set up
        pytest.fail("as root this test needs a private mount namespace (unshare --mount and CAP_SYS_ADMIN) to make a folder "
                    f"root cannot write; run it as a regular user or give it CAP_SYS_ADMIN: {r.stderr.strip()[-200:]}")
    return r.returncode, r.stderr


def test_unwritable_output_folder(tmp_path: Path) -> None:
    """An existing folder this user cannot write: refused before any model work. A regular user gets a
    chmod 0500 folder; root (who writes through chmod) gets the same folder as a read-only bind mount."""
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    args = ("export", "--model", "random:tiny", "--out", ro / "a", "-c", "text_encoder")
    if os.geteuid() == 0:
        code, err = _cli_in_read_only_bind(ro, *args)
    else:
        code, _, err = run_cli(*args)
    assert_one_line_error(code, err, 2, f"cannot write {ro / 'a'}: {ro} is not a writable folder")
    assert list(ro.iterdir()) == []


def test_unwritable_output(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")  # a file where a folder should be: unwritable for root too
    code, _, err = run_cli("export", "--model", "random:tiny", "--out", blocker / "a", "-c", "text_encoder")
    assert_one_line_error(code, err, 2, "not a writable folder")


def test_existing_output_needs_force(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    code, _, err = run_cli("export", "--model", "random:tiny", "--out", tmp_path / "a", "-c", "text_encoder")
    assert_one_line_error(code, err, 2, "--force")


def test_bad_size(tmp_path: Path) -> None:
    code, _, err = run_cli("export", "--model", "random:tiny", "--out", tmp_path / "a", "--height", "250")
    assert_one_line_error(code, err, 2, "multiples of")


def test_hub_id_offline_names_the_local_folder_alternative(tmp_path: Path) -> None:
    code, _, err = run_cli("inspect", "etri-vilab/koala-700m")
    assert_one_line_error(code, err, 1, "local diffusers folder", "--model")


def test_debug_shows_traceback(tmp_path: Path) -> None:
    code, _, err = run_cli("--debug", "inspect", str(tmp_path / "missing"))
    assert code == 2
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("Error:")


def test_lower_layers_never_import_the_cli_package() -> None:
    """Data flows one way: exporter/, calibration/, engines/, shipping/ and koala_core/ never import
    koala_trt (the CLI); koala_core imports none of the other packages."""
    import ast

    root = Path(__file__).parents[1]

    def imported(path: Path) -> set[str]:
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.split(".")[0])
        return names

    bad = [str(p.relative_to(root)) for d in ("exporter", "calibration", "engines", "shipping", "koala_core")
           for p in (root / d).rglob("*.py") if "koala_trt" in imported(p)]
    assert bad == []
    upward = {"koala_trt", "exporter", "calibration", "engines", "shipping"}
    core = [str(p.relative_to(root)) for p in (root / "koala_core").rglob("*.py") if imported(p) & upward]
    assert core == []
