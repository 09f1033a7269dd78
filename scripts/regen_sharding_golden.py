"""Regenerates tests/goldens/partition_specs_small.json: every parameter's logical axes and
PartitionSpec (under cart_jax.partitioning.LOGICAL_AXIS_RULES) for the `small` preset.

  .venv/bin/python scripts/regen_sharding_golden.py          # rewrite the golden
  .venv/bin/python scripts/regen_sharding_golden.py --check  # exit 1 if it differs

Review the diff before committing: a changed spec changes how checkpoints shard.
No parameters are allocated (nnx.eval_shape).
"""
import argparse
import json
import os
import sys
import tempfile

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "tests", "goldens",
                      "partition_specs_small.json")


def build() -> dict:
  from flax import nnx

  from cart_jax.models.cart.config import small
  from cart_jax.models.cart.network import CARTNetwork
  from cart_jax.partitioning import LOGICAL_AXIS_RULES, param_logical_axes_table

  cfg = small()
  model = nnx.eval_shape(lambda: CARTNetwork(cfg, rngs=nnx.Rngs(0)))
  return {
      "config": "small",
      "model_config": cfg.to_dict(),
      "rules": [list(r) for r in LOGICAL_AXIS_RULES],
      "params": param_logical_axes_table(nnx.state(model, nnx.Param)),
  }


def render(record: dict) -> str:
  """Stable text: one line per parameter, so a diff shows exactly which specs changed."""
  lines = ["{"]
  for key in ("config", "model_config", "rules"):
    lines.append(f" {json.dumps(key)}: {json.dumps(record[key], sort_keys=True)},")
  lines.append(' "params": {')
  items = sorted(record["params"].items())
  for i, (name, entry) in enumerate(items):
    comma = "," if i < len(items) - 1 else ""
    lines.append(f"  {json.dumps(name)}: {json.dumps(entry, sort_keys=True)}{comma}")
  lines.append(" }")
  lines.append("}")
  return "\n".join(lines) + "\n"


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--check", action="store_true", help="compare instead of writing")
  ap.add_argument("--out", default=GOLDEN)
  args = ap.parse_args(argv)
  record = build()
  text = render(record)
  if args.check:
    with open(args.out) as f:
      same = f.read() == text
    print("golden up to date" if same else f"golden differs: rerun {sys.argv[0]} without --check")
    return 0 if same else 1
  out = os.path.abspath(args.out)
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(out), suffix=".tmp")
  with os.fdopen(fd, "w") as f:
    f.write(text)
  os.chmod(tmp, 0o644)
  os.replace(tmp, out)
  print(f"wrote {out} ({len(record['params'])} parameters)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
