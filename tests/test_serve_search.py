"""The search endpoints of `jblip serve --index` over an index of generated scenes (bundled demo
retrieval model): the ranking equals `jblip search`, images are served by id only (an unknown id,
a path or a path-like id is a 404), bad queries are 4xx and the server keeps serving,
concurrent searches equal sequential ones, and a server without an index says so."""
from __future__ import annotations

import concurrent.futures
import json
import os
import urllib.parse

import pytest
from PIL import Image

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx2")

import jblip  # noqa: E402
from jblip.cli import main  # noqa: E402
from jblip.commands.retrieval_common import open_index  # noqa: E402
from jblip.pipeline import DEFAULT_MODEL  # noqa: E402
from jblip.processing import Processor  # noqa: E402
from jblip.serve import BackgroundServer, ServerSettings, build_app  # noqa: E402
from jblip.serve.search import MAX_QUERY_CHARS, MAX_TOP_K  # noqa: E402
from tests.test_retrieval_cli import draw_scenes  # noqa: E402

pytestmark = pytest.mark.skipif(not os.path.isfile(os.path.join(DEFAULT_MODEL, "config.json")),
                                reason="demo model not bundled")
JPEG = "yellow_circle_right_white.jpg"


def build_scene_index(root, index) -> dict[str, str]:
    """The 12 test scenes (one as a JPEG) indexed with `jblip index`: {file name: caption}."""
    names = draw_scenes(root)
    png = JPEG.replace(".jpg", ".png")
    Image.open(root / png).convert("RGB").save(root / JPEG, quality=95)
    os.remove(root / png)
    names[JPEG] = names.pop(png)
    assert main(["index", "--images", str(root), "--out", str(index), "--batch-size", "4"]) == 0
    return names


@pytest.fixture(scope="module")
def scene_index(tmp_path_factory, private_xla_cache):
    root, index = tmp_path_factory.mktemp("scenes"), tmp_path_factory.mktemp("index")
    return root, index, build_scene_index(root, index)


@pytest.fixture(scope="module")
def model():
    return jblip.load_pretrained(DEFAULT_MODEL)


@pytest.fixture(scope="module")
def index_search(scene_index):
    search = open_index(str(scene_index[1]))
    search.warm_up()  # as `jblip serve --index` does
    return search


@pytest.fixture(scope="module")
def server(index_search, model):
    app = build_app(model, Processor.from_pretrained(DEFAULT_MODEL), ServerSettings(model_name="demo"),
                    search=index_search)
    with BackgroundServer(app) as s:
        yield s


def search(server, body, status=200) -> dict:
    r = httpx.post(server.url + "/v1/search", json=body, timeout=60)
    assert r.status_code == status, r.text
    return r.json()


def test_ranking_equals_jblip_search(server, scene_index, capsys):
    root, index, names = scene_index
    info = httpx.get(server.url + "/v1/search/index").json()
    assert info == dict(loaded=True, images=12, model="retrieval_demo", top_k=dict(default=8, max=12),
                        max_query_tokens=32, max_query_chars=MAX_QUERY_CHARS)
    paths = {str(root / n) for n in names}
    query = names["green_triangle_right_black.png"]  # each CLI run loads the model: one query
    answer = search(server, {"query": query, "top_k": 12})
    assert main(["search", "--index", str(index), "--text", query, "--top", "12"]) == 0
    cli = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [h["rank"] for h in answer["data"]] == list(range(1, 13)) and answer["images"] == 12
    assert [str(root / h["name"]) for h in answer["data"]] == [h["image"] for h in cli]
    assert {h["image"] for h in cli} == paths and cli[0]["image"].endswith("green_triangle_right_black.png")
    assert [round(h["score"], 4) for h in answer["data"]] == [h["score"] for h in cli]
    top = search(server, {"query": "blue square"})["data"]
    assert len(top) == 8 and top[0]["name"].startswith("blue_square")  # top_k defaults to 8


def test_images_are_served_by_id_with_their_content_type(server, scene_index):
    root, _, names = scene_index
    hits = search(server, {"query": "yellow circle", "top_k": 12})["data"]
    for hit in hits:
        r = httpx.get(server.url + hit["url"])
        kind = "image/jpeg" if hit["name"].endswith(".jpg") else "image/png"
        assert r.status_code == 200 and r.headers["content-type"] == kind, hit
        assert r.headers["x-content-type-options"] == "nosniff"
        assert r.content == (root / hit["name"]).read_bytes()
    assert hit["url"] == f"/v1/search/images/{hit['id']}"
    assert any(h["name"] == JPEG for h in hits)


@pytest.mark.parametrize("image_id", ["12", "99999999999999999999", "-1", "01", "1.0", "abc", " 1", "%C2%B3",
                                      "..%2F..%2Fetc%2Fpasswd", "%2Fetc%2Fpasswd", "%2E%2E", "~"])
def test_ids_not_in_the_index_are_404(server, scene_index, image_id):
    r = httpx.get(f"{server.url}/v1/search/images/{image_id}")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error", (image_id, r.text)


def test_an_indexed_path_is_no_id(server, scene_index):
    root, _, names = scene_index
    for path in (str(root / sorted(names)[0]), "/etc/passwd"):
        quoted = urllib.parse.quote(path, safe="")
        for url in (f"/v1/search/images/{quoted}", f"/v1/search/images/{path}", f"/v1/search/images?path={quoted}"):
            r = httpx.get(server.url + url)
            assert r.status_code in (404, 405) and "error" in r.json(), url


BAD = [
    ("empty", {"query": ""}, "query"),
    ("blank", {"query": "   \n"}, "blank"),
    ("too many characters", {"query": "x" * (MAX_QUERY_CHARS + 1)}, "query"),
    ("too many tokens", {"query": "blue square " * 20}, "tokens long"),
    ("top_k 0", {"query": "red", "top_k": 0}, "top_k"),
    ("top_k too big", {"query": "red", "top_k": MAX_TOP_K + 1}, "top_k"),
    ("top_k not a number", {"query": "red", "top_k": "many"}, "top_k"),
    ("query not a string", {"query": ["red"]}, "query"),
    ("no query", {"top_k": 3}, "query"),
    ("misspelt field", {"query": "red", "topk": 3}, "topk"),
]


@pytest.mark.parametrize("what,body,message", BAD, ids=[b[0] for b in BAD])
def test_bad_queries_are_400_and_the_server_keeps_serving(server, scene_index, what, body, message):
    error = search(server, body, 400)["error"]
    assert error["type"] == "invalid_request_error" and message in error["message"], error
    assert search(server, {"query": "red circle", "top_k": 1})["data"][0]["name"].startswith("red_circle")


def test_a_body_that_is_not_json_is_400(server, scene_index):
    r = httpx.post(server.url + "/v1/search", content=b"{nope", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]


def test_concurrent_searches_equal_sequential_ones_and_never_compile(server, index_search):
    compiled = index_search.engine._fn("text")._cache_size()
    queries = [f"{c} {s}" for c in ("red", "green", "blue", "yellow") for s in ("circle", "square", "triangle")]
    queries += [f"{q} on the left in the white background " * k for k, q in enumerate(queries[:3], 1)]  # longer
    ask = lambda q: [(h["id"], h["score"]) for h in search(server, {"query": q, "top_k": 5})["data"]]  # noqa: E731
    sequential = [ask(q) for q in queries]
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        assert list(pool.map(ask, queries * 2)) == sequential * 2
    assert index_search.engine._fn("text")._cache_size() == compiled  # warm_up compiled every length


def test_without_an_index_search_is_404_and_the_page_is_told(model, tmp_path):
    from fastapi.testclient import TestClient
    client = TestClient(build_app(model, Processor.from_pretrained(DEFAULT_MODEL), ServerSettings(model_name="demo")))
    assert client.get("/v1/search/index").json() == {"loaded": False}
    for r in (client.post("/v1/search", json={"query": "red"}), client.get("/v1/search/images/0")):
        assert r.status_code == 404 and r.json()["error"]["code"] == "no_index", r.text
        assert "jblip serve --index" in r.json()["error"]["message"]


def test_serve_with_a_folder_that_is_no_index_fails_in_one_line(tmp_path, capsys, private_xla_cache):
    assert main(["serve", "--index", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "index.json" in err and "Traceback" not in err
