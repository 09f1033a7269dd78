"""Load test of ``cart serve``: queries/s and latency under N concurrent clients, next to ``cart eval``.

Run (2-core CPU: about 2 min to train the run once, then about 2 min per measurement):
  python benchmarks/serve_load.py --json benchmarks/results/serve_load_cpu.json \
      --plot benchmarks/results/serve_load_cpu.png
  python benchmarks/serve_load.py --model-dir /tmp/cart_emoji ...   # an existing run instead
  python benchmarks/serve_load.py ... --screenshot docs/serve_screenshot.png   # also the page (Chromium)

What it does:
  1. The run: unless ``--model-dir`` is given, ``cart demo``'s emoji recipe on the first ``--limit``
     emoji (``cart demo``: built-in item encoder, identifiers, CART over the frozen MiniLM, the
     re-ranker), in ``--workdir`` (default ``$TMPDIR/cart-serve-load-<settings>``); a second
     invocation reuses it.
  2. Offline: ``cart eval``'s queries/s on the same run (``api.evaluate``, test split, the batch
     sizes of ``--eval-batch``): the batch throughput the server is compared with.
  3. ``cart serve`` in a subprocess on 127.0.0.1 (``--max-batch``, ``--max-wait-ms``,
     ``--queue-size``), its start-up time (process start to a healthy ``/healthz``).
  4. For each ``--concurrency`` C: C clients (asyncio + httpx, one connection each) post single
     queries (the test split's query texts, in turn) back to back, after a warm-up of 2 x C
     requests, until ``--seconds`` have passed or ``--max-requests`` were sent. Per row: requests,
     errors (non-200 or transport), q/s (answered requests / wall time), client-side latency
     p50/p90/p99, and from the server's ``/metrics`` (difference before/after) the number of
     batches, mean queries per batch and the batch size histogram; and the CPU seconds per second
     the server process and the clients used meanwhile (``/proc/<pid>/stat``, ``os.times``).
  5. SIGTERM to the server; its exit code is recorded (0: drained).
The clients run in this process on the same machine as the server: on a 2-core CPU they take
some of the CPU the server would otherwise use, so the server's q/s is a lower bound. The 1-minute
load average is recorded before and after. JSON and plot are written atomically.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python benchmarks/serve_load.py` from a checkout
  sys.path.insert(0, str(ROOT))

from benchmarks.driver_common import load_average as _load  # noqa: E402
from benchmarks.driver_common import log as _log  # noqa: E402
from benchmarks.driver_common import save_figure  # noqa: E402
from benchmarks.driver_common import train_done as _train_done  # noqa: E402
from cart_jax.core.artefacts import atomic_write_json, atomic_write_via  # noqa: E402

FORMAT = "cart-serve-load"
VERSION = 1


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _percentiles(values: list[float]) -> dict:
  import numpy as np  # pylint: disable=g-import-not-at-top
  if not values:
    return {"p50": None, "p90": None, "p99": None, "max": None}
  p50, p90, p99 = np.percentile(np.asarray(values), [50, 90, 99])
  return {"p50": round(float(p50), 2), "p90": round(float(p90), 2), "p99": round(float(p99), 2),
          "max": round(float(max(values)), 2)}


def ensure_run(args) -> Path:
  """The run to serve: ``--model-dir``, or the emoji demo's pipeline trained once in the work dir.

  Each stage is skipped when its output is there (an interrupted run resumes).
  """
  if args.model_dir:
    return Path(args.model_dir)
  from cart_jax import api  # pylint: disable=g-import-not-at-top
  from cart_jax.cli import gin_bridge  # pylint: disable=g-import-not-at-top
  from cart_jax.data.embeddings import BuiltinEmbedOptions, embedding_files  # pylint: disable=g-import-not-at-top
  from cart_jax.index.identifiers import IdentifierConfig  # pylint: disable=g-import-not-at-top
  work = Path(args.workdir or Path(tempfile.gettempdir()) /
              f"cart-serve-load-l{args.limit}-e{args.embed_steps}-t{args.train_steps}")
  corpus, emb, index, run = work / "corpus", work / "emb" / "E.npy", work / "index", work / "cart"
  if _train_done(run, args.train_steps) is not None:
    _log(f"reusing the trained run {run}")
    return run
  t0 = time.perf_counter()
  if not (corpus / "corpus.json").exists():
    api.prepare("emoji", corpus, limit=args.limit)
  if not emb.exists():
    _log(f"item encoder: {args.embed_steps} steps on {args.limit} emoji")
    api.embed(corpus, emb, BuiltinEmbedOptions(steps=args.embed_steps), progress=False)
  if not (index / "meta.json").exists():
    api.build_index(emb, index, IdentifierConfig(n_clusters=16, num_levels=2, codebook_size=16,
                                                 rq_steps=200), item_ids=embedding_files(emb).ids)
  _log(f"CART: {args.train_steps} steps (the emoji demo's model: frozen MiniLM + 2-layer decoder)")
  gin_bridge.train([str(ROOT / "gin_configs/experiments/emoji_demo.gin")],
            [f"MODEL_DIR='{run}'", f"CORPUS_DIR='{corpus}'", f"INDEX_DIR='{index}'",
             f"EMBEDDINGS='{emb}'", f"TrainConfig.num_steps={args.train_steps}",
             "TrainConfig.checkpoint_every=0"], progress=False)
  _log(f"trained in {time.perf_counter() - t0:.0f} s")
  return run


def offline_qps(run: Path, batch_sizes: list[int]) -> dict:
  """``cart eval``'s queries/s (test split) per batch size."""
  from cart_jax import api  # pylint: disable=g-import-not-at-top
  out = {}
  for b in batch_sizes:
    s = api.evaluate(run, split="test", batch_size=b, log=lambda m: None)
    out[str(b)] = {"qps": round(s["qps"], 2), "num_queries": s["num_queries"],
                   "compile_seconds": round(s["compile_seconds"], 2), "r@1": s["r@1"]}
    _log(f"cart eval --batch-size {b}: {s['qps']:.1f} q/s over {s['num_queries']} test queries")
  return out


def _cpu_seconds(pid: int | None = None) -> float:
  """CPU seconds (user + system, all threads) of this process, or of process ``pid``."""
  if pid is None:
    t = os.times()
    return t.user + t.system
  fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
  return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


async def _load_round(base: str, texts: list[str], concurrency: int, seconds: float,
                      max_requests: int, k: int, server_pid: int) -> dict:
  import httpx  # pylint: disable=g-import-not-at-top
  limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
  async with httpx.AsyncClient(base_url=base, limits=limits, timeout=60) as client:
    async def warm(i):
      await client.post("/search", json={"query": texts[i % len(texts)], "k": k})
    await asyncio.gather(*(warm(i) for i in range(2 * concurrency)))
    before = (await client.get("/metrics")).json()
    latencies, errors, statuses = [], 0, {}
    sent = 0
    cpu_client, cpu_server = _cpu_seconds(), _cpu_seconds(server_pid)
    t0 = time.perf_counter()
    deadline = t0 + seconds

    async def worker(w: int):
      nonlocal sent, errors
      while time.perf_counter() < deadline and sent < max_requests:
        i = sent
        sent += 1
        t = time.perf_counter()
        try:
          r = await client.post("/search", json={"query": texts[i % len(texts)], "k": k})
          code = r.status_code
        except httpx.HTTPError as e:
          code = type(e).__name__
        statuses[str(code)] = statuses.get(str(code), 0) + 1
        if code == 200:
          latencies.append((time.perf_counter() - t) * 1e3)
        else:
          errors += 1

    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    wall = time.perf_counter() - t0
    cpu_client, cpu_server = _cpu_seconds() - cpu_client, _cpu_seconds(server_pid) - cpu_server
    after = (await client.get("/metrics")).json()
  hist = {b: n - before["batch_size_histogram"].get(b, 0)
          for b, n in after["batch_size_histogram"].items()}
  hist = {b: n for b, n in sorted(hist.items(), key=lambda kv: int(kv[0])) if n}
  batches = after["batches"] - before["batches"]
  queries = after["queries"] - before["queries"]
  return {"concurrency": concurrency, "requests": sent, "answered": len(latencies),
          "errors": errors, "statuses": statuses, "seconds": round(wall, 3),
          "qps": round(len(latencies) / wall, 2), "latency_ms": _percentiles(latencies),
          "server_batches": batches, "mean_batch": round(queries / batches, 2) if batches else None,
          "batch_size_histogram": hist,
          "batch_search_ms_p50": after["batch_search_ms"]["p50"],
          # CPU seconds per wall second while the clients ran: the server process (search,
          # HTTP, JSON) and the clients (this process); 2.0 is all of a 2-core machine.
          "server_cpu_per_s": round(cpu_server / wall, 2), "client_cpu_per_s": round(cpu_client / wall, 2)}


def start_server(run: Path, port: int, args, log_path: Path) -> tuple[subprocess.Popen, float]:
  import httpx  # pylint: disable=g-import-not-at-top
  cmd = [sys.executable, "-m", "cart_jax.cli.main", "serve", "--model-dir", str(run),
         "--port", str(port), "--max-batch", str(args.max_batch), "--max-wait-ms",
         str(args.max_wait_ms), "--queue-size", str(args.queue_size)]
  if args.rerank:
    cmd.append("--rerank")
  _log("starting: " + " ".join(cmd[1:]))
  t0 = time.perf_counter()
  proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL,
                          stderr=open(log_path, "w", encoding="utf-8"),
                          env=dict(os.environ, PYTHONUNBUFFERED="1"))
  while True:
    if proc.poll() is not None:
      raise SystemExit(f"cart serve exited with {proc.returncode}:\n{log_path.read_text()}")
    try:
      if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
        break
    except httpx.TransportError:
      pass
    if time.perf_counter() - t0 > 600:
      proc.kill()
      raise SystemExit("cart serve did not become healthy in 10 minutes")
    time.sleep(0.2)
  return proc, time.perf_counter() - t0


def screenshot(base: str, query: str, path: str) -> None:
  """The page in headless Chromium (Debian's, through Selenium) after searching ``query``."""
  from selenium import webdriver  # pylint: disable=g-import-not-at-top
  from selenium.webdriver.chrome.service import Service  # pylint: disable=g-import-not-at-top
  from selenium.webdriver.common.by import By  # pylint: disable=g-import-not-at-top
  from selenium.webdriver.support.ui import WebDriverWait  # pylint: disable=g-import-not-at-top
  os.environ["SE_OFFLINE"] = "true"
  opts = webdriver.ChromeOptions()
  opts.binary_location = "/usr/bin/chromium"
  for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            "--window-size=1100,760", "--hide-scrollbars"):
    opts.add_argument(a)
  driver = webdriver.Chrome(options=opts, service=Service(executable_path="/usr/bin/chromedriver"))
  try:
    wait = WebDriverWait(driver, 30)
    driver.get(base + "/")
    wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "ready")
    driver.find_element(By.ID, "query").send_keys(query)
    driver.find_element(By.ID, "submit").click()
    wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "done")
    wait.until(lambda d: d.execute_script(
        "return [...document.querySelectorAll('#results img')].every(i => i.complete && i.naturalWidth > 0)"))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_via(path, driver.save_screenshot)
  finally:
    driver.quit()
  _log(f"screenshot of the page ({query!r}): {path}")


def plot(report: dict, path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  rows = report["rows"]
  c = [r["concurrency"] for r in rows]
  fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
  a1.plot(c, [r["qps"] for r in rows], "o-", label=f"cart serve (max batch {report['server']['max_batch']})")
  for (b, e), style in zip(report["offline"].items(), (":", "--", "-.")):
    a1.axhline(e["qps"], color="gray", linestyle=style, label=f"cart eval, batch {b} (offline)")
  a1.set_xscale("log", base=2)
  a1.set_xticks(c, [str(x) for x in c])
  a1.set_xlabel("concurrent clients")
  a1.set_ylabel("queries / s")
  a1.set_ylim(bottom=0)
  a1.legend(fontsize=8)
  a1.set_title("throughput")
  for key, style in (("p50", "o-"), ("p99", "s--")):
    a2.plot(c, [r["latency_ms"][key] for r in rows], style, label=key)
  a2.set_xscale("log", base=2)
  a2.set_yscale("log")
  a2.set_xticks(c, [str(x) for x in c])
  a2.set_xlabel("concurrent clients")
  a2.set_ylabel("latency (ms, client side)")
  a2.legend(fontsize=8)
  a2.set_title("latency")
  m = report["machine"]
  fig.suptitle(f"cart serve load test: {report['run']['num_items']} items, {m['cpus']} CPUs "
               f"({m['device']}), load {m['load_before']} -> {m['load_after']}", fontsize=10)
  save_figure(fig, path)


def table(report: dict) -> str:
  lines = [f"{'clients':>7} {'q/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'errors':>6} {'batch':>6} "
           f"{'cpu srv':>7} {'cpu cli':>7}"]
  for r in report["rows"]:
    lines.append(f"{r['concurrency']:>7} {r['qps']:>8.1f} {r['latency_ms']['p50']:>8.1f} "
                 f"{r['latency_ms']['p99']:>8.1f} {r['errors']:>6} {r['mean_batch'] or 0:>6.2f} "
                 f"{r['server_cpu_per_s']:>7.2f} {r['client_cpu_per_s']:>7.2f}")
  for b, e in report["offline"].items():
    lines.append(f"cart eval (offline, batch {b}): {e['qps']:.1f} q/s")
  return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--json", required=True, help="where the report goes")
  ap.add_argument("--plot", default=None, help="PNG of q/s and latency per concurrency")
  ap.add_argument("--model-dir", default=None, help="serve this trained run (default: train one)")
  ap.add_argument("--workdir", default=None, help="where the run is trained (reused when there)")
  ap.add_argument("--limit", type=int, default=400, help="emoji in the trained run (default 400)")
  ap.add_argument("--embed-steps", type=int, default=150, help="item encoder steps (default 150)")
  ap.add_argument("--train-steps", type=int, default=300, help="CART steps (default 300)")
  ap.add_argument("--concurrency", default="1,4,16,64", help="client counts (default 1,4,16,64)")
  ap.add_argument("--seconds", type=float, default=20.0, help="time budget per concurrency")
  ap.add_argument("--max-requests", type=int, default=5000, help="request budget per concurrency")
  ap.add_argument("--k", type=int, default=10, help="results per query (default 10)")
  ap.add_argument("--max-batch", type=int, default=16)
  ap.add_argument("--max-wait-ms", type=float, default=5.0)
  ap.add_argument("--queue-size", type=int, default=256)
  ap.add_argument("--rerank", action="store_true", help="serve with --rerank")
  ap.add_argument("--eval-batch", default="16,64", help="cart eval batch sizes (default 16,64)")
  ap.add_argument("--screenshot", default=None, metavar="PNG", help="also a screenshot of the page")
  ap.add_argument("--screenshot-query", default="anxious face with sweat",
                  help="the query of the screenshot (default: a test query of the 400-emoji run)")
  return ap


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  concurrency = [int(c) for c in args.concurrency.split(",")]
  import jax  # pylint: disable=g-import-not-at-top
  device = jax.devices()[0].device_kind if jax.devices() else "unknown"
  load_before = _load()
  run = ensure_run(args)
  from cart_jax.data.corpus import load_corpus  # pylint: disable=g-import-not-at-top
  run_doc = json.loads((run / "run.json").read_text(encoding="utf-8"))
  corpus = load_corpus(run_doc["corpus_dir"], check_media=False)
  texts = [t.text for t in corpus.texts("test", "query")]
  offline = offline_qps(run, [int(b) for b in args.eval_batch.split(",")])
  port = _free_port()
  base = f"http://127.0.0.1:{port}"
  log_path = Path(tempfile.gettempdir()) / f"cart-serve-load-{port}.log"
  proc, startup_s = start_server(run, port, args, log_path)
  _log(f"cart serve healthy after {startup_s:.1f} s (log {log_path})")
  rows = []
  try:
    for c in concurrency:
      row = asyncio.run(_load_round(base, texts, c, args.seconds, args.max_requests, args.k,
                                    proc.pid))
      row["load_avg_1m"] = _load()
      rows.append(row)
      _log(f"{c:>3} clients: {row['qps']:.1f} q/s, p50 {row['latency_ms']['p50']} ms, "
           f"p99 {row['latency_ms']['p99']} ms, {row['errors']} errors, mean batch {row['mean_batch']}, "
           f"CPU s/s server {row['server_cpu_per_s']} clients {row['client_cpu_per_s']}")
    if args.screenshot:
      screenshot(base, args.screenshot_query, args.screenshot)
  finally:
    proc.send_signal(signal.SIGTERM)
    try:
      rc = proc.wait(120)
    except subprocess.TimeoutExpired:
      proc.kill()
      rc = "killed after 120 s"
  startup_lines = [l for l in log_path.read_text(encoding="utf-8").splitlines() if "cart serve:" in l]
  report = {
      "format": FORMAT, "version": VERSION,
      "command": "python benchmarks/serve_load.py " + " ".join(argv if argv is not None else sys.argv[1:]),
      "run": {"model_dir": str(run), "num_items": len(corpus.items), "test_queries": len(texts),
              "limit": None if args.model_dir else args.limit,
              "embed_steps": None if args.model_dir else args.embed_steps,
              "train_steps": None if args.model_dir else args.train_steps},
      "server": {"max_batch": args.max_batch, "max_wait_ms": args.max_wait_ms,
                 "queue_size": args.queue_size, "rerank": args.rerank, "k": args.k,
                 "startup_seconds": round(startup_s, 2), "startup_log": startup_lines,
                 "exit_code_after_sigterm": rc},
      "clients": {"seconds": args.seconds, "max_requests": args.max_requests,
                  "kind": "asyncio + httpx in the benchmark process, one connection per client"},
      "offline": offline, "rows": rows,
      "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "device": device,
                  "load_before": load_before, "load_after": _load()},
      "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
  }
  atomic_write_json(args.json, report)
  if args.plot:
    plot(report, args.plot)
  print(table(report))
  return 0 if rc == 0 else 1


if __name__ == "__main__":
  sys.exit(main())
