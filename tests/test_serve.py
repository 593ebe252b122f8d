"""`koala-trt serve` on a real tritonserver (the binary and Python backend in the nvidia-pytriton wheel),
queried with tritonclient over HTTP and gRPC on free loopback ports: the same image as `generate`,
a 400 with a one-line message for every bad request (and the server keeps serving), a bounded load
test, a clean stop on SIGTERM. The repository it serves is the python flavour of `koala-trt triton`,
so this also loads and queries that flavour.

Needs the serve extra, nvidia-pytriton (installed with --no-deps) and the serving environment
.venv-serve (numpy<2, see shipping/serve.py), all made by `make install`; skipped without them.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

from conftest import run_cli

ROOT = Path(__file__).resolve().parents[1]
SERVE_ENV = Path(os.environ.get("KOALA_TRT_SERVE_ENV", ROOT / ".venv-serve"))
READY_S, STOP_S, REQUEST_S = 180, 60, 120  # STOP_S: above the server's 30 s exit timeout
SIZE, STEPS = 128, 3

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("pytriton") is None or importlib.util.find_spec("tritonclient") is None
    or not (SERVE_ENV / "bin" / "python").is_file(),
    reason="needs nvidia-pytriton, tritonclient[http,grpc] and .venv-serve (make install)")


def free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


class Server:
    def __init__(self, proc: subprocess.Popen, http: int, grpc: int, metrics: int, log: Path) -> None:
        self.proc, self.http, self.grpc, self.metrics, self.log = proc, http, grpc, metrics, log

    def text(self) -> str:
        return self.log.read_text(errors="replace")


@contextlib.contextmanager
def running_serve(args: list[str], log: Path) -> Iterator[Server]:
    """`koala-trt serve ARGS` on free loopback ports until it logs that it serves; stopped (SIGTERM, then
    SIGKILL of its group) on the way out if the test has not stopped it."""
    http, grpc, metrics = free_ports(3)
    env = dict(os.environ, PYTHONPATH=str(ROOT), KOALA_TRT_SERVE_ENV=str(SERVE_ENV))
    with open(log, "wb") as f:
        proc = subprocess.Popen([sys.executable, "-m", "koala_trt.cli", "serve", *args, "--http-port", str(http),
                                 "--grpc-port", str(grpc), "--metrics-port", str(metrics)],
                                cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    srv = Server(proc, http, grpc, metrics, log)
    try:
        deadline = time.monotonic() + READY_S
        while "serving model koala" not in srv.text():
            assert proc.poll() is None, srv.text()[-3000:]
            assert time.monotonic() < deadline, f"not ready in {READY_S} s:\n{srv.text()[-3000:]}"
            time.sleep(0.5)
        yield srv
    finally:
        if proc.poll() is None:
            stop(proc)



def stop(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL to the process group after STOP_S seconds: the test never leaves a server running."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=STOP_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

@pytest.fixture(scope="module")
def server(tiny_encoder_artifacts: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """random:tiny with its VAE encoder (img2img): the text-to-image networks are tiny_artifacts' own."""
    with running_serve(["--artifacts", str(tiny_encoder_artifacts), "--instances", "2"], tmp_path_factory.mktemp("serve") / "server.log") as srv:
        yield srv


@contextlib.contextmanager
def http_client(server: Server) -> Iterator:
    """A tritonclient HTTP client, closed on the way out: the server waits for open connections when it
    stops (shipping/serve.py DRAIN_S), as it would for any client."""
    import tritonclient.http as th

    client = th.InferenceServerClient(f"127.0.0.1:{server.http}", connection_timeout=REQUEST_S, network_timeout=REQUEST_S)
    try:
        yield client
    finally:
        client.close()


@contextlib.contextmanager
def grpc_client(server: Server) -> Iterator:
    import tritonclient.grpc as tg

    client = tg.InferenceServerClient(f"127.0.0.1:{server.grpc}")
    try:
        yield client
    finally:
        client.close()


def inputs(module, **values):
    """tritonclient InferInput list; values: name -> (numpy array, Triton datatype)."""
    out = []
    for name, (array, dtype) in values.items():
        i = module.InferInput(name, list(array.shape), dtype)
        i.set_data_from_numpy(array)
        out.append(i)
    return out


def request(prompt: str = "a koala in a tree", seed: int = 7, steps: int = STEPS, guidance: float = 5.0,
            height: int = SIZE, width: int = SIZE, negative: str | None = None, scheduler: str | None = None) -> dict:
    r = {"prompt": (np.array([prompt.encode()], dtype=np.object_), "BYTES"), "seed": (np.array([seed], np.int64), "INT64"),
         "steps": (np.array([steps], np.int32), "INT32"), "guidance": (np.array([guidance], np.float32), "FP32"),
         "height": (np.array([height], np.int32), "INT32"), "width": (np.array([width], np.int32), "INT32")}
    if negative is not None:
        r["negative_prompt"] = (np.array([negative.encode()], dtype=np.object_), "BYTES")
    if scheduler is not None:
        r["scheduler"] = (np.array([scheduler.encode()], dtype=np.object_), "BYTES")
    return r


def generated(tiny_artifacts: Path, out: Path, prompt: str = "a koala in a tree", seed: int = 7, negative: str = "",
              *extra: str) -> np.ndarray:
    from PIL import Image

    code, _, err = run_cli("generate", "--artifacts", tiny_artifacts, *extra, "--prompt", prompt, "--negative-prompt", negative,
                           "--seed", str(seed), "--steps", str(STEPS), "--guidance", "5", "--height", str(SIZE),
                           "--width", str(SIZE), "--out", out, "--no-progress")
    assert code == 0, err
    return np.asarray(Image.open(out).convert("RGB"))


def test_health_and_metrics_endpoints(server: Server) -> None:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{server.http}/v2/health/ready", timeout=10) as r:
        assert r.status == 200
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics}/metrics", timeout=10) as r:
        assert b"nv_inference_request_success" in r.read()
    with http_client(server) as client:
        assert client.is_model_ready("koala")
        meta = client.get_model_metadata("koala")
    assert {i["name"]: i["datatype"] for i in meta["inputs"]} == {
        "prompt": "BYTES", "negative_prompt": "BYTES", "seed": "INT64", "steps": "INT32", "guidance": "FP32",
        "height": "INT32", "width": "INT32", "scheduler": "BYTES", "image": "UINT8", "mask": "UINT8", "image_png": "BYTES",
        "mask_png": "BYTES", "strength": "FP32", "cache_interval": "INT32", "cache_branch": "INT32", "controlnet_scale": "FP32",
        "control_guidance_start": "FP32", "control_guidance_end": "FP32", "control_image": "UINT8"}
    assert [(o["name"], o["datatype"], o["shape"]) for o in meta["outputs"]] == [("image", "UINT8", [-1, -1, 3])]


def test_http_image_equals_generate(server: Server, tiny_artifacts: Path, tmp_path: Path) -> None:
    import tritonclient.http as th

    with http_client(server) as client:
        image = client.infer("koala", inputs(th, **request()), request_id="http-1").as_numpy("image")
    assert image.dtype == np.uint8 and image.shape == (SIZE, SIZE, 3)
    assert np.array_equal(image, generated(tiny_artifacts, tmp_path / "g.png"))
    assert "koala: request http-1 size 128x128 steps 3" in server.text()


def test_scheduler_input_equals_generate_scheduler(server: Server, tiny_artifacts: Path, tmp_path: Path) -> None:
    """The optional `scheduler` input is generate's --scheduler: the same image, and another than euler's."""
    import tritonclient.http as th

    with http_client(server) as client:
        image = client.infer("koala", inputs(th, **request(seed=5, scheduler="dpmpp_2m_karras"))).as_numpy("image")
    assert np.array_equal(image, generated(tiny_artifacts, tmp_path / "g.png", "a koala in a tree", 5, "", "--scheduler", "dpmpp_2m_karras"))
    assert not np.array_equal(image, generated(tiny_artifacts, tmp_path / "e.png", "a koala in a tree", 5))


def test_grpc_image_equals_generate_with_negative_prompt(server: Server, tiny_artifacts: Path, tmp_path: Path) -> None:
    import tritonclient.grpc as tg

    with grpc_client(server) as client:
        r = client.infer("koala", inputs(tg, **request(seed=11, negative="blurry")), client_timeout=REQUEST_S)
    expected = generated(tiny_artifacts, tmp_path / "g.png", seed=11, negative="blurry")
    assert np.array_equal(r.as_numpy("image"), expected)
    other = generated(tiny_artifacts, tmp_path / "h.png", seed=12, negative="blurry")
    assert not np.array_equal(other, expected)  # the comparison can fail: another seed, another image


def test_img2img_and_inpainting_equal_generate(server: Server, tiny_encoder_artifacts: Path, tmp_path: Path) -> None:
    """img2img from pixels, inpainting from PNG bytes: the images `generate --image [--mask]` writes."""
    import tritonclient.http as th

    from tests.img_helpers import picture, square_mask

    picture().save(tmp_path / "in.png")
    square_mask().save(tmp_path / "mask.png")
    pixels = request(seed=5)
    pixels.update(image=(np.asarray(picture()), "UINT8"), strength=(np.array([0.7], np.float32), "FP32"))
    png = request(seed=5)
    png.update(image_png=(np.array([(tmp_path / "in.png").read_bytes()], dtype=np.object_), "BYTES"),
               mask_png=(np.array([(tmp_path / "mask.png").read_bytes()], dtype=np.object_), "BYTES"),
               strength=(np.array([0.7], np.float32), "FP32"))
    with http_client(server) as client:
        img2img = client.infer("koala", inputs(th, **pixels)).as_numpy("image")
        inpaint = client.infer("koala", inputs(th, **png)).as_numpy("image")
    image = ("--image", str(tmp_path / "in.png"), "--strength", "0.7")
    assert np.array_equal(img2img, generated(tiny_encoder_artifacts, tmp_path / "a.png", "a koala in a tree", 5, "", *image))
    assert np.array_equal(inpaint, generated(tiny_encoder_artifacts, tmp_path / "b.png", "a koala in a tree", 5, "", *image,
                                             "--mask", str(tmp_path / "mask.png")))
    assert not np.array_equal(img2img, inpaint)


@pytest.mark.parametrize("case,expected", [
    ("missing prompt", "prompt"),
    ("steps 0", "--steps must be between 1 and 1000 (got 0)"),
    ("steps 1001", "--steps must be between 1 and 1000 (got 1001)"),
    ("height 132", "--height and --width must be positive multiples of 8 (got 132x128)"),
    ("width 100", "--height and --width must be positive multiples of 8 (got 128x100)"),
    ("height 1024", "1024x128 is outside the sizes"),
    ("width 136", "unet: --height and --width must be multiples of 32 for this model (got 128x136)"),
    ("width 96", "128x96 is outside the sizes"),
    ("guidance nan", "--guidance must be a finite number >= 0 (got nan)"),
    ("long prompt", "the prompt is"),
    ("steps as FP32", "inference input 'steps' data-type is 'FP32', but model 'koala' expects 'INT32'"),
    ("prompt as INT32", "inference input 'prompt' data-type is 'INT32', but model 'koala' expects 'BYTES'"),
    ("two seeds", "unexpected shape for input 'seed' for model 'koala'. Expected [1], got [2]"),
    ("unknown input", "unexpected inference input 'artifacts' for model 'koala'"),
    ("prompt not UTF-8", "prompt: not UTF-8 text"),
    ("seed -1", "--seed must be >= 0 (got -1)"),
    ("scheduler dpm++", "unknown scheduler 'dpm++'; known: euler, euler_a, heun, dpmpp_2m, dpmpp_2m_karras, ddim, unipc, lcm"),
    ("strength 0", "--strength must be in (0, 1] (got 0.0)"),
    ("image_png not an image", "--image: the image bytes is not an image; expected a PNG or JPEG"),
    ("mask of another size", "--mask is 96x64 px but --image is 128x128 px; give a mask of the image's size"),
])
def test_bad_request_gets_400_and_the_server_keeps_serving(server: Server, case: str, expected: str) -> None:
    import tritonclient.http as th
    from tritonclient.utils import InferenceServerException

    r = request()
    if case == "missing prompt":
        del r["prompt"]
    elif case.startswith("steps ") and case[6:].isdigit():
        r["steps"] = (np.array([int(case[6:])], np.int32), "INT32")
    elif case.startswith(("height ", "width ")):
        r[case.split()[0]] = (np.array([int(case.split()[1])], np.int32), "INT32")
    elif case == "guidance nan":
        r["guidance"] = (np.array([np.nan], np.float32), "FP32")
    elif case == "long prompt":
        r["prompt"] = (np.array([" ".join(["koala"] * 400).encode()], dtype=np.object_), "BYTES")
    elif case == "steps as FP32":
        r["steps"] = (np.array([3.0], np.float32), "FP32")
    elif case == "prompt as INT32":
        r["prompt"] = (np.array([7], np.int32), "INT32")
    elif case == "two seeds":
        r["seed"] = (np.array([1, 2], np.int64), "INT64")
    elif case == "unknown input":  # no input names a file: the interface is the inputs declared above
        r["artifacts"] = (np.array([b"/etc/passwd"], dtype=np.object_), "BYTES")
    elif case == "prompt not UTF-8":
        r["prompt"] = (np.array([b"\xff\xfe koala"], dtype=np.object_), "BYTES")
    elif case == "seed -1":
        r["seed"] = (np.array([-1], np.int64), "INT64")
    elif case == "scheduler dpm++":
        r["scheduler"] = (np.array([b"dpm++"], dtype=np.object_), "BYTES")
    elif case in ("strength 0", "mask of another size"):
        r["image"] = (np.full((SIZE, SIZE, 3), 128, np.uint8), "UINT8")
        r["strength" if case == "strength 0" else "mask"] = ((np.array([0.0], np.float32), "FP32") if case == "strength 0"
                                                             else (np.zeros((64, 96), np.uint8), "UINT8"))
    elif case == "image_png not an image":
        r["image_png"] = (np.array([b"GIF? no"], dtype=np.object_), "BYTES")
    with http_client(server) as client:
        with pytest.raises(InferenceServerException) as e:
            client.infer("koala", inputs(th, **r))
        assert e.value.status() == "400", (case, e.value.status(), e.value.message())
        assert expected in e.value.message() and "\n" not in e.value.message(), e.value.message()
        if case not in ("steps as FP32", "prompt as INT32", "two seeds", "unknown input"):  # Triton refuses those before the model runs
            assert f"error: {expected}" in server.text()  # the request's one log line says why
        if case == "long prompt":  # refused by the sampler's one range check: chunks of 75 up to the U-Net's 231 tokens
            assert "but unet takes at most 225 (3 chunk(s) of 75, 231 encoder tokens)" in e.value.message()
        assert client.infer("koala", inputs(th, **request(steps=1))).as_numpy("image").shape == (SIZE, SIZE, 3)


def _post_json(server: Server, guidance: str) -> tuple[int, str]:
    """A KServe v2 JSON request with `guidance` written as given (a JSON string, or a bare token)."""
    import urllib.error
    import urllib.request

    body = ('{"inputs": [{"name": "prompt", "datatype": "BYTES", "shape": [1], "data": ["a koala"]}, '
            '{"name": "steps", "datatype": "INT32", "shape": [1], "data": [1]}, '
            f'{{"name": "guidance", "datatype": "FP32", "shape": [1], "data": [{guidance}]}}]}}')
    req = urllib.request.Request(f"http://127.0.0.1:{server.http}/v2/models/koala/infer", data=body.encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=REQUEST_S) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


@pytest.mark.parametrize("guidance,status,message", [
    ('"NaN"', 500, "Unable to parse 'data': attempt to access JSON non-number as double"),  # Triton's own parser
    ('"5"', 500, "Unable to parse 'data': attempt to access JSON non-number as double"),
    ("NaN", 400, "--guidance must be a finite number >= 0 (got nan)"),  # Triton's parser reads the bare token
    ("Infinity", 400, "--guidance must be a finite number >= 0 (got inf)"),
    ("1e999", 500, "failed to parse the request JSON buffer: Number too big to be stored in double."),
])
def test_json_guidance_nan(server: Server, guidance: str, status: int, message: str) -> None:
    """docs/serve.md, "NaN over JSON": a number sent as a JSON string is refused by Triton's HTTP front end
    with 500 before any model sees the request (no model hook runs earlier, so koala-trt cannot make it a
    400); the bare NaN / Infinity tokens, binary data and gRPC reach the model's own check: 400."""
    before = server.text().count(" error: ")
    code, body = _post_json(server, guidance)
    assert code == status and json.loads(body)["error"].startswith(message), (code, body)
    code, ok = _post_json(server, "5.0")  # the server keeps serving; by now the bad request's log line is written
    assert code == 200 and json.loads(ok)["outputs"][0]["shape"][2] == 3
    assert server.text().count(" error: ") == before + (status == 400)  # the 500 never reached the model


def test_load_8_clients_x_4_requests(server: Server) -> None:
    import tritonclient.http as th

    clients, per_client = 8, 4
    latencies: list[float] = []
    lock = threading.Lock()

    def work(c: int) -> int:
        done = 0
        with http_client(server) as client:
            for k in range(per_client):
                t0 = time.perf_counter()
                image = client.infer("koala", inputs(th, **request(seed=100 * c + k, steps=2))).as_numpy("image")
                with lock:
                    latencies.append(time.perf_counter() - t0)
                done += int(image.shape == (SIZE, SIZE, 3))
        return done

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        answered = sum(pool.map(work, range(clients)))
    wall = time.perf_counter() - t0
    assert answered == clients * per_client
    p50, p90 = np.percentile(latencies, [50, 90])
    print(f"load: {answered} requests in {wall:.1f} s ({answered / wall:.2f} req/s), p50 {p50:.2f} s, p90 {p90:.2f} s")


def test_sigterm_stops_cleanly(server: Server) -> None:
    """Last in this module: stop the server and see it say so with exit status 0."""
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(timeout=STOP_S) == 0, server.text()[-3000:]
    assert "tritonserver stopped (exit status 0)" in server.text()


def test_python_flavour_repository_served_as_written_then_sigint(tiny_artifacts: Path, tmp_path: Path) -> None:
    """`koala-trt triton --flavour python` (components on koala-trt's openvino backend) loaded and
    queried by the bundled tritonserver: the image equals `generate --backend openvino`'s; Ctrl-C stops it."""
    import tritonclient.grpc as tg

    repo = tmp_path / "repo"
    code, _, err = run_cli("triton", "--artifacts", tiny_artifacts, "--out", repo, "--device", "cpu", "--flavour", "python",
                           "--backend", "openvino")
    assert code == 0, err
    assert 'backend: "python"' in (repo / "koala_unet" / "config.pbtxt").read_text()
    assert json.loads((repo / "koala_unet" / "1" / "component.json").read_text())["runtime"] == "openvino"
    with running_serve(["--repository", str(repo)], tmp_path / "server.log") as srv:
        with grpc_client(srv) as client:
            image = client.infer("koala", inputs(tg, **request(seed=5)), client_timeout=REQUEST_S).as_numpy("image")
        assert np.array_equal(image, generated(tiny_artifacts, tmp_path / "g.png", "a koala in a tree", 5, "", "--backend", "openvino"))
        srv.proc.send_signal(signal.SIGINT)
        assert srv.proc.wait(timeout=STOP_S) == 0, srv.text()[-3000:]
    assert "tritonserver stopped (exit status 0)" in srv.text()
    assert "koala: request koala_0_0#1 size 128x128 steps 3" in srv.text()


def test_production_flavour_parsed_by_the_bundled_server(tiny_artifacts: Path, tmp_path: Path) -> None:
    """The production repository on the bundled tritonserver: every config passes its parser and
    validation, so each ONNX component is UNAVAILABLE only because the onnxruntime backend is not in
    this build, and the pipeline model (Python backend) is READY. Two broken copies show that the parser
    and the validation do reject: a config error leaves a model unloaded, with no state."""
    import urllib.request

    from shipping.serve import Ports, backend_dir, find_server, server_command, server_env

    repo = tmp_path / "repo"
    code, _, err = run_cli("triton", "--artifacts", tiny_artifacts, "--out", repo, "--device", "cpu")
    assert code == 0, err
    for name, old, new in (("koala_broken", "data_type: TYPE_FP32", "data_type: TYPE_NOPE"),  # parse error
                           ("koala_invalid", "dynamic_batching { }", "dynamic_batching { preferred_batch_size: [ 64 ] }")):
        shutil.copytree(repo / "koala_vae_decoder", repo / name)
        config = (repo / name / "config.pbtxt").read_text().replace('"koala_vae_decoder"', f'"{name}"')
        assert old in config
        (repo / name / "config.pbtxt").write_text(config.replace(old, new, 1))
    dist = find_server()
    http, grpc, metrics = free_ports(3)
    command = server_command(dist, repo, backend_dir(dist, tmp_path / "work"), "127.0.0.1", Ports(http, grpc, metrics),
                             exit_on_error=False)
    with open(tmp_path / "server.log", "wb") as log:
        proc = subprocess.Popen(command, env=server_env(dist, SERVE_ENV.resolve()), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        deadline, states = time.monotonic() + READY_S, {}
        while time.monotonic() < deadline:  # until every model that has a state has settled
            assert proc.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            try:
                req = urllib.request.Request(f"http://127.0.0.1:{http}/v2/repository/index", data=b"{}", method="POST")
                with urllib.request.urlopen(req, timeout=5) as r:
                    states = {m["name"]: (m.get("state"), m.get("reason", "")) for m in json.loads(r.read())}
                if states and all(s in (None, "READY", "UNAVAILABLE") for s, _ in states.values()):
                    break
            except OSError:
                pass
            time.sleep(0.5)
    finally:
        stop(proc)
    missing = "Invalid argument: unable to find backend library for backend 'onnxruntime', try specifying runtime on the model configuration."
    for comp in ("text_encoder", "text_encoder_2", "unet", "vae_decoder"):
        assert states[f"koala_{comp}"] == ("UNAVAILABLE", missing), states
    assert states["koala"][0] == "READY", states
    log = (tmp_path / "server.log").read_text(errors="replace")
    assert states["koala_broken"] == (None, ""), states  # the parser refused it: never loaded
    assert 'Unknown enumeration value of "TYPE_NOPE"' in log
    assert states["koala_invalid"] == (None, ""), states  # validation refused it: never loaded
    assert re.search(r"koala_invalid.*preferred|preferred.*koala_invalid", log), log[-3000:]


def test_serve_with_feature_caching(tiny_cached_artifacts: Path, tmp_path: Path) -> None:
    """A request's cache_interval runs unet_deep / unet_shallow through the repository: the image of
    `generate --cache-interval`; interval 0 is a 400 and the server keeps serving."""
    import tritonclient.http as th
    from tritonclient.utils import InferenceServerException

    interval = {"cache_interval": (np.array([2], np.int32), "INT32")}
    with running_serve(["--artifacts", str(tiny_cached_artifacts)], tmp_path / "server.log") as srv, http_client(srv) as client:
        image = client.infer("koala", inputs(th, **request(), **interval)).as_numpy("image")
        with pytest.raises(InferenceServerException, match="--cache-interval must be a whole number >= 1"):
            client.infer("koala", inputs(th, **request(), cache_interval=(np.array([0], np.int32), "INT32")))
        assert client.is_server_live()
    assert np.array_equal(image, generated(tiny_cached_artifacts, tmp_path / "g.png", "a koala in a tree", 7, "",
                                           "--cache-interval", "2"))
