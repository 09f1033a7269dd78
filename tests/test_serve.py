"""``cart serve`` (cart_jax/serve/): the HTTP contract against the library's search on one tiny run.

The app runs in process under Starlette's TestClient (lifespan included: the micro-batcher's
worker); the SIGTERM test starts ``cart serve`` as a subprocess on a free port. Results must be
the library's (``api.search`` on the same run, same beam): ids and identifiers exactly, scores to
float32 rounding (a query padded into a batch of 4 runs through another compiled program than
``cart search``'s batch of 1).
"""
import json
import os
import signal
import subprocess
import sys
import threading
import time
import types
import warnings
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pytest

pytest.importorskip("starlette")
pytest.importorskip("httpx")
with warnings.catch_warnings():  # Starlette >= 1.0 prefers httpx2; httpx (declared in setup.py) works
  warnings.simplefilter("ignore")
  from starlette.testclient import TestClient  # pylint: disable=g-import-not-at-top

from cart_jax import api  # pylint: disable=g-import-not-at-top
from cart_jax.serve import ServeConfig, SearchEngine, ServeError, compiled_batch_sizes  # pylint: disable=g-import-not-at-top
from cart_jax.serve.app import create_app  # pylint: disable=g-import-not-at-top
from tiny_runs import REPO, free_port  # pylint: disable=g-import-not-at-top

QUERIES = ["grinning face", "smiling cat", "red heart", "thumbs up", "a dog"]


pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def world(served_run):
  t = types.SimpleNamespace(**vars(served_run))  # the session's run; this module adds its engine
  engine = SearchEngine.from_run(t.run, batch_sizes=(1, 4), log=lambda s: None)
  engine.warm_up(log=lambda s: None)
  t.engine = engine
  t.expected = {k: api.search(t.run, QUERIES, k=k, beam=10, log=lambda s: None) for k in (3, 10)}
  return t


@pytest.fixture(scope="module")
def client(world):
  with TestClient(create_app(world.engine, max_batch=4, max_wait_ms=20, queue_size=64)) as c:
    yield c


def _same(got: list, want: list) -> None:
  """Server results (``id``...) equal ``api.search`` results (``item_id``...)."""
  assert [r["id"] for r in got] == [r["item_id"] for r in want]
  assert [r["identifier"] for r in got] == [r["identifier"] for r in want]
  assert [r["rank"] for r in got] == [r["rank"] for r in want]
  np.testing.assert_allclose([r["score"] for r in got], [r["score"] for r in want], rtol=1e-4, atol=1e-4)
  for r in got:
    assert r["modality"] == "image" and r["media_type"] == "image/png"
    assert r["media_url"] == "/media/" + quote(r["id"], safe="")


def test_search_equals_the_librarys(world, client):
  for i, q in enumerate(QUERIES):
    for k in (3, 10):
      resp = client.post("/search", json={"query": q, "k": k})
      assert resp.status_code == 200, resp.text
      doc = resp.json()
      assert doc["query"] == q and doc["k"] == k and doc["step"] == 6 and doc["modality"] is None
      _same(doc["results"], world.expected[k][i]["results"])
  # k defaults to 10; the modality the index holds may be named
  doc = client.post("/search", json={"query": QUERIES[0], "modality": "image"}).json()
  assert doc["k"] == 10 and doc["modality"] == "image"
  _same(doc["results"], world.expected[10][0]["results"])


def test_batch_form(world, client):
  # 5 queries: over max_batch 4, so one request runs alone in chunks of the largest compiled size
  resp = client.post("/search", json={"queries": QUERIES, "k": 3})
  assert resp.status_code == 200, resp.text
  doc = resp.json()
  assert [q["query"] for q in doc["queries"]] == QUERIES and doc["k"] == 3
  for got, want in zip(doc["queries"], world.expected[3]):
    _same(got["results"], want["results"])


def test_concurrent_requests_are_batched_and_answered_right(world):
  app = create_app(world.engine, max_batch=4, max_wait_ms=200, queue_size=64)
  got = {}
  with TestClient(app) as c:
    def one(i):
      got[i] = c.post("/search", json={"query": QUERIES[i % 5], "k": 3})
    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
      t.start()
    for t in threads:
      t.join(60)
    m = c.get("/metrics").json()
  for i, resp in got.items():
    assert resp.status_code == 200
    _same(resp.json()["results"], world.expected[3][i % 5]["results"])
  assert len(got) == 8 and m["queries"] == 8 and m["requests"]["/search"] == 8
  hist = {int(b): n for b, n in m["batch_size_histogram"].items()}
  assert sum(b * n for b, n in hist.items()) == 8 and max(hist) <= 4
  assert m["batches"] < 8 and max(hist) > 1  # 200 ms of waiting gathers concurrent requests
  assert set(m["padded_batch_size_histogram"]) <= {"1", "4"}


BAD = [  # (body or raw bytes, content type, status, words of the message)
    ({}, None, 400, "give either 'query'"),
    ({"query": ""}, None, 400, "'query' is empty"),
    ({"query": " \u200b "}, None, 400, "'query' is empty"),
    ({"query": 42}, None, 400, "'query' must be a string"),
    ({"query": "x" * 1001}, None, 413, "1001 characters; at most 1000"),
    ({"query": "cat", "k": 0}, None, 400, "'k' must be an integer from 1 to 10, found 0"),
    ({"query": "cat", "k": 11}, None, 400, "from 1 to 10, found 11"),
    ({"query": "cat", "k": "3"}, None, 400, "found '3'"),
    ({"query": "cat", "k": 2.5}, None, 400, "found 2.5"),
    ({"query": "cat", "k": True}, None, 400, "found True"),
    ({"query": "cat", "modality": "audio"}, None, 400, "unknown modality 'audio'; this index holds: image (24 items)"),
    ({"query": "cat", "limit": 3}, None, 400, "unknown field(s) ['limit']"),
    ({"query": "cat", "queries": ["dog"]}, None, 400, "not both"),
    ({"queries": []}, None, 400, "non-empty list"),
    ({"queries": "cat"}, None, 400, "non-empty list"),
    ({"queries": ["cat", ""]}, None, 400, "'queries'[1] is empty"),
    ({"queries": ["cat"] * 257}, None, 413, "257 queries; at most 256"),
    (["cat"], None, 400, "must be a JSON object, found list"),
    (b'{"query": "cat"', "application/json", 400, "not valid JSON"),
    (b"\xff\xfe", "application/json", 400, "not valid JSON"),
    (b'{"query": "cat"}', "text/plain", 415, "Content-Type must be application/json"),
    (b'{"query": "cat"}', None, 415, "Content-Type must be application/json"),
    (b'{"query": "' + b"a" * (1 << 20) + b'"}', "application/json", 413, "request body is"),
]


@pytest.mark.parametrize("body,ctype,status,words", BAD, ids=[f"{i}" for i in range(len(BAD))])
def test_bad_requests_get_a_4xx_with_a_message(client, body, ctype, status, words):
  if isinstance(body, bytes):
    headers = {"content-type": ctype} if ctype else {}
    resp = client.post("/search", content=body, headers=headers)
  else:
    resp = client.post("/search", json=body)
  assert resp.status_code == status, resp.text
  assert words in resp.json()["error"]


HOSTILE = [  # (raw body, status, words of the message): issue 28, case 2. Before: 500, traceback.
    (b'{"query": "\\ud800"}', 400, "'query' is not valid text: it holds the lone surrogate '\\ud800'"),
    (b'{"queries": ["cat", "a \\udfff b"]}', 400, "'queries'[1] is not valid text"),
    (b"[" * 100_000, 400, "nested deeper than 16 levels"),
    (b'{"query": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400, "nested deeper than 16 levels"),
    (b'{"query": "cat", "k": 1' + b"0" * 5000 + b"}", 400, "not valid JSON"),
]


@pytest.fixture(scope="module")
def lenient_client(world):
  """A client that shows a server error as the 500 it is (the default client re-raises it)."""
  with TestClient(create_app(world.engine, max_batch=4, max_wait_ms=0, queue_size=8),
                  raise_server_exceptions=False) as c:
    yield c


@pytest.mark.parametrize("body,status,words", HOSTILE, ids=[f"{i}" for i in range(len(HOSTILE))])
def test_hostile_bodies_get_a_4xx_with_a_message(lenient_client, body, status, words):
  resp = lenient_client.post("/search", content=body, headers={"content-type": "application/json"})
  assert resp.status_code == status, resp.text
  assert words in resp.json()["error"], resp.json()


def test_a_server_error_is_json_and_counted(world):
  """A failure of the search itself (a bug, not the request) is a 500 with a JSON error and is
  counted in /metrics. Before: Starlette's plain-text 500, missing from /metrics."""
  def broken(queries):
    raise RuntimeError("boom")

  app = create_app(world.engine, max_batch=1, max_wait_ms=0, queue_size=4, run_batch=broken)
  with TestClient(app, raise_server_exceptions=False) as c:
    resp = c.post("/search", json={"query": "cat"})
    m = c.get("/metrics").json()
  assert resp.status_code == 500
  assert resp.json() == {"error": "internal error (RuntimeError); see the server's log"}
  assert m["responses"] == {"500": 1} and m["errors"] == 1 and m["requests"] == {"/search": 1}
  # Non-finite scores (corrupt parameters, issue 28 case 4) are the server's fault: 500, named.
  from cart_jax.inference.searcher import NonFiniteError

  def non_finite(queries):
    raise NonFiniteError("the search gave non-finite scores")

  app = create_app(world.engine, max_batch=1, max_wait_ms=0, queue_size=4, run_batch=non_finite)
  with TestClient(app, raise_server_exceptions=False) as c:
    resp = c.post("/search", json={"query": "cat"})
  assert resp.status_code == 500 and resp.json() == {"error": "the search gave non-finite scores"}


def test_wrong_method_and_unknown_route(client):
  assert client.get("/search").status_code == 405
  assert client.get("/nowhere").status_code == 404


def test_a_full_queue_answers_503_at_once(world):
  """Queue size 1: one request being searched (held), one waiting, the third refused."""
  release, entered = threading.Event(), threading.Event()

  def held_search(queries):
    entered.set()
    assert release.wait(30)
    return world.engine.search(queries)

  app = create_app(world.engine, max_batch=1, max_wait_ms=0, queue_size=1, run_batch=held_search)
  with TestClient(app) as c:
    got = {}

    def one(i):
      got[i] = c.post("/search", json={"query": QUERIES[i], "k": 3})
    first = threading.Thread(target=one, args=(0,))
    first.start()
    assert entered.wait(30)  # the worker holds request 0
    second = threading.Thread(target=one, args=(1,))
    second.start()
    deadline = time.monotonic() + 30
    while c.get("/metrics").json()["queue_depth"] < 1:
      assert time.monotonic() < deadline
      time.sleep(0.01)
    t0 = time.perf_counter()
    third = c.post("/search", json={"query": QUERIES[2], "k": 3})
    assert third.status_code == 503 and "queue is full" in third.json()["error"]
    assert time.perf_counter() - t0 < 5  # refused at once, not after the held batch
    release.set()
    first.join(30)
    second.join(30)
    m = c.get("/metrics").json()
  for i in (0, 1):
    assert got[i].status_code == 200
    _same(got[i].json()["results"], world.expected[3][i]["results"])
  assert m["rejected_503"] == 1 and m["responses"]["503"] == 1 and m["responses"]["200"] >= 2


def test_healthz_and_metrics_count(world):
  with TestClient(create_app(world.engine, max_batch=4, max_wait_ms=0, queue_size=8)) as c:
    h = c.get("/healthz")
    assert h.status_code == 200
    info = h.json()
    assert info["status"] == "ok" and info["step"] == 6 and info["num_items"] == 24
    assert info["modalities"] == {"image": 24} and info["max_k"] == 10 and info["rerank_weight"] is None
    for q in QUERIES[:3]:
      assert c.post("/search", json={"query": q, "k": 2}).status_code == 200
    assert c.post("/search", json={"query": ""}).status_code == 400
    assert c.post("/search", json={"queries": QUERIES[:2]}).status_code == 200
    m = c.get("/metrics").json()
  assert m["requests"] == {"/healthz": 1, "/search": 5}  # /metrics counts itself after the snapshot
  assert m["responses"] == {"200": 5, "400": 1} and m["errors"] == 1
  assert m["queries"] == 5 and m["batches"] == 4  # nothing concurrent: one batch per request
  assert m["batch_size_histogram"] == {"1": 3, "2": 1}
  assert m["padded_batch_size_histogram"] == {"1": 3, "4": 1}
  lat = m["latency_ms"]
  assert lat["count"] == 4 and 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]


def test_media_only_the_index_items_inside_the_corpus(world, client, tmp_path):
  corpus = world.corpus
  item = corpus.items[0]
  resp = client.get(f"/media/{item.id}")
  assert resp.status_code == 200 and resp.headers["content-type"] == "image/png"
  assert resp.content == (corpus.root / item.media).read_bytes()
  odd = [it for it in corpus.items if it.id != quote(it.id, safe="")]
  for it in odd[:3]:  # ids that need percent-encoding come back through their media_url
    assert client.get("/media/" + quote(it.id, safe="")).status_code == 200
  for path in ("/media/no-such-item", "/media/corpus.json", "/media/items.jsonl",
               f"/media/{item.media}", "/media/..%2Fcorpus.json", "/media/%2E%2E/%2E%2E/etc/passwd",
               "/media/%2Fetc%2Fpasswd", "/media//etc/passwd", f"/media/{corpus.root / item.media}",
               "/media/", "/media/%00"):
    resp = client.get(path)
    assert resp.status_code == 404, path
    assert b"root:" not in resp.content and not resp.content.startswith(b"\x89PNG"), path

  # A corpus whose media file of one item is a symbolic link leading out of it: 403, never the file.
  import shutil
  from cart_jax.data.corpus import load_corpus
  copy = tmp_path / "corpus"
  shutil.copytree(corpus.root, copy, symlinks=True)
  secret = tmp_path / "secret.png"
  secret.write_bytes(b"\x89PNG secret outside the corpus")
  victim = corpus.items[1]
  (copy / victim.media).unlink()
  (copy / victim.media).symlink_to(secret)
  (copy / corpus.items[2].media).unlink()
  (copy / corpus.items[2].media).symlink_to("/etc/passwd")
  (copy / corpus.items[3].media).unlink()
  (copy / corpus.items[3].media).mkdir()  # a directory is no media file
  import dataclasses
  engine = SearchEngine(dataclasses.replace(world.engine.loaded, corpus=load_corpus(copy, check_media=False)),
                        batch_sizes=(1,))
  with TestClient(create_app(engine)) as c:
    for it in corpus.items[1:3]:
      resp = c.get("/media/" + quote(it.id, safe=""))
      assert resp.status_code == 403 and "outside the corpus" in resp.json()["error"]
      assert b"secret" not in resp.content and b"root:" not in resp.content
    assert c.get("/media/" + quote(corpus.items[3].id, safe="")).status_code == 404
    assert c.get("/media/" + quote(corpus.items[4].id, safe="")).status_code == 200


def _hostile_corpus(corpus, out):
  """A copy of ``corpus`` whose corpus.json declares ``/etc`` a media root, item 0's media link to
  /etc/passwd, item 1's are an HTML page, item 2's an SVG with a script, item 3's a PNG in a data
  folder outside the corpus (declared too)."""
  import shutil
  shutil.copytree(corpus.root, out, symlinks=True)
  header = json.loads((out / "corpus.json").read_text())
  data = out.parent / "datafolder"
  data.mkdir()
  (data / "d.png").write_bytes((corpus.root / corpus.items[3].media).read_bytes())
  header["media_roots"] = ["/etc", str(data)]
  (out / "corpus.json").write_text(json.dumps(header))
  items = [json.loads(line) for line in (out / "items.jsonl").read_text().splitlines()]
  (out / "media" / "passwd.png").symlink_to("/etc/passwd")
  (out / "media" / "page.html").write_text("<script>alert(document.cookie)</script>")
  (out / "media" / "pic.svg").write_text('<svg xmlns="http://www.w3.org/2000/svg"><script>'
                                         'alert(1)</script></svg>')
  (out / "media" / "d.png").symlink_to(data / "d.png")
  for i, name in enumerate(("passwd.png", "page.html", "pic.svg", "d.png")):
    items[i]["media"] = f"media/{name}"
  (out / "items.jsonl").write_text("".join(json.dumps(it) + "\n" for it in items))
  return data


def test_media_roots_and_types_a_corpus_declares_are_not_trusted(world, tmp_path):
  """Issue 28, case 3. Before: /media served /etc/passwd (the corpus declared /etc a media root),
  the HTML page as text/html and the SVG as image/svg+xml, both without a Content-Security-Policy
  (stored script on the server's origin)."""
  import dataclasses
  from cart_jax.data.corpus import load_corpus
  corpus = world.corpus
  data = _hostile_corpus(corpus, tmp_path / "corpus")
  loaded = dataclasses.replace(world.engine.loaded, corpus=load_corpus(tmp_path / "corpus",
                                                                       check_media=False))
  url = ["/media/" + quote(it.id, safe="") for it in corpus.items[:5]]
  engine = SearchEngine(loaded, batch_sizes=(1,))
  assert engine.unserved_media_roots == (Path("/etc"), data)
  with TestClient(create_app(engine)) as c:
    resp = c.get(url[0])
    assert resp.status_code == 403 and b"root:" not in resp.content
    assert "outside the corpus directory and the served media roots" in resp.json()["error"]
    resp = c.get(url[1])
    assert resp.status_code == 403 and b"<script>" not in resp.content
    assert "not an image, audio or video file" in resp.json()["error"]
    resp = c.get(url[2])  # an image type, but opened alone it would run its script: sandboxed
    assert resp.status_code == 200 and resp.headers["content-type"] == "image/svg+xml"
    assert "sandbox" in resp.headers["content-security-policy"]
    assert "default-src 'none'" in resp.headers["content-security-policy"]
    assert resp.headers["x-content-type-options"] == "nosniff"
    assert c.get(url[3]).status_code == 403  # the data folder: not named at serve time
    resp = c.get(url[4])
    assert resp.status_code == 200 and resp.headers["content-type"] == "image/png"
    assert "sandbox" in resp.headers["content-security-policy"]
    found = {r["id"]: r["media_type"] for r in engine.describe(np.arange(5), np.zeros(5))}
    assert found[corpus.items[1].id] == "application/octet-stream"
    m = c.get("/metrics").json()
  assert m["responses"] == {"200": 2, "403": 3}
  # Named at serve time (cart serve --media-root DIR): served from.
  engine = SearchEngine(loaded, batch_sizes=(1,), media_roots=[str(data)])
  assert engine.unserved_media_roots == (Path("/etc"),)
  with TestClient(create_app(engine)) as c:
    resp = c.get(url[3])
    assert resp.status_code == 200 and resp.content == (data / "d.png").read_bytes()
    assert c.get(url[0]).status_code == 403
  # A corpus the run was built from (run.json's corpus_sources, written by `cart index add`): too.
  built_from = dataclasses.replace(loaded, run=dict(loaded.run, corpus_sources=[str(data)]))
  assert SearchEngine(built_from, batch_sizes=(1,)).unserved_media_roots == (Path("/etc"),)
  with pytest.raises(ServeError, match="--media-root /nonexistent: not a directory"):
    SearchEngine(loaded, batch_sizes=(1,), media_roots=["/nonexistent"])


def test_page_is_self_contained(client):
  resp = client.get("/")
  assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/html")
  html = resp.text
  assert 'id="query"' in html and 'fetch("/search"' in html
  assert "http://" not in html and "https://" not in html and "//cdn" not in html  # nothing from elsewhere
  assert "default-src 'none'" in resp.headers["content-security-policy"]


def test_settings_that_cannot_work_are_named():
  assert compiled_batch_sizes(16) == (1, 4, 16) and compiled_batch_sizes(10) == (1, 4, 10)
  assert compiled_batch_sizes(1) == (1,) and compiled_batch_sizes(8, [2]) == (2, 8)
  with pytest.raises(ServeError, match="larger than --max-batch 4"):
    compiled_batch_sizes(4, [8])
  for bad, words in ((dict(port=70000), "--port"), (dict(queue_size=0), "--queue-size"),
                     (dict(max_batch=0), "--max-batch"), (dict(max_wait_ms=-1), "--max-wait-ms")):
    with pytest.raises(ServeError, match=words):
      ServeConfig(**bad).check()
  from cart_jax.cli.main import main
  assert main(["serve", "--model-dir", "/nonexistent/run", "--port", "0"]) == 2


def test_rerank_equals_the_librarys(world):
  engine = SearchEngine.from_run(world.run, batch_sizes=(4,), rerank=True, log=lambda s: None)
  want = api.search(world.run, QUERIES[:3], k=5, beam=10, rerank=True, log=lambda s: None)
  with TestClient(create_app(engine, max_batch=4)) as c:
    doc = c.post("/search", json={"queries": QUERIES[:3], "k": 5}).json()
    weight = c.get("/healthz").json()["rerank_weight"]
  stored = json.loads((world.run / "rerank" / "meta.json").read_text())["weight"]
  assert weight == stored
  for got, w in zip(doc["queries"], want):
    _same(got["results"], w["results"])
    np.testing.assert_allclose([r["cos"] for r in got["results"]], [r["cos"] for r in w["results"]],
                               rtol=1e-4, atol=1e-4)


def test_sigterm_answers_the_request_in_flight_and_exits_0(world, tmp_path):
  """A slow request (300 queries, one compiled batch of 1 at a time) is answered after SIGTERM."""
  port = free_port()
  env = dict(os.environ, PYTHONUNBUFFERED="1")
  err = open(tmp_path / "stderr.txt", "w")
  proc = subprocess.Popen([sys.executable, "-m", "cart_jax.cli.main", "serve", "--model-dir",
                           str(world.run), "--port", str(port), "--max-batch", "1", "--no-verify"],
                          cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=err)
  import httpx
  base = f"http://127.0.0.1:{port}"
  try:
    deadline = time.monotonic() + 120
    while True:
      assert proc.poll() is None, (tmp_path / "stderr.txt").read_text()
      try:
        if httpx.get(base + "/healthz", timeout=2).status_code == 200:
          break
      except httpx.TransportError:
        pass
      assert time.monotonic() < deadline, "server did not start"
      time.sleep(0.2)
    result = {}

    def slow():
      result["resp"] = httpx.post(base + "/search", json={"queries": [QUERIES[i % 5] for i in range(256)],
                                                          "k": 2}, timeout=120)
    t = threading.Thread(target=slow)
    t.start()
    while httpx.get(base + "/metrics", timeout=5).json()["in_flight"] < 1:
      time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    t.join(120)
    rc = proc.wait(60)
  finally:
    if proc.poll() is None:
      proc.kill()
    err.close()
  log = (tmp_path / "stderr.txt").read_text()
  assert rc == 0, log
  resp = result["resp"]
  assert resp.status_code == 200
  doc = resp.json()
  assert len(doc["queries"]) == 256
  _same(doc["queries"][0]["results"], world.expected[3][0]["results"][:2])
  assert "compiled the search for batch size 1" in log and "stopped by SIGTERM" in log
  with pytest.raises(httpx.TransportError):  # nothing listens any more
    httpx.get(base + "/healthz", timeout=2)
