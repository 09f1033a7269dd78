"""The HTTP side of ``cart serve``: a Starlette app over a :class:`SearchEngine` and a micro-batcher.

Routes:

  POST /search   ``{"query": str, "k": int?, "modality": str?}`` ->
                 ``{"query", "k", "modality", "results": [{"rank", "id", "identifier", "score",
                 "modality", "media_url", "media_type"[, "logp", "cos"]}], "step"}``;
                 batch form ``{"queries": [str, ...], "k"?, "modality"?}`` ->
                 ``{"queries": [{"query", "results"}, ...], "k", "modality", "step"}``.
  GET  /healthz  ``{"status": "ok", ...the run's info}`` (503 ``"draining"`` while shutting down).
  GET  /metrics  requests and responses by status, queries, batches, the batch size histogram
                 (queries per executed batch, and the compiled size each ran at), latency
                 percentiles (end to end per /search request, and per batch search call), queue
                 depth, and the /search requests in flight.
  GET  /         the search page (``static/index.html``: self-contained, nothing loaded from elsewhere).
  GET  /media/<item id>  the item's media file; ids are looked up, never used as paths
                 (:meth:`SearchEngine.media_file`): an unknown id is 404, a file whose real path
                 leaves the corpus directory and the served media roots (the engine's module
                 docstring) is 403, and so is one whose name is no image, audio or video type.
                 Served with ``nosniff`` and a Content-Security-Policy with ``sandbox``.

Errors are JSON ``{"error": message}``: 400 for a malformed request (bad JSON, JSON nested deeper
than ``MAX_JSON_DEPTH``, missing or empty query, a query that is not valid text (a lone surrogate
such as ``"\\ud800"``, which no UTF-8 text holds), a bad ``k`` or ``modality``, an unknown field),
413 for an oversized body or query, 415 for a content type other than JSON, 503 when the request
queue is full or the server is draining. Anything else that fails while answering is a bug, not
the request's fault: 500 with a JSON error naming the exception's type (its traceback goes to the
log), counted in ``/metrics`` like every other response.
"""
from __future__ import annotations

import contextlib
import json
import logging
import time
from importlib import resources

from cart_jax.data.corpus import has_visible_text
from cart_jax.serve.batcher import Metrics, MicroBatcher, QueueFull
from cart_jax.serve.engine import MEDIA_TYPES, Query

log = logging.getLogger("cart.serve")

MAX_BODY_BYTES = 1 << 20  # 1 MiB
MAX_JSON_DEPTH = 16  # arrays/objects inside each other; a request needs 2 ({"queries": [...]})
DEFAULT_MAX_QUERY_CHARS = 1000
DEFAULT_MAX_QUERIES = 256  # per batch-form request
_FIELDS = {"query", "queries", "k", "modality"}


class RequestError(Exception):
  """A bad request: its HTTP status and the message sent back."""

  def __init__(self, status: int, message: str):
    super().__init__(message)
    self.status = status
    self.message = message


def page_html() -> str:
  """The search page (package data ``cart_jax/serve/static/index.html``)."""
  return resources.files("cart_jax.serve").joinpath("static", "index.html").read_text("utf-8")


def parse_search(body: bytes, content_type: str, *, max_k: int, modalities: dict,
                 max_query_chars: int = DEFAULT_MAX_QUERY_CHARS,
                 max_queries: int = DEFAULT_MAX_QUERIES) -> tuple[list[Query], bool]:
  """A /search body -> (queries, batch form?); RequestError naming the problem otherwise."""
  if content_type.split(";")[0].strip().lower() != "application/json":
    raise RequestError(415, f"Content-Type must be application/json, found {content_type or 'none'!r}")
  if len(body) > MAX_BODY_BYTES:
    raise RequestError(413, f"request body is {len(body)} bytes; at most {MAX_BODY_BYTES}")
  try:
    doc = json.loads(body)
  except RecursionError:  # the C decoder stops at the interpreter's recursion limit
    raise RequestError(400, f"body is nested deeper than {MAX_JSON_DEPTH} levels of arrays and "
                       "objects") from None
  except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError; an integer over 4300 digits
    raise RequestError(400, f"body is not valid JSON: {e}") from None
  if json_depth(doc) > MAX_JSON_DEPTH:
    raise RequestError(400, f"body is nested deeper than {MAX_JSON_DEPTH} levels of arrays and "
                       "objects")
  if not isinstance(doc, dict):
    raise RequestError(400, f"body must be a JSON object, found {type(doc).__name__}")
  unknown = sorted(set(doc) - _FIELDS)
  if unknown:
    raise RequestError(400, f"unknown field(s) {unknown}; expected {sorted(_FIELDS)}")
  if ("query" in doc) == ("queries" in doc):
    raise RequestError(400, "give either 'query' (a string) or 'queries' (a list of strings)"
                       + (", not both" if "query" in doc else ""))
  k = doc.get("k", min(10, max_k))
  if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= max_k:
    raise RequestError(400, f"'k' must be an integer from 1 to {max_k}, found {k!r}")
  modality = doc.get("modality")
  if modality is not None:
    if not isinstance(modality, str) or modality not in modalities:
      listed = ", ".join(f"{m} ({n} items)" for m, n in modalities.items()) or "none known"
      raise RequestError(400, f"unknown modality {modality!r}; this index holds: {listed}")
  batch = "queries" in doc
  texts = doc["queries"] if batch else [doc["query"]]
  if batch:
    if not isinstance(texts, list) or not texts:
      raise RequestError(400, f"'queries' must be a non-empty list of strings, found {texts!r:.80}")
    if len(texts) > max_queries:
      raise RequestError(413, f"'queries' holds {len(texts)} queries; at most {max_queries} per request")
  for i, text in enumerate(texts):
    where = f"'queries'[{i}]" if batch else "'query'"
    if not isinstance(text, str):
      raise RequestError(400, f"{where} must be a string, found {type(text).__name__}")
    try:
      text.encode("utf-8")
    except UnicodeEncodeError as e:  # JSON's "\\ud800" escapes decode to a lone surrogate
      raise RequestError(400, f"{where} is not valid text: it holds the lone surrogate "
                         f"{text[e.start]!r} at position {e.start} (half of a UTF-16 pair; no "
                         "character)") from None
    if not has_visible_text(text):
      raise RequestError(400, f"{where} is empty ({text!r:.40}): give some words to search for")
    if len(text) > max_query_chars:
      raise RequestError(413, f"{where} is {len(text)} characters; at most {max_query_chars}")
  return [Query(t, k, modality) for t in texts], batch


def json_depth(doc) -> int:
  """How deeply arrays and objects nest in a decoded JSON value (a scalar: 0). Iterative; stops
  counting once past ``MAX_JSON_DEPTH``."""
  deepest, stack = 0, [(doc, 1)] if isinstance(doc, (dict, list)) else []
  while stack and deepest <= MAX_JSON_DEPTH:
    node, depth = stack.pop()  # a dict or a list
    deepest = max(deepest, depth)
    values = node.values() if isinstance(node, dict) else node
    stack.extend((v, depth + 1) for v in values if isinstance(v, (dict, list)))
  return deepest


def create_app(engine, *, max_batch: int = 16, max_wait_ms: float = 5.0, queue_size: int = 256,
               max_query_chars: int = DEFAULT_MAX_QUERY_CHARS,
               max_queries: int = DEFAULT_MAX_QUERIES, run_batch=None):
  """The Starlette app serving ``engine`` (a :class:`SearchEngine`).

  Args:
    max_batch, max_wait_ms, queue_size: the micro-batcher's (:class:`MicroBatcher`).
    run_batch: what the batcher calls with a batch of queries (default ``engine.search``).
  """
  from starlette.applications import Starlette  # pylint: disable=g-import-not-at-top
  from starlette.requests import Request  # pylint: disable=g-import-not-at-top
  from starlette.responses import FileResponse, HTMLResponse, JSONResponse  # pylint: disable=g-import-not-at-top
  from starlette.routing import Route  # pylint: disable=g-import-not-at-top

  from cart_jax.core.errors import CartError  # pylint: disable=g-import-not-at-top
  from cart_jax.inference.searcher import NonFiniteError  # pylint: disable=g-import-not-at-top

  metrics = Metrics()
  batcher = MicroBatcher(run_batch or engine.search, max_batch=max_batch,
                         max_wait_s=max_wait_ms / 1e3, queue_size=queue_size,
                         padded_size=engine.padded_size, metrics=metrics)
  info = engine.info()
  state = {"draining": False}
  html = page_html()

  def counted(endpoint: str, status: int, response):
    metrics.requests[endpoint] += 1
    metrics.responses[status] += 1
    return response

  def reply(endpoint: str, status: int, doc: dict) -> JSONResponse:
    # JSONResponse renders at once: a failure to render is not counted twice
    return counted(endpoint, status, JSONResponse(doc, status_code=status))

  def guarded(endpoint: str, handler):
    """``handler`` with whatever it raises answered as a counted 500 (traceback to the log)."""
    async def route(request: Request):
      try:
        return await handler(request)
      except Exception as e:  # pylint: disable=broad-except  (a bug, not the request's fault)
        log.exception("%s %s failed", request.method, endpoint)
        return reply(endpoint, 500, {"error": f"internal error ({type(e).__name__}); see the "
                                              "server's log"})
    return route

  async def search(request: Request):
    metrics.in_flight += 1
    try:
      return await _search(request)
    finally:
      metrics.in_flight -= 1

  async def _search(request: Request):
    t0 = time.perf_counter()
    try:
      body = await _read_body(request)
      queries, batch = parse_search(body, request.headers.get("content-type", ""),
                                    max_k=engine.beam, modalities=engine.modalities,
                                    max_query_chars=max_query_chars, max_queries=max_queries)
      results = await batcher.submit(queries)
    except RequestError as e:
      return reply("/search", e.status, {"error": e.message})
    except QueueFull as e:
      metrics.rejected += 1
      return reply("/search", 503, {"error": str(e)})
    except NonFiniteError as e:  # the run's parameters, not the request: a server error
      log.error("%s", e)
      return reply("/search", 500, {"error": str(e)})
    except CartError as e:  # e.g. a modality without items: named, not a 500
      return reply("/search", 400, {"error": str(e)})
    metrics.latencies_ms.append((time.perf_counter() - t0) * 1e3)
    return reply("/search", 200, _search_doc(queries, results, batch, info["step"]))

  async def healthz(request: Request):
    if state["draining"]:
      return reply("/healthz", 503, {"status": "draining"})
    return reply("/healthz", 200, dict(status="ok", **info))

  async def metrics_route(request: Request):
    doc = metrics.snapshot(batcher.depth)  # counts this request from the next snapshot on
    return counted("/metrics", 200, JSONResponse(doc))

  async def index_page(request: Request):
    return counted("/", 200, HTMLResponse(html, headers={"Content-Security-Policy": _CSP}))

  async def media(request: Request):
    item_id = request.path_params["item_id"]
    status, found = _media_of(engine, item_id)
    if status != 200:
      return reply("/media", status, found)
    path, media_type = found
    return counted("/media", 200, FileResponse(path, media_type=media_type, headers={
        "X-Content-Type-Options": "nosniff", "Content-Security-Policy": _MEDIA_CSP,
        "Cache-Control": "max-age=3600"}))

  @contextlib.asynccontextmanager
  async def lifespan(app):
    await batcher.start()
    try:
      yield
    finally:
      state["draining"] = True
      await batcher.stop()  # every queued request is answered first

  app = Starlette(routes=[
      Route("/search", guarded("/search", search), methods=["POST"]),
      Route("/healthz", guarded("/healthz", healthz), methods=["GET"]),
      Route("/metrics", guarded("/metrics", metrics_route), methods=["GET"]),
      Route("/", guarded("/", index_page), methods=["GET"]),
      Route("/media/{item_id:path}", guarded("/media", media), methods=["GET"]),
  ], lifespan=lifespan)
  app.state.batcher = batcher
  app.state.metrics = metrics
  app.state.engine = engine
  return app


async def _read_body(request) -> bytes:
  """The request's body; a RequestError 413 once it is over MAX_BODY_BYTES (declared or read)."""
  declared = request.headers.get("content-length")
  if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
    raise RequestError(413, f"request body is {declared} bytes; at most {MAX_BODY_BYTES}")
  chunks, size = [], 0
  async for chunk in request.stream():
    size += len(chunk)
    if size > MAX_BODY_BYTES:
      raise RequestError(413, f"request body is over {MAX_BODY_BYTES} bytes")
    chunks.append(chunk)
  return b"".join(chunks)


def _search_doc(queries: list[Query], results: list, batch: bool, step) -> dict:
  """The JSON answer of ``POST /search``: one query's results, or each query's (a batch)."""
  k, modality = queries[0].k, queries[0].modality
  if batch:
    doc = {"queries": [{"query": q.text, "results": r} for q, r in zip(queries, results)]}
  else:
    doc = {"query": queries[0].text, "results": results[0]}
  doc.update(k=k, modality=modality, step=step)
  return doc


def _media_of(engine, item_id: str):
  """``(200, (path, media type))`` of the item's media file to serve, or ``(status, error doc)``
  when there is none (404) or it may not be served from this origin (403, logged)."""
  from cart_jax.core.errors import CartError  # pylint: disable=g-import-not-at-top
  try:
    path = engine.media_file(item_id)
  except CartError as e:  # the real path leaves the corpus: refused, and said so in the log only
    log.warning("refused media of item %r: %s", item_id, e)
    return 403, {"error": f"the media of item {item_id!r} lie outside the corpus "
                          "directory and the served media roots; not served"}
  if path is None:
    return 404, {"error": f"no media for item id {item_id!r} (not an item of the served index)"}
  media_type = engine.media_type(item_id)
  if media_type.split("/")[0] not in MEDIA_TYPES:  # .html, .svgz, .js...: never on this origin
    log.warning("refused media of item %r: not an image, audio or video file", item_id)
    return 403, {"error": f"the media of item {item_id!r} are not an image, audio "
                          "or video file; not served"}
  return 200, (path, media_type)


# The page loads nothing from elsewhere: its own script and style, media from /media.
_CSP = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
        "img-src 'self'; media-src 'self'; connect-src 'self'")
# A media file opened on its own (an SVG can hold script): no script, no requests, a sandbox.
_MEDIA_CSP = "default-src 'none'; img-src 'self'; media-src 'self'; style-src 'unsafe-inline'; sandbox"
