"""`koala-trt serve`: a real Triton Inference Server (the `tritonserver` binary and Python backend that
the nvidia-pytriton wheel ships) over a Python-flavour model repository written by shipping/triton.py.

PyTriton's Python side is not used, but its Python-backend stub is, and that stub was built for
numpy 1: under numpy 2 every tensor it hands the model reads with stride 0 (a BYTES prompt "a koala"
arrives as eleven 0x07 bytes and fails to decode). So the models run in a serving environment of their
own with numpy<2 (`make serve-venv`: .venv-serve, the torch-free runtime core with numpy 1.26), chosen
with --python-env / KOALA_TRT_SERVE_ENV. The stub embeds libpython, so LD_LIBRARY_PATH starts with the
interpreter's own lib folder (else it loads the system's libpython against another standard library)
and PATH with the environment's bin folder (so the stub finds that environment's site-packages). The
stub's working directory is the server's: run from the repository root, a source checkout's packages
come first on its sys.path.
"""

from __future__ import annotations

import importlib.util
import ipaddress
import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from koala_core.errors import KoalaError, UsageError
from shipping.triton import write_repository

INSTALL_HINT = "install the serve extra: pip install -c constraints.txt -e '.[serve]' && pip install --no-deps nvidia-pytriton==0.7.0"
READY_TIMEOUT_S = 300.0
# On SIGINT/SIGTERM tritonserver stops taking requests, finishes those in flight and waits for clients
# to close their HTTP connections, for at most this long; then it exits with status 1 ("Exit timeout
# expired"). A client that keeps an idle keep-alive connection open therefore delays the stop by DRAIN_S.
DRAIN_S = 30
SERVE_ENV_VAR = "KOALA_TRT_SERVE_ENV"
DEFAULT_SERVE_ENV = Path(__file__).resolve().parents[1] / ".venv-serve"  # `make serve-venv` in the checkout
PIPELINE_LAYOUT = Path("1") / "pipeline" / "triton.json"

Log = Callable[[str], None]


@dataclass(frozen=True)
class ServerDist:
    """Where the bundled tritonserver and its Python backend live (inside the nvidia-pytriton wheel)."""

    binary: Path
    python_backend: Path  # libtriton_python.so
    stub: Path  # triton_python_backend_stub for this interpreter's version
    libs: Path  # the wheel's bundled shared libraries


@dataclass(frozen=True)
class Ports:
    http: int
    grpc: int
    metrics: int


def find_server() -> ServerDist:
    """The tritonserver of the installed nvidia-pytriton wheel (without importing pytriton)."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise UsageError(f"no tritonserver here (nvidia-pytriton is not installed); {INSTALL_HINT}")
    root = Path(list(spec.submodule_search_locations)[0])
    dist = root / "tritonserver"
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    s = ServerDist(dist / "bin" / "tritonserver", dist / "backends" / "python" / "libtriton_python.so",
                   dist / "python_backend_stubs" / version / "triton_python_backend_stub", root.parent / "nvidia_pytriton.libs")
    for p in (s.binary, s.python_backend):
        if not p.is_file():
            raise UsageError(f"the nvidia-pytriton install lacks {p}; {INSTALL_HINT}")
    if not s.stub.is_file():
        raise UsageError(f"the bundled Python backend has no stub for Python {version} ({s.stub} is missing)")
    return s


def check_address(host: str, ports: Ports) -> None:
    """Host is an IP address; ports are distinct and in 1..65535 (0 is not allowed: the log must say where)."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise UsageError(f"--host must be an IP address such as 127.0.0.1 (got {host!r})") from None
    for name, port in (("--http-port", ports.http), ("--grpc-port", ports.grpc), ("--metrics-port", ports.metrics)):
        if not 1 <= port <= 65535:
            raise UsageError(f"{name} must be between 1 and 65535 (got {port})")
    if len({ports.http, ports.grpc, ports.metrics}) != 3:
        raise UsageError(f"--http-port, --grpc-port and --metrics-port must differ (got {ports.http}, {ports.grpc}, {ports.metrics})")


def check_repository(repo: Path) -> str:
    """A python-flavour repository (`koala-trt triton --flavour python`): its pipeline model's name.
    A production repository is refused: its components need backends the bundled server lacks."""
    if not Path(repo).is_dir():
        raise UsageError(f"--repository {repo} is not a folder")
    layouts = sorted(p for p in Path(repo).glob(f"*/{PIPELINE_LAYOUT.as_posix()}"))
    if len(layouts) != 1:
        raise UsageError(f"--repository {repo} is not a koala-trt model repository (no single */{PIPELINE_LAYOUT.as_posix()}; "
                         "write one with `koala-trt triton --flavour python`)")
    models = json.loads(layouts[0].read_text(encoding="utf-8"))["models"]
    other = sorted({v["platform"] for v in models.values()} - {"python"})
    if other:
        raise UsageError(f"--repository {repo} is the production flavour (components on {', '.join(other)}, which the bundled "
                         "tritonserver lacks): write it with `koala-trt triton --flavour python`")
    return layouts[0].parents[2].name


def backend_dir(dist: ServerDist, work: Path) -> Path:
    """A backend directory holding the Python backend with the stub for this interpreter beside it."""
    python = work / "backends" / "python"
    python.mkdir(parents=True)
    for f in dist.python_backend.parent.iterdir():  # libtriton_python.so and triton_python_backend_utils.py
        if f.is_file():
            os.symlink(f, python / f.name)
    shutil.copy2(dist.stub, python / "triton_python_backend_stub")  # a copy: the stub is found by its folder
    return work / "backends"


def python_env(path: Path | None) -> Path:
    """The serving environment (a venv folder): --python-env, else $KOALA_TRT_SERVE_ENV, else the
    checkout's .venv-serve.
    It must have this interpreter's Python version (the stub is per version) and numpy < 2."""
    chosen = path or (Path(os.environ[SERVE_ENV_VAR]) if os.environ.get(SERVE_ENV_VAR) else Path(DEFAULT_SERVE_ENV))
    python = chosen / "bin" / "python"
    if not python.is_file():
        raise UsageError(f"no serving environment at {chosen} (its bin/python is missing): create it with `make serve-venv` "
                         f"or pass --python-env DIR (a venv with numpy<2, onnxruntime, tokenizers and koala-trt)")
    probe = subprocess.run([str(python), "-c", "import sys, numpy; print('%d.%d' % sys.version_info[:2], numpy.__version__)"],
                           capture_output=True, text=True, timeout=60)
    if probe.returncode != 0:
        raise UsageError(f"{python} cannot import numpy: {(probe.stderr.strip().splitlines() or ['?'])[-1]}")
    version, numpy_version = probe.stdout.split()
    mine = f"{sys.version_info[0]}.{sys.version_info[1]}"
    if version != mine:
        raise UsageError(f"{chosen} is Python {version}; the serving environment must be Python {mine} like this one")
    if int(numpy_version.split(".")[0]) >= 2:
        raise UsageError(f"{chosen} has numpy {numpy_version}; the bundled Python backend needs numpy<2 (make serve-venv)")
    return chosen.resolve()


def server_env(dist: ServerDist, env_dir: Path) -> dict[str, str]:
    env = dict(os.environ)
    libdir = sysconfig.get_config_var("LIBDIR") or str(Path(sys.base_prefix) / "lib")
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (libdir, str(dist.libs), env.get("LD_LIBRARY_PATH", "")) if p)
    env["PATH"] = os.pathsep.join([str(env_dir / "bin"), env.get("PATH", "")])
    env.pop("PYTHONHOME", None)
    return env


def server_command(dist: ServerDist, repo: Path, backends: Path, host: str, ports: Ports, exit_on_error: bool = True) -> list[str]:
    """tritonserver's command line; exit_on_error False keeps it up with models that failed to load
    (to read each model's state and reason from POST /v2/repository/index)."""
    return [str(dist.binary), "--model-repository", str(repo), "--backend-directory", str(backends),
            "--http-address", host, "--http-port", str(ports.http), "--grpc-address", host, "--grpc-port", str(ports.grpc),
            "--metrics-address", host, "--metrics-port", str(ports.metrics), "--allow-metrics", "true",
            "--allow-gpu-metrics", "false", "--strict-readiness", "true", "--exit-on-error", str(exit_on_error).lower(),
            "--disable-auto-complete-config", "--exit-timeout-secs", str(DRAIN_S), "--log-info", "false", "--log-warning", "true"]


def wait_ready(proc: subprocess.Popen, host: str, port: int, timeout_s: float = READY_TIMEOUT_S) -> None:
    """Poll /v2/health/ready until the server is ready; raise if it exits or the time runs out."""
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}/v2/health/ready"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise KoalaError(f"tritonserver exited with status {proc.returncode} before it was ready (its log is above)")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    raise KoalaError(f"tritonserver was not ready within {timeout_s:.0f} s")


def runtime_options(artifacts: Path, runtime: str, cpu_precision: str | None) -> dict[str, str]:
    """What the python flavour's component models pass to their runtime: for openvino the precision and
    the compiled-model cache beside the artifacts (the one `generate --backend openvino` fills, so a
    second start loads compiled models instead of compiling)."""
    if runtime != "openvino":
        if cpu_precision is not None:
            raise UsageError(f"--cpu-precision is for --backend openvino (not {runtime})")
        return {}
    from koala_core.machine import resolve_cpu_precision
    from runtime.openvino_backend import CACHE_SUFFIX

    resolve_cpu_precision(cpu_precision)  # bf16 on a CPU without it: refused before the server starts
    root = Path(artifacts).resolve()
    return {"cpu_precision": cpu_precision or "auto", "cache_dir": str(root.parent / (root.name + CACHE_SUFFIX))}


def serve(artifacts: Path, engines: Path | None, host: str, ports: Ports, env_dir: Path, instances: int = 1,
          log: Log = lambda _: None, ready: Callable[[], None] | None = None, runtime: str = "onnxruntime",
          cpu_precision: str | None = None, max_batch: int | None = None, repository: Path | None = None) -> int:
    """Write a Python-flavour repository into a temporary folder (or take `repository` as it is), run
    tritonserver over it until SIGINT/SIGTERM (passed on to the server, which drains and exits), remove
    the folder; returns the server's exit status (0 for a clean stop). runtime: onnxruntime, openvino
    or tensorrt (the engines; a component without one runs on onnxruntime)."""
    check_address(host, ports)
    name = check_repository(repository) if repository is not None else "koala"
    onnx_runtime = "onnxruntime" if runtime == "tensorrt" else runtime
    options = runtime_options(artifacts, onnx_runtime, cpu_precision) if repository is None else {}
    dist = find_server()
    work = Path(tempfile.mkdtemp(prefix="koala-trt-serve-"))
    proc: subprocess.Popen | None = None
    stopping: list[int] = []

    def forward(signum: int, _frame: object) -> None:
        stopping.append(signum)
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        if repository is None:
            repo = work / "repository"
            write_repository(artifacts, repo, engines, device="cpu", max_batch=max_batch, instances=instances, log=log,
                             flavour="python", runtime=onnx_runtime, runtime_options=options, in_place=True)
        else:
            repo = Path(repository).resolve()
        backends = backend_dir(dist, work)
        if stopping:
            return 0
        proc = subprocess.Popen(server_command(dist, repo, backends, host, ports), env=server_env(dist, env_dir),
                                stdin=subprocess.DEVNULL, start_new_session=True)  # our signals reach it only through `forward`
        try:
            wait_ready(proc, host, ports.http)
        except KoalaError:
            if stopping:
                return 0
            raise
        log(f"serving model {name} on {host}: HTTP {ports.http}, gRPC {ports.grpc}, metrics {ports.metrics} "
            f"(GET /v2/health/ready, POST /v2/models/{name}/infer, GET /metrics); stop with Ctrl-C or SIGTERM")
        if ready is not None:
            ready()
        while True:
            try:
                code = proc.wait()
                break
            except InterruptedError:  # pragma: no cover - PEP 475 retries wait() itself
                continue
        if stopping:
            if code not in (0, -signal.SIGTERM):
                log(f"tritonserver stopped (exit status {code}): requests or client connections were still open after the "
                    f"{DRAIN_S} s drain")
            else:
                log(f"tritonserver stopped (exit status {code})")
            return 0 if code in (0, -signal.SIGTERM) else code
        raise KoalaError(f"tritonserver exited unexpectedly with status {code}")
    finally:
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for s, h in previous.items():
            signal.signal(s, h)
        shutil.rmtree(work, ignore_errors=True)
