"""K-Means speed: cart-jax (JAX, jitted) vs scikit-learn KMeans and MiniBatchKMeans.

Same data (100K x 256 structured points, K = 256, 20 iterations by default) for
every method, each in its own subprocess with the same thread settings. Compile
time of the JAX version is reported apart; times are medians of --repeats runs.

  python benchmarks/kmeans_bench.py --json benchmarks/results/kmeans_cpu.json
  python benchmarks/kmeans_bench.py --quick --json /tmp/k.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

METHODS = ("cart_jax", "sklearn_kmeans", "sklearn_minibatch")


def _data(n, d, seed=0):
  from cart_jax.data.datasets.synthetic import structured_embeddings
  return structured_embeddings(n, d, n_topics=256, n_subtopics=16, seed=seed)


def worker(method: str, n: int, d: int, k: int, iters: int, repeats: int) -> dict:
  x = _data(n, d)
  times, inertias, n_iters = [], [], []
  compile_s = 0.0
  if method == "cart_jax":
    import jax
    from cart_jax.index import kmeans as km
    cfg = km.KMeansConfig(k, max_iters=iters, tol=0.0)
    t0 = time.perf_counter()
    r = km.kmeans(x, jax.random.key(0), cfg)
    jax.block_until_ready(r.centroids)
    first = time.perf_counter() - t0
    for rep in range(repeats):
      t0 = time.perf_counter()
      r = km.kmeans(x, jax.random.key(rep + 1), cfg)
      jax.block_until_ready(r.centroids)
      times.append(time.perf_counter() - t0)
      inertias.append(float(r.inertia))
      n_iters.append(int(r.n_iter))
    compile_s = max(first - statistics.median(times), 0.0)
  else:
    from sklearn.cluster import KMeans, MiniBatchKMeans
    centers = []
    for rep in range(repeats):
      if method == "sklearn_kmeans":
        est = KMeans(k, init="k-means++", n_init=1, max_iter=iters, tol=0.0, random_state=rep + 1)
      else:
        est = MiniBatchKMeans(k, init="k-means++", n_init=1, max_iter=iters, batch_size=4096,
                              random_state=rep + 1, max_no_improvement=None, tol=0.0)
      t0 = time.perf_counter()
      est.fit(x)
      times.append(time.perf_counter() - t0)
      centers.append(est.cluster_centers_)
      n_iters.append(int(est.n_iter_))
    from cart_jax.index import kmeans as km  # after the timed fits: JAX starts its threads here
    inertias = [float(km.predict(x, c)[1].sum()) for c in centers]  # cart_jax's inertia, same rule
  return {"method": method, "n": n, "d": d, "k": k, "max_iters": iters,
          "seconds_median": statistics.median(times), "seconds_min": min(times),
          "seconds_max": max(times), "repeats": repeats, "compile_s": compile_s,
          "inertia_median": statistics.median(inertias), "n_iter": n_iters}


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--json", required=True, help="output JSON path")
  ap.add_argument("--quick", action="store_true", help="20K points, 1 repeat")
  ap.add_argument("--n", type=int, default=100_000)
  ap.add_argument("--d", type=int, default=256)
  ap.add_argument("--k", type=int, default=256)
  ap.add_argument("--iters", type=int, default=20)
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
  args = ap.parse_args(argv)
  if args.quick:
    args.n, args.repeats = 20_000, 1
  if args.worker:
    print(json.dumps(worker(args.worker, args.n, args.d, args.k, args.iters, args.repeats)))
    return 0
  threads = str(os.cpu_count())
  env = dict(os.environ, OMP_NUM_THREADS=threads, OPENBLAS_NUM_THREADS=threads, MKL_NUM_THREADS=threads,
             JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
  rows = []
  for m in METHODS:
    cmd = [sys.executable, __file__, "--json", args.json, "--worker", m, "--n", str(args.n), "--d",
           str(args.d), "--k", str(args.k), "--iters", str(args.iters), "--repeats", str(args.repeats)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
      print(out.stderr[-2000:], file=sys.stderr)
      return 1
    row = json.loads(out.stdout.strip().splitlines()[-1])
    rows.append(row)
    print(f"{m:<18} {row['seconds_median']:8.2f} s  (compile {row['compile_s']:.1f} s)  "
          f"inertia {row['inertia_median']:.5g}  iters {row['n_iter']}")
  ours = rows[0]["seconds_median"]
  ratios = {r["method"]: r["seconds_median"] / ours for r in rows[1:]}
  for name, ratio in ratios.items():
    print(f"{name} / cart_jax time ratio: {ratio:.2f}x")
  result = {"machine": {"platform": platform.platform(), "processor": platform.processor(),
                        "cpus": os.cpu_count(), "python": platform.python_version()},
            "precision": "float32", "results": rows, "time_ratio_vs_cart_jax": ratios}
  from cart_jax.core.artefacts import atomic_write_json
  atomic_write_json(args.json, result)
  return 0


if __name__ == "__main__":
  sys.exit(main())
