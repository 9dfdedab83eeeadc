"""``rahf serve`` (rahf/serve) and its client (rahf/client.py), over real HTTP on localhost, tiny preset.

Servers run in-process (uvicorn in a thread) except the CLI test, which starts ``python -m rahf serve``."""

import base64
import io
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
from contextlib import contextmanager

import httpx
import numpy as np
import pytest
import uvicorn
from PIL import Image

from badcorpus import bomb_png
from rahf import RAHFScorer
from rahf.client import RAHFClient, ServerError, array_to_image, decode_heatmap
from rahf.data.torch_data import resize_map
from rahf.schema import MAP_NAMES, MAX_PROMPT_CHARS, SCORE_NAMES
from rahf.serve import ServeSettings, create_app

MAX_ITEMS = 6
MAX_BODY = 2**20
MAX_PIXELS = 512 * 512


# ------------------------------------------------------------------------------------ helpers
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running(app):
    """Serve ``app`` with uvicorn on a free localhost port in a thread; yields the base URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


def png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def rand_image(seed: int, h: int = 40, w: int = 48) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)


def item(seed: int = 0, prompt: str = "a yellow cat on a red mat", **kw) -> dict:
    return {"image": b64(png_bytes(rand_image(seed, **kw))), "prompt": prompt}


def reference(app, images, prompts, decode="constrained"):
    """RAHFScorer.score on the server's own scorer (taking the batcher's lock, as any other user must)."""
    with app.state.batcher.lock:
        return app.state.scorer.score(images, prompts, batch_size=len(images), decode=decode)


@pytest.fixture(scope="module")
def checkpoint(ckpt, tmp_path_factory):
    """The tiny checkpoint plus a metrics.json (a copy: the shared one stays untouched)."""
    d = tmp_path_factory.mktemp("serve_ck") / "export"
    shutil.copytree(ckpt, d)
    (d / "metrics.json").write_text(json.dumps({"plausibility/plcc": 0.5, "keyword/f1": 0.1}))
    return d


@pytest.fixture(scope="module")
def scorer(checkpoint):
    return RAHFScorer.from_pretrained(checkpoint, device="cpu")


@pytest.fixture(scope="module")
def allowed(tmp_path_factory):
    """(allowed dir with ok.png, a file outside it, a symlink inside pointing outside)."""
    root = tmp_path_factory.mktemp("paths")
    inside, outside = root / "allowed", root / "outside"
    inside.mkdir(), outside.mkdir()
    Image.fromarray(rand_image(7)).save(inside / "ok.png")
    Image.fromarray(rand_image(8)).save(outside / "secret.png")
    (inside / "link.png").symlink_to(outside / "secret.png")
    return inside, outside / "secret.png"


@pytest.fixture(scope="module")
def served(scorer, checkpoint, allowed):
    """(base URL, app) of a server with small limits and an allowed directory."""
    settings = ServeSettings(checkpoint=str(checkpoint), max_batch=8, max_wait_ms=5, max_queue=64,
                             max_items=MAX_ITEMS, max_body_bytes=MAX_BODY, max_pixels=MAX_PIXELS,
                             allow_dir=str(allowed[0]))
    app = create_app(scorer, settings)
    with running(app) as url:
        yield url, app


def post(url, body, **kw):
    if isinstance(body, (bytes, str)):
        return httpx.post(url + "/v1/score", content=body, headers={"content-type": "application/json"}, **kw)
    return httpx.post(url + "/v1/score", json=body, **kw)


def assert_serving(url):
    r = post(url, {"items": [item(3, "one blue square")]})
    assert r.status_code == 200, r.text
    assert r.json()["results"][0]["prompt"] == "one blue square"


# ------------------------------------------------------------------------------------ schema
def test_openapi_lists_endpoints_and_request_schema(served):
    url, _ = served
    spec = httpx.get(url + "/openapi.json").json()
    assert {"/v1/score", "/health", "/v1/info"} <= set(spec["paths"])
    op = spec["paths"]["/v1/score"]["post"]
    ref = op["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    assert ref.endswith("/ScoreRequest")
    schemas = spec["components"]["schemas"]
    req = schemas["ScoreRequest"]
    assert set(req["properties"]) == {"items", "options"} and req["required"] == ["items"]
    score_item = schemas["ScoreItem"]
    assert score_item["properties"]["prompt"]["maxLength"] == MAX_PROMPT_CHARS
    assert set(score_item["required"]) == {"image", "prompt"}
    opts = schemas["ScoreOptions"]["properties"]
    assert set(opts["decode"]["enum"]) == {"constrained", "free", "word_head", "none"}
    assert set(opts["heatmap_format"]["enum"]) == {"png", "float"}
    assert set(schemas["Scores"]["properties"]) == set(SCORE_NAMES)
    assert set(schemas["Heatmaps"]["properties"]) == set(MAP_NAMES)
    assert {"200", "401", "413", "422", "503"} <= set(op["responses"])
    assert spec["paths"]["/health"]["get"]["responses"]["200"]["content"]["application/json"]["schema"][
        "$ref"].endswith("/Health")


# ------------------------------------------------------------------------------------ outputs
def test_outputs_equal_scorer(served):
    url, app = served
    arrays = [rand_image(1, 40, 48), rand_image(2, 64, 32), rand_image(3, 33, 57)]
    prompts = ["a yellow cat on a red mat", "Two blue squares, one star!", "x y"]
    items = [{"image": b64(png_bytes(a)), "prompt": p} for a, p in zip(arrays, prompts)]
    for decode in ("constrained", "free"):
        ref = reference(app, arrays, prompts, decode)
        for fmt in ("png", "float"):
            r = post(url, {"items": items, "options": {"outputs": ["scores", "heatmaps", "misaligned_words"],
                                                       "heatmap_format": fmt, "heatmap_size": 16, "decode": decode}})
            assert r.status_code == 200, r.text
            got = r.json()["results"]
            assert [g["index"] for g in got] == [0, 1, 2]
            for g, e in zip(got, ref):
                assert g["prompt"] == e.prompt and tuple(g["size"]) == e.size
                np.testing.assert_allclose([g["scores"][s] for s in SCORE_NAMES], [e.scores[s] for s in SCORE_NAMES],
                                           rtol=0, atol=1e-5)
                assert g["tagged_prompt"] == e.tagged_prompt and g["misaligned_words"] == e.misaligned_words
                for m in MAP_NAMES:
                    h = decode_heatmap(g["heatmaps"][m])
                    if fmt == "png":
                        assert h.shape == e.heatmaps[m].shape
                        np.testing.assert_allclose(h, e.heatmaps[m], rtol=0, atol=0.5 / 255 + 1e-5)
                    else:
                        np.testing.assert_allclose(h, resize_map(e.heatmaps[m], 16).numpy(), rtol=0, atol=1e-5)
    # only what is asked for; decode "none" leaves the words out
    r = post(url, {"items": items[:1], "options": {"outputs": ["scores"], "decode": "none"}}).json()["results"][0]
    assert set(r) == {"index", "prompt", "size", "scores"}
    r = post(url, {"items": items[:1], "options": {"outputs": ["misaligned_words"], "decode": "none"}})
    assert set(r.json()["results"][0]) == {"index", "prompt", "size"}


def test_client_matches_scorer(served, tmp_path):
    url, app = served
    path = tmp_path / "img.jpg"
    Image.fromarray(rand_image(4, 50, 60)).save(path, quality=90)
    pil = Image.fromarray(rand_image(5, 30, 30)).convert("RGBA")
    arr = np.random.default_rng(6).random((3, 20, 24)).astype(np.float32)  # CHW floats in [0, 1]
    images = [str(path), pil, arr, path.read_bytes()]
    prompts = ["a red mat", "the cat", "blue star", "one"]
    with RAHFClient(url) as client:
        got = client.score(images, prompts, outputs=("scores", "misaligned_words", "heatmaps"))
        ref = reference(app, [str(path), pil, arr, str(path)], prompts)
        for g, e in zip(got, ref):
            assert g["size"] == e.size and g["misaligned_words"] == e.misaligned_words
            assert all(abs(g["scores"][s] - e.scores[s]) < 1e-5 for s in SCORE_NAMES)
            assert g["heatmaps"]["implausibility"].dtype == np.float32
            np.testing.assert_allclose(g["heatmaps"]["misalignment"], e.misalignment, atol=0.5 / 255 + 1e-5)
        # one prompt for many images; a single image; floats
        many = client.score([arr, arr], "a cat", outputs=("scores",), decode=None)
        assert len(many) == 2 and "misaligned_words" not in many[0]
        assert all(abs(many[0]["scores"][k] - many[1]["scores"][k]) < 1e-6 for k in SCORE_NAMES)
        # more images than the server takes per request: split by its max_items
        assert len(client.score([arr] * (MAX_ITEMS + 2), "a cat", outputs=("scores",))) == MAX_ITEMS + 2
        assert client.batch_size == MAX_ITEMS
        one = client.score(pil, "the cat", outputs=("heatmaps",), heatmap_format="float", heatmap_size=8)
        assert one[0]["heatmaps"]["implausibility"].shape == (8, 8)
        with pytest.raises(ServerError) as ei:
            client.score([arr, arr], ["a", "..."])
        assert ei.value.status == 422 and [e["item"] for e in ei.value.errors] == [1]
        with pytest.raises(ValueError, match="2 images but 3 prompts"):
            client.score([arr, arr], ["a", "b", "c"])


def test_client_array_rules_equal_scorer():
    from rahf.eval.scorer import to_pil

    rng = np.random.default_rng(0)
    for a in (rng.integers(0, 255, (9, 11, 3), dtype=np.uint8), rng.random((3, 9, 11)), rng.random((9, 11)),
              rng.random((9, 11, 4)).astype(np.float32) * 200, rng.random((9, 11, 1))):
        np.testing.assert_array_equal(np.asarray(array_to_image(a)), np.asarray(to_pil(a)))
    with pytest.raises(ValueError, match="shape"):
        array_to_image(np.zeros((2, 3, 5, 5)))


def test_base64_forms(served):
    url, _ = served
    plain = item(11)["image"]
    wrapped = "\n".join(plain[i:i + 76] for i in range(0, len(plain), 76))
    forms = [plain, wrapped, "data:image/png;base64," + plain]
    r = post(url, {"items": [{"image": f, "prompt": "a cat"} for f in forms], "options": {"outputs": ["scores"]}})
    assert r.status_code == 200, r.text
    scores = np.array([[g["scores"][k] for k in SCORE_NAMES] for g in r.json()["results"]])
    np.testing.assert_allclose(scores[1:], scores[[0, 0]], rtol=0, atol=1e-6)


def test_paths_inside_allowed_dir(served, allowed):
    url, app = served
    inside, outside = allowed
    r = post(url, {"items": [{"image": {"path": "ok.png"}, "prompt": "a cat"},
                             {"image": {"path": str(inside / "ok.png")}, "prompt": "a cat"}]})
    assert r.status_code == 200, r.text
    ref = reference(app, [str(inside / "ok.png")], ["a cat"])[0]
    for g in r.json()["results"]:
        assert abs(g["scores"]["overall"] - ref.scores["overall"]) < 1e-5


# ------------------------------------------------------------------------------------ bad input
def _truncated_png() -> str:
    data = png_bytes(rand_image(9, 64, 64))
    return b64(data[: len(data) // 2])


BAD_ITEMS = {  # name: (item, field, problem regex)
    "truncated image": ({"image": _truncated_png(), "prompt": "a cat"}, "image", r"does not decode"),
    "wrong base64": ({"image": "this is not base64!", "prompt": "a cat"}, "image", r"not valid base64"),
    "not an image": ({"image": b64(b"hello world"), "prompt": "a cat"}, "image", r"does not decode"),
    "bad data URL": ({"image": "data:image/png," + b64(b"x"), "prompt": "a cat"}, "image", r"data URL"),
    "huge declared size": ({"image": b64(bomb_png(100000, 100000)), "prompt": "a cat"}, "image",
                           r"decompression bomb.*10000000000|100000×100000"),
    "over the pixel limit": ({"image": b64(bomb_png(1000, 1000)), "prompt": "a cat"}, "image",
                             r"1000×1000 = 1,000,000 pixels, over this server's limit of 262,144"),
    "tiny image": ({"image": b64(png_bytes(rand_image(1, 4, 4))), "prompt": "a cat"}, "image", r"smaller than 8×8"),
    "empty prompt": ({"image": item()["image"], "prompt": ""}, "prompt", r"no words"),
    "punctuation prompt": ({"image": item()["image"], "prompt": " ,.;!? "}, "prompt", r"no words"),
    "long prompt": ({"image": item()["image"], "prompt": "a" * (MAX_PROMPT_CHARS + 1)}, "prompt", r"at most 2048"),
    "prompt not a string": ({"image": item()["image"], "prompt": 5}, "prompt", r"valid string"),
    "image not a string": ({"image": 3.5, "prompt": "a cat"}, "image", r"base64-encoded image string"),
    "missing prompt": ({"image": item()["image"]}, "prompt", r"required"),
    "unknown field": ({"image": item()["image"], "prompt": "a", "seed": 1}, "seed", r"not permitted"),
    "item not an object": ("a cat", None, r"valid dictionary"),
    "path outside": ({"image": {"path": "../outside/secret.png"}, "prompt": "a cat"}, "image.path", r"outside"),
    "symlink outside": ({"image": {"path": "link.png"}, "prompt": "a cat"}, "image.path", r"outside"),
    "missing file": ({"image": {"path": "nope.png"}, "prompt": "a cat"}, "image", r"missing"),
}


def test_word_head_decoding_refused_for_a_model_without_word_head(served):
    url, app = served
    assert app.state.scorer.model.word_head is None
    r = post(url, {"items": [item(1)], "options": {"decode": "word_head"}})
    assert r.status_code == 422, r.text
    assert r.json()["errors"][0]["field"] == "options.decode" and "word head" in r.json()["errors"][0]["problem"]
    assert_serving(url)


@pytest.mark.parametrize("name", list(BAD_ITEMS))
def test_bad_item_named_then_serving(served, name):
    url, _ = served
    bad, field, pattern = BAD_ITEMS[name]
    r = post(url, {"items": [item(1), bad]})
    assert r.status_code == 422, r.text
    body = r.json()
    assert body["error"] == "invalid_request" and "index 1" in body["detail"]
    assert [e["item"] for e in body["errors"]] == [1], body
    assert body["errors"][0]["field"] == field
    assert re.search(pattern, body["errors"][0]["problem"]), body["errors"][0]["problem"]
    assert_serving(url)


def test_absolute_path_outside(served, allowed):
    url, _ = served
    r = post(url, {"items": [{"image": {"path": str(allowed[1])}, "prompt": "a"}]})
    assert r.status_code == 422 and "outside" in r.json()["errors"][0]["problem"]


def test_every_bad_item_listed(served):
    url, _ = served
    items = [item(1), BAD_ITEMS["wrong base64"][0], item(2), {"image": b64(b"junk"), "prompt": ""},
             BAD_ITEMS["path outside"][0], BAD_ITEMS["prompt not a string"][0]]
    r = post(url, {"items": items, "options": {"decode": "greedy"}})
    assert r.status_code == 422
    errors = r.json()["errors"]
    assert errors[0]["item"] is None and errors[0]["field"] == "options.decode"
    by_item = {}
    for e in errors[1:]:
        by_item.setdefault(e["item"], set()).add(e["field"])
    # item 3 is wrong twice (no words, and its image does not decode): both are named
    assert by_item == {1: {"image"}, 3: {"prompt", "image"}, 4: {"image.path"}, 5: {"prompt"}}
    assert_serving(url)


@pytest.mark.parametrize("body,field,pattern", [
    (b'{"items": [', "body", r"not valid JSON"),
    (b'[1, 2]', "body", r"valid dictionary"),
    ({"items": "a cat"}, "items", r"valid list"),
    ({"items": []}, "items", r"at least 1"),
    ({}, "items", r"required"),
    ({"items": [item()], "options": {"heatmap_size": "big"}}, "options.heatmap_size", r"valid integer"),
    ({"items": [item()], "options": {"outputs": ["scores", "logits"]}}, "options.outputs.1", r"'scores'"),
    ({"items": [item(i) for i in range(MAX_ITEMS + 1)]}, "items", rf"{MAX_ITEMS + 1} items; .* at most {MAX_ITEMS}"),
])
def test_bad_request_named_then_serving(served, body, field, pattern):
    url, _ = served
    r = post(url, body)
    assert r.status_code == 422, r.text
    errors = r.json()["errors"]
    assert errors and errors[0]["item"] is None and errors[0]["field"] == field, errors
    assert re.search(pattern, errors[0]["problem"]), errors
    assert_serving(url)


def test_body_too_large_then_serving(served):
    url, _ = served
    big = {"items": [{"image": b64(os.urandom(MAX_BODY)), "prompt": "a cat"}]}
    r = post(url, big)
    assert r.status_code == 413
    body = r.json()
    assert body["error"] == "body_too_large" and f"{MAX_BODY:,}" in body["detail"]
    assert body["errors"][0]["field"] == "body"
    assert_serving(url)
    # no Content-Length (chunked upload): refused once the bytes read pass the limit
    payload = json.dumps(big).encode()
    chunks = (payload[i:i + 65536] for i in range(0, len(payload), 65536))
    r = httpx.post(url + "/v1/score", content=chunks, headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"] == "body_too_large"
    assert_serving(url)


def test_unknown_route_has_error_shape(served):
    url, _ = served
    r = httpx.get(url + "/v2/score")
    assert r.status_code == 404 and r.json()["error"] == "not_found"


# ------------------------------------------------------------------------------------ health, info
def test_health_and_info(served, scorer, checkpoint):
    url, _ = served
    h = httpx.get(url + "/health").json()
    done = h.pop("items_scored")
    assert h.pop("batches") <= done
    assert h == {"status": "ok", "model_loaded": True, "queue_depth": 0, "in_flight_items": 0,
                 "in_flight_requests": 0, "max_queue": 64}
    assert_serving(url)
    assert httpx.get(url + "/health").json()["items_scored"] == done + 1
    info = httpx.get(url + "/v1/info").json()
    assert info["metrics"] == json.loads((checkpoint / "metrics.json").read_text())
    assert info["config"] == json.loads(json.dumps(scorer.config.to_dict()))
    assert info["checkpoint"] == str(checkpoint) and info["device"] == "cpu"
    assert info["parameters"] == sum(p.numel() for p in scorer.model.parameters())
    assert info["score_names"] == list(SCORE_NAMES) and info["map_names"] == list(MAP_NAMES)
    lim = info["limits"]
    assert (lim["max_items"], lim["max_body_bytes"], lim["max_image_pixels"], lim["max_batch"], lim["allow_paths"]) \
        == (MAX_ITEMS, MAX_BODY, MAX_PIXELS, 8, True)


# ------------------------------------------------------------------------------------ API key
def test_api_key(scorer, monkeypatch):
    app = create_app(scorer, ServeSettings(api_key="s3cret", max_items=4))
    with running(app) as url:
        good = {"items": [item(1)]}
        r = post(url, good)
        assert r.status_code == 401 and r.json()["error"] == "unauthorized"
        assert r.headers["www-authenticate"] == "Bearer"
        assert post(url, good, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert post(url, good, headers={"X-API-Key": "s3cre"}).status_code == 401
        assert post(url, good, headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert post(url, good, headers={"X-API-Key": "s3cret"}).status_code == 200
        assert httpx.get(url + "/v1/info").status_code == 401
        assert httpx.get(url + "/health").status_code == 200
        with RAHFClient(url, api_key="s3cret") as client:
            assert client.info()["limits"]["allow_paths"] is False
            assert len(client.score(rand_image(1), "a cat")) == 1
            # paths are refused by a server started without an allowed directory
            with pytest.raises(ServerError, match="takes no image paths"):
                client.score_raw([{"image": {"path": "/etc/passwd"}, "prompt": "a"}])
        with RAHFClient(url) as client, pytest.raises(ServerError) as ei:
            client.health(), client.info()
        assert ei.value.status == 401
        spec = httpx.get(url + "/openapi.json").json()
        assert {"HTTPBearer", "APIKeyHeader"} <= set(spec["components"]["securitySchemes"])


def test_cli_without_fastapi(monkeypatch, tmp_path):
    from rahf.cli import main

    monkeypatch.setitem(sys.modules, "fastapi", None)
    with pytest.raises(SystemExit, match=r'pip install "rahf\[serve\]"'):
        main(["serve", "--checkpoint", str(tmp_path)])


def test_client_imports_without_torch():
    code = "import sys, rahf.client; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# ------------------------------------------------------------------------------------ concurrency
@pytest.mark.slow
def test_concurrent_requests_batched_and_routed(served):
    url, app = served
    n_threads, n_requests = 8, 3
    decodes = ("constrained", "free", "none")
    jobs = {}
    for t in range(n_threads):
        for k in range(n_requests):
            seeds = (100 * t + 2 * k, 100 * t + 2 * k + 1)
            prompt = f"thread {t} request {k} yellow cat"
            jobs[t, k] = ([rand_image(s, 32 + 4 * (s % 3), 40) for s in seeds], prompt, decodes[t % 3])
    expected = {key: reference(app, ims, [p] * len(ims), None if d == "none" else d)
                for key, (ims, p, d) in jobs.items()}
    app.state.batcher.largest_batch = 0
    answers, failures = {}, []
    start = threading.Barrier(n_threads)

    def worker(t):
        try:
            with httpx.Client(base_url=url, timeout=120) as http:
                start.wait()
                for k in range(n_requests):
                    ims, p, d = jobs[t, k]
                    r = http.post("/v1/score", json={"items": [{"image": b64(png_bytes(a)), "prompt": p} for a in ims],
                                                     "options": {"decode": d}})
                    answers[t, k] = (r.status_code, r.json())
        except Exception as e:  # noqa: BLE001 - reported below
            failures.append(repr(e))

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(n_threads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(300)
    assert not failures and len(answers) == len(jobs)
    for key, (status, body) in answers.items():
        assert status == 200, body
        ims, p, d = jobs[key]
        got = body["results"]
        assert [g["index"] for g in got] == list(range(len(ims)))
        for g, e in zip(got, expected[key]):
            assert g["prompt"] == p and tuple(g["size"]) == e.size
            assert all(abs(g["scores"][s] - e.scores[s]) < 1e-5 for s in SCORE_NAMES)
            assert g.get("misaligned_words") == (e.misaligned_words if d != "none" else None)
    assert app.state.batcher.largest_batch > 2, "no forward pass combined items of two requests"
    assert httpx.get(url + "/health").json()["queue_depth"] == 0


@pytest.mark.slow
def test_queue_full_503_with_retry_after(scorer):
    app = create_app(scorer, ServeSettings(max_batch=2, max_wait_ms=0, max_queue=4, max_items=4))
    with running(app) as url:
        batcher = app.state.batcher
        results = {}

        def send(name, n):
            r = post(url, {"items": [item(i) for i in range(n)]}, timeout=120)
            results[name] = (r.status_code, len(r.json().get("results", [])))

        def health():
            return httpx.get(url + "/health").json()

        with batcher.lock:  # the model cannot run: the worker holds batch A, B waits in the queue
            a = threading.Thread(target=send, args=("a", 2))
            a.start()
            deadline = time.monotonic() + 30
            while health()["in_flight_items"] != 2:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            b = threading.Thread(target=send, args=("b", 4))
            b.start()
            while health()["queue_depth"] != 4:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            h = health()
            assert h["in_flight_requests"] == 2 and h["status"] == "ok"
            r = post(url, {"items": [item(9)]})
            assert r.status_code == 503 and r.json()["error"] == "queue_full"
            assert int(r.headers["retry-after"]) >= 1
            # the client waits (Retry-After, capped) and retries until there is room
            client_result = []
            c = threading.Thread(target=lambda: client_result.append(
                RAHFClient(url, retries=50, max_retry_wait=0.2).score(rand_image(1), "a cat")))
            c.start()
            time.sleep(0.5)
            assert not client_result
        for th in (a, b, c):
            th.join(120)
        assert results == {"a": (200, 2), "b": (200, 4)}
        assert len(client_result) == 1 and "scores" in client_result[0][0]
        assert health()["queue_depth"] == 0


@pytest.mark.slow
def test_cli_serve_subprocess_graceful_shutdown(ckpt):
    port = free_port()
    env = dict(os.environ, RAHF_TEST_KEY="k3y", HF_HUB_OFFLINE="1")
    proc = subprocess.Popen([sys.executable, "-m", "rahf", "serve", "--checkpoint", str(ckpt), "--port", str(port),
                             "--api-key-env", "RAHF_TEST_KEY", "--max-batch", "4", "--threads", "1",
                             "--log-level", "warning"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "server did not come up"
            try:
                if httpx.get(url + "/health", timeout=2).json()["model_loaded"]:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        with RAHFClient(url, api_key="k3y") as client:
            assert client.info()["limits"]["max_batch"] == 4
        answer = {}
        n = 16

        def send():
            r = httpx.post(url + "/v1/score", headers={"X-API-Key": "k3y"}, timeout=300,
                           json={"items": [item(i, h=96, w=96) for i in range(n)],
                                 "options": {"outputs": ["scores", "heatmaps", "misaligned_words"]}})
            answer["r"] = r

        th = threading.Thread(target=send)
        th.start()
        while not httpx.get(url + "/health").json()["in_flight_requests"]:
            assert th.is_alive(), "request finished before it was seen in flight"
            time.sleep(0.005)
        proc.send_signal(signal.SIGTERM)  # stop: the request in flight must still be answered
        th.join(300)
        assert answer["r"].status_code == 200
        assert len(answer["r"].json()["results"]) == n
        assert proc.wait(60) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once it has shut down
        with pytest.raises(httpx.TransportError):
            httpx.get(url + "/health", timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_bad_settings(tmp_path):
    with pytest.raises(ValueError, match="not a directory"):
        ServeSettings(allow_dir=str(tmp_path / "nope"))
    assert ServeSettings(max_items=100, max_queue=10).max_queue == 100
