"""The web app's endpoints through Starlette's test client, on the embedded shapes model.

Skipped where the ``app`` extra (starlette, uvicorn, python-multipart) or httpx (the test
client) is missing; ``.ci/test-app.sh`` runs them in an environment that has them.
"""

from __future__ import annotations

import io
import json
import threading
import time
import zipfile

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("starlette")
pytest.importorskip("multipart")
pytest.importorskip("httpx")
pytest.importorskip("uvicorn")

from starlette.testclient import TestClient

from cliplens.app.core import Limits, Service, named_object, outline_image, parse_prompts
from cliplens.app.server import create_app
from cliplens.errors import InputError
from cliplens.worlds import shapes

pytestmark = pytest.mark.app

LIMITS = Limits(max_upload_bytes=200_000, max_pixels=300 * 300, max_prompts=4, max_prompt_chars=50)


@pytest.fixture(scope="module")
def shapes_adapter():
    from cliplens.adapters import load_model

    return load_model("shapes")


@pytest.fixture(scope="module")
def service(shapes_adapter, tmp_path_factory):
    svc = Service(shapes_adapter, LIMITS, root=tmp_path_factory.mktemp("app"))
    yield svc
    svc.close()


@pytest.fixture(scope="module")
def client(service):
    return TestClient(create_app(service))  # no `with`: the module's service outlives each test


def png_bytes(size=(96, 80), colour=(200, 30, 30)) -> bytes:
    arr = np.zeros((size[1], size[0], 3), np.uint8)
    arr[...] = (230, 230, 230)
    arr[size[1] // 4 : size[1] // 2, size[0] // 4 : size[0] // 2] = colour
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def form(**kw):
    data = {
        "source": "scene",
        "scene": "3",
        "prompts": "a blue star\na green square",
        "methods": ["chefer", "rollout"],
    }
    data.update(kw)
    return data


def wait(client, job: str, timeout: float = 120) -> dict:
    end = time.time() + timeout
    while time.time() < end:
        state = client.get(f"/api/jobs/{job}").json()
        if state["status"] in ("done", "error"):
            return state
        time.sleep(0.1)
    raise AssertionError("run did not finish")


def run_ok(client, **kw) -> str:
    files = kw.pop("files", None)
    r = client.post("/api/run", data=form(**kw), files=files)
    assert r.status_code == 200, r.text
    state = wait(client, r.json()["job"])
    assert state["status"] == "done", state
    assert state["done"] == state["total"]
    return state["job"]


def one_line_400(response, *needles: str) -> str:
    assert response.status_code == 400, response.text
    message = response.json()["error"]
    assert "\n" not in message and "Traceback" not in message and message
    for n in needles:
        assert n in message, message
    return message


# ---- pages and scenes ---------------------------------------------------------------------------


def test_index_lists_every_method_and_the_limits(client):
    page = client.get("/").text
    for name in ("chefer", "legrad", "rollout", "interactions"):
        assert f"value='{name}'" in page
    assert "at most 4 prompts of 50 characters" in page


def test_scene_info_and_image(client):
    info = client.get("/api/scenes/3").json()
    sc = shapes.make_scene(3)
    assert info["labels"] == sc.labels
    assert info["prompts"][: len(sc.labels)] == [shapes.caption(label) for label in sc.labels]
    image = client.get("/api/scenes/3/image.png")
    assert image.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(image.content)).size == sc.image.size
    one_line_400(client.get("/api/scenes/abc"), "integer")
    one_line_400(client.get("/api/scenes/100000000"), "between")


# ---- a good run ------------------------------------------------------------------------------------


def test_scene_run_shows_every_method_per_prompt_with_ground_truth(client):
    job = run_ok(client)
    view = client.get(f"/api/jobs/{job}/view").text
    assert view.count("<h2 class='prompt'>") == 2
    assert (
        view.count("<div class='method'>chefer</div>") == 2
        and view.count("<div class='method'>rollout</div>") == 2
    )
    assert "outlines.png" in view and "ground-truth masks" in view
    assert "verdict" in view and "class='bar'" in view  # peak verdicts and colour bars
    peaks = view.split("<table class='peaks'>")[1].split("</table>")[0]
    assert peaks.count("<tr><td>") == 2 and "/2</td>" in peaks  # both prompts name an object
    for src in {part.split("'")[0] for part in view.split("src='")[1:]}:
        r = client.get("/" + src)
        assert r.status_code == 200, src
        assert r.headers["content-type"] == "image/png"


def test_upload_run_and_view_modes(client):
    job = run_ok(client, source="upload", files={"image": ("mine.png", png_bytes(), "image/png")})
    minmax = client.get(f"/api/jobs/{job}/view?mode=minmax").text
    signed = client.get(f"/api/jobs/{job}/view?mode=signed").text
    assert "outlines.png" not in minmax  # no ground truth for an uploaded image
    assert f"files/{job}/signed-chefer/" in signed and f"files/{job}/chefer/" in minmax
    one_line_400(client.get(f"/api/jobs/{job}/view?mode=rainbow"), "unknown view")


def test_probability_and_contrast_targets_and_options(client):
    job = run_ok(
        client, target="contrast", contrast="1", methods=["chefer", "legrad"], start_layer="0", layers="2"
    )
    view = client.get(f"/api/jobs/{job}/view").text
    assert "target contrast" in view
    assert "start layer 0" in view and "layers 2" in view
    run_ok(client, target="probability")


def test_interactions_word_maps(client):
    job = run_ok(client, methods=["interactions"])
    view = client.get(f"/api/jobs/{job}/view").text
    assert 'class="tok word"' in view and "data-img=" in view
    src = view.split('data-img="')[1].split('"')[0]
    assert client.get("/" + src).status_code == 200


def test_download_holds_what_cliplens_explain_writes(client):
    job = run_ok(client)
    r = client.get(f"/api/jobs/{job}/download")
    assert r.status_code == 200 and r.headers["content-type"] == "application/zip"
    zf = zipfile.ZipFile(io.BytesIO(r.content))
    names = set(zf.namelist())
    assert "cliplens-results/image.png" in names
    for method in ("chefer", "rollout"):
        assert f"cliplens-results/{method}/index.html" in names
        results = json.loads(zf.read(f"cliplens-results/{method}/results.json"))
        assert results["method"] == method and len(results["pairs"]) == 2
        for pair in results["pairs"]:
            assert pair["image"] == "../image.png"
            assert f"cliplens-results/{method}/{pair['overlay']}" in names


def test_two_runs_at_once(client):
    results = []

    def go(seed):
        results.append(run_ok(client, scene=str(seed)))

    threads = [threading.Thread(target=go, args=(s,)) for s in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(results)) == 2


def test_runs_waiting_are_limited(shapes_adapter, tmp_path):
    svc = Service(shapes_adapter, Limits(max_waiting=1), root=tmp_path)
    c = TestClient(create_app(svc))
    svc._model_lock.acquire()  # the model is busy: the first run waits
    try:
        first = c.post("/api/run", data=form()).json()
        assert first["status"] in ("queued", "running")
        assert c.get(f"/api/jobs/{first['job']}").json()["status"] == "queued"
        one_line_400(c.post("/api/run", data=form()), "waiting already")
    finally:
        svc._model_lock.release()
    assert wait(c, first["job"])["status"] == "done"
    run_ok(c)  # room again
    svc.close()


# ---- user errors: one line, HTTP 400 ----------------------------------------------------------------


def test_bad_uploads(client):
    def post(data: bytes, name="x.png"):
        return client.post("/api/run", data=form(source="upload"), files={"image": (name, data, "image/png")})

    msg = one_line_400(post(b"this is not an image"), "not an image")
    assert "/" not in msg  # no server path
    big = png_bytes(size=(400, 400))
    one_line_400(post(big), "pixel budget")
    noise = np.random.default_rng(0).integers(0, 255, (260, 260, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noise).save(buf, "BMP")
    one_line_400(post(buf.getvalue(), "noise.bmp"), "bytes")
    one_line_400(client.post("/api/run", data=form(source="upload")), "no image uploaded")


def test_upload_size_checked_before_reading(client):
    big = b"x" * (LIMITS.max_upload_bytes + 200_000)
    one_line_400(
        client.post("/api/run", data=form(source="upload"), files={"image": ("big.png", big)}), "too large"
    )

    def chunks():
        yield b"--b\r\nContent-Disposition: form-data; name=prompts\r\n\r\na\r\n--b--\r\n"

    r = client.post("/api/run", content=chunks(), headers={"content-type": "multipart/form-data; boundary=b"})
    one_line_400(r, "Content-Length")


def test_prompt_limits(client):
    one_line_400(
        client.post("/api/run", data=form(prompts="\n".join(f"a thing {i}" for i in range(5)))), "at most 4"
    )
    one_line_400(client.post("/api/run", data=form(prompts="x" * 51)), "51 characters; at most 50")
    one_line_400(client.post("/api/run", data=form(prompts=" \n \n")), "no prompts")


@pytest.mark.parametrize(
    "fields, needle",
    [
        ({"methods": ["chefer", "no_such_method"]}, "unknown method"),
        ({"methods": []}, "at least one method"),
        ({"start_layer": "abc"}, "must be an integer"),
        ({"methods": ["legrad"], "layers": "0"}, "positive integer"),
        ({"target": "banana"}, "unknown target"),
        ({"target": "contrast"}, "needs the other prompt"),
        ({"target": "contrast", "contrast": "a red moon"}, "contrast"),
        ({"source": "disk"}, "unknown image source"),
        ({"scene": "-3"}, "scene number"),
    ],
)
def test_bad_values(client, fields, needle):
    one_line_400(client.post("/api/run", data=form(**fields)), needle)


def test_no_path_reachable(client, service):
    job = run_ok(client, methods=["rollout"])
    assert client.get(f"/files/{job}/image.png").status_code == 200
    for bad in ("../image.png", "..%2F..%2Fetc%2Fpasswd", "rollout/../../x", ".hidden", "a/b/c"):
        r = client.get(f"/files/{job}/{bad}")
        assert r.status_code in (400, 404), bad
    assert client.get("/files/nope/image.png").status_code == 404
    one_line_400(client.get("/api/jobs/nope"), "no such run")
    one_line_400(client.get("/api/jobs/nope/download"), "no such run")


def test_folder_removed_on_shutdown(shapes_adapter, tmp_path):
    svc = Service(shapes_adapter, LIMITS, root=tmp_path)
    with TestClient(create_app(svc)) as c:
        run_ok(c, methods=["rollout"])
        assert any(svc.root.iterdir())
    assert not svc.root.exists()


# ---- the pieces -------------------------------------------------------------------------------------


def test_parse_prompts_and_named_object():
    assert parse_prompts("a\n\n  b  \n", LIMITS) == ["a", "b"]
    with pytest.raises(InputError):
        parse_prompts("", LIMITS)
    sc = shapes.make_scene(3)
    assert named_object(sc, "A photo of a  blue star") == "blue star"
    assert named_object(sc, "a purple circle") is None
    rgba = np.asarray(outline_image(sc))
    assert rgba.shape == (*sc.objects[0].mask.shape, 4)
    drawn = rgba[..., 3] > 0
    for obj in sc.objects:
        assert (drawn & obj.mask).any()  # every object outlined, the outline on its mask
    assert not (drawn & ~np.logical_or.reduce([o.mask for o in sc.objects])).any()


# ---- the command -------------------------------------------------------------------------------------


def test_cliplens_app_serves_then_cleans_up(tmp_path):
    """``cliplens app`` on a free port: the page answers; Ctrl-C stops it and its folder is gone;
    a host other than 127.0.0.1 prints a warning."""
    import os
    import signal
    import socket
    import subprocess
    import sys
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "TMPDIR": str(tmp_path), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "cliplens.cli", "app", "--port", str(port), "--host", "localhost"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert f"http://localhost:{port}/" in line, line + proc.stderr.read()
        assert list(tmp_path.glob("cliplens-app-*"))
        for _ in range(100):
            try:
                page = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5).read().decode()
                break
            except OSError:
                time.sleep(0.1)
        assert "value='chefer'" in page
    finally:
        proc.send_signal(signal.SIGINT)
        _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    assert not list(tmp_path.glob("cliplens-app-*"))


def test_app_with_a_model_that_cannot_load_is_one_line(tmp_path, capsys):
    from cliplens import cli

    assert cli.main(["app", "--model", str(tmp_path / "no-such-checkpoint")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("cliplens: error:") and "\n" not in err


def test_host_other_than_loopback_warns(monkeypatch, capsys):
    import uvicorn

    from cliplens import cli

    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(kw))
    assert cli.main(["app", "--host", "0.0.0.0", "--port", "8999"]) == 0
    assert seen["host"] == "0.0.0.0" and seen["port"] == 8999
    err = capsys.readouterr().err
    assert "warning: serving on 0.0.0.0" in err


# ---- the evaluation panel ---------------------------------------------------------------------


def wait_eval(client, ev: str, until=("done", "cancelled", "error"), timeout: float = 180) -> dict:
    end = time.time() + timeout
    while time.time() < end:
        state = client.get(f"/api/evals/{ev}").json()
        if state["status"] in until:
            return state
        time.sleep(0.05)
    raise AssertionError(f"evaluation did not reach {until}")


def test_evaluation_runs_and_shows_the_table_and_curves(client):
    page = client.get("/").text
    assert "id='evalform'" in page and "name='metrics' value='sanity'" in page
    r = client.post("/api/evals", data={"n": "3", "methods": ["chefer", "legrad"]})
    assert r.status_code == 200, r.text
    ev = r.json()["eval"]
    assert r.json()["total"] == 3 and r.json()["metrics"] == ["segmentation", "pointing", "perturbation"]
    state = wait_eval(client, ev)
    assert state["status"] == "done", state
    assert state["done"] == state["total"] == 3 and state["version"] >= 2
    view = client.get(f"/api/evals/{ev}/view").text
    assert "id='evaltable'" in view and "3 of 3 scenes (final)" in view
    for source in ("chefer", "legrad", "random", "centre", "oracle"):
        assert f"<td>{source}</td>" in view or f"<td><b>{source}</b></td>" in view
    assert "pointing" in view and "mIoU" in view and "pos AUC" in view
    assert f"api/evals/{ev}/files/perturbation.png" in view
    png = client.get(f"/api/evals/{ev}/files/perturbation.png")
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    assert png.content[:8] == b"\x89PNG\r\n\x1a\n"
    summary = client.get(f"/api/evals/{ev}/files/summary.json").json()
    assert summary["n_items"] == 3
    assert client.get(f"/api/evals/{ev}/files/..%2Fimage.png").status_code in (400, 404)
    one_line_400(client.get(f"/api/evals/{ev}/files/results.jsonl"), "no such file")


def test_evaluation_progress_comes_in_and_cancel_stops_between_items(client, service):
    seen: list[tuple[int, int]] = []
    r = client.post("/api/evals", data={"n": "120", "methods": "chefer", "metrics": "pointing"})
    assert r.status_code == 200, r.text
    ev = r.json()["eval"]
    end = time.time() + 120
    while time.time() < end:
        state = client.get(f"/api/evals/{ev}").json()
        seen.append((state["done"], state["version"]))
        if state["done"] >= 2 and state["version"] >= 1:
            break
        time.sleep(0.02)
    # a partial table is there before the end, and a second evaluation is refused meanwhile
    assert "so far" in client.get(f"/api/evals/{ev}/view").text
    one_line_400(client.post("/api/evals", data={"n": "2", "methods": "chefer"}), "running already")
    assert client.post(f"/api/evals/{ev}/cancel").status_code == 200
    state = wait_eval(client, ev)
    assert state["status"] == "cancelled", state
    assert 2 <= state["done"] < 120
    view = client.get(f"/api/evals/{ev}/view").text
    assert f"{state['done']} of 120 scenes (cancelled)" in view
    # the model is free again: an explain run and a new evaluation go through
    run_ok(client)
    r = client.post("/api/evals", data={"n": "1", "methods": "rollout", "metrics": ["pointing", "sanity"]})
    assert r.status_code == 200, r.text
    assert wait_eval(client, r.json()["eval"])["status"] == "done"


@pytest.mark.parametrize(
    "fields, needle",
    [
        ({"n": "0", "methods": "chefer"}, "between 1 and 200"),
        ({"n": "201", "methods": "chefer"}, "between 1 and 200"),
        ({"n": "many", "methods": "chefer"}, "must be an integer"),
        ({"n": "2"}, "at least one method"),
        ({"n": "2", "methods": "nope"}, "unknown method"),
        ({"n": "2", "methods": "chefer", "metrics": "deletion"}, "unknown metric"),
        ({"n": "2", "methods": ["chefer", "chefer"]}, "twice"),
    ],
)
def test_evaluation_bad_input_is_one_line(client, fields, needle):
    one_line_400(client.post("/api/evals", data=fields), needle)


def test_unknown_evaluation_is_one_line(client):
    one_line_400(client.get("/api/evals/0123456789abcdef"), "no such evaluation")
    one_line_400(client.post("/api/evals/0123456789abcdef/cancel"), "no such evaluation")
