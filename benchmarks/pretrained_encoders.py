"""What a pretrained item encoder costs (``cart embed --encoder pretrained``): conversion and items/s.

  python benchmarks/pretrained_encoders.py --json benchmarks/results/pretrained_encoders_cpu.json
  python benchmarks/pretrained_encoders.py --images 64 --clips 16 --json /tmp/p.json   # quick

For each network (EfficientNet-Lite0 on images at 224 px, aiSFX on audio files), in this order:
  * ``conversion_s``: the one-time conversion of the package's ``.pth`` (hash check, torch-free
    read, batch norm folded, ``.npz`` written) into an empty ``CART_CACHE_DIR``;
  * ``cached_load_s``: reading the converted ``.npz`` back (every later process);
  * ``first_call_s``: the first encode of one batch (compilation included);
  * ``items_per_s``: the median over ``--repeats`` of encoding all items after that.
Inputs are made here (seeded): ``--images`` random-texture images of 224 x 224, ``--clips`` 1.5 s
waves at 16 kHz written as WAV (the instruments data set's format). The JSON records the machine
(cores, load before and after) and the JAX backend: only compare figures taken on one machine.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from driver_common import load_average, log, repeat_seconds  # noqa: E402  pylint: disable=g-import-not-at-top


def _images(n: int) -> np.ndarray:
  rng = np.random.default_rng(0)
  low = rng.integers(0, 256, (n, 14, 14, 3)).astype(np.uint8)
  return np.repeat(np.repeat(low, 16, axis=1), 16, axis=2)  # [n, 224, 224, 3] block textures


def _waves(n: int, root: Path) -> list[Path]:
  import soundfile as sf  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  t = np.arange(24000) / 16000.0
  paths = []
  for i in range(n):
    f = 110.0 * 2 ** (rng.integers(0, 48) / 12)
    wave = 0.3 * np.sin(2 * np.pi * f * t) * np.exp(-t * rng.uniform(0.5, 4))
    p = root / f"clip{i:04d}.wav"
    sf.write(p, wave.astype(np.float32), 16000)
    paths.append(p)
  return paths


def _time(fn, repeats: int) -> float:
  return statistics.median(repeat_seconds(fn, repeats))


def bench(name: str, n: int, repeats: int, work: Path) -> dict:
  from cart_jax.models.pretrained import weights  # pylint: disable=g-import-not-at-top
  if name == "efficientnet-lite0":
    from cart_jax.models.pretrained import efficientnet_lite as mod  # pylint: disable=g-import-not-at-top
    source, items = mod.EFFICIENTNET_LITE0, _images(n)
    encode = lambda model, x: mod.encode_images(x, model=model)
  else:
    from cart_jax.models.pretrained import aisfx as mod  # pylint: disable=g-import-not-at-top
    source, items = mod.AISFX, _waves(n, work)
    encode = lambda model, x: mod.encode_audio(x, model=model)
  load0 = load_average()
  conv = weights.converted(source, mod.convert)
  assert conv.converted_now, "the cache was not empty"
  cached = weights.converted(source, mod.convert)
  model = mod.from_arrays(cached.arrays)
  t0 = time.perf_counter()
  encode(model, items[:64])
  first = time.perf_counter() - t0
  seconds = _time(lambda: encode(model, items), repeats)
  return {"items": n, "conversion_s": round(conv.seconds, 3), "cached_load_s": round(cached.seconds, 4),
          "first_call_s": round(first, 2), "encode_s": round(seconds, 2),
          "items_per_s": round(n / seconds, 1), "load_before": load0, "load_after": load_average()}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--images", type=int, default=256, help="images for EfficientNet-Lite0 (default 256)")
  p.add_argument("--clips", type=int, default=128, help="audio files for aiSFX (default 128)")
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--json", default="benchmarks/results/pretrained_encoders_cpu.json")
  args = p.parse_args(argv)
  import jax  # pylint: disable=g-import-not-at-top
  from cart_jax.core.artefacts import atomic_write_json  # pylint: disable=g-import-not-at-top
  out = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                     "backend": jax.default_backend(), "device": str(jax.devices()[0])},
         "encoders": {}}
  with tempfile.TemporaryDirectory() as tmp:
    os.environ["CART_CACHE_DIR"] = str(Path(tmp) / "cache")  # empty: the conversion is timed
    for name, n in (("efficientnet-lite0", args.images), ("aisfx", args.clips)):
      log(f"{name}: {n} items")
      out["encoders"][name] = r = bench(name, n, args.repeats, Path(tmp))
      log(f"{name}: conversion {r['conversion_s']} s, {r['items_per_s']} items/s (load {r['load_after']})")
  atomic_write_json(args.json, out)
  print(json.dumps(out, indent=2))
  return 0


if __name__ == "__main__":
  sys.exit(main())
