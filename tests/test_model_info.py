"""`cart model-info`: parameter groups add up, analytic FLOPs agree with XLA's cost analysis."""
import argparse
import json

import pytest

from cart_jax.cli.commands import model_info
from cart_jax.models.cart.config import tiny
from cart_jax.models.cart.flops import flops_per_query, measured_flops


def _parse(argv):
  ap = argparse.ArgumentParser()
  sub = ap.add_subparsers()
  model_info.register(sub, "model-info", "parameter counts and FLOPs")
  return ap.parse_args(["model-info"] + argv)


def test_model_info_json(tmp_path):
  out = tmp_path / "info.json"
  args = _parse(["--config", "tiny", "--fusion", "fine", "--vocab_size", "20", "--json", str(out)])
  assert args.func(args) == 0
  info = json.loads(out.read_text())
  p = info["parameters"]
  assert p["total"] == p["embeddings"] + p["encoder"] + p["fusion"] + p["decoder"]
  # tiny: d 32, inner 2x16=32, d_ff 64, 2 + 2 layers, 8 buckets; 30522-token input table
  assert p["embeddings"] == 30522 * 32 + 2 * 20 * 32
  enc_layer = 4 * 32 * 32 + 3 * 32 * 64 + 2 * 32  # attention + gated MLP + 2 norms
  assert p["encoder"] == 2 * enc_layer + 8 * 2 + 32  # + relative positions + final norm
  fine_layer = 32 * 32 + 32 * 32 + 2  # q, o, alpha of each decoder layer
  experts = 2 * 2 * 32 * 32  # k/v of S = 2 encoder layers, shared by the decoder layers
  assert p["fusion"] == 2 * fine_layer + experts
  assert info["model_config"]["fusion"] == "fine"
  assert info["flops_per_query"]["assumptions"] == {"src_len": 32, "beam": 10, "id_length": 6}


def test_fusion_flops_ordering():
  totals = {f: flops_per_query(tiny(fusion=f))["total"] for f in ("none", "coarse", "fine", "both")}
  assert totals["none"] < totals["coarse"] < totals["both"] and totals["fine"] < totals["both"]
  per_layer = flops_per_query(tiny(fusion="fine", fine_shared_kv=False))["fusion_precompute"]
  assert per_layer == 2 * flops_per_query(tiny(fusion="fine"))["fusion_precompute"]  # 2 decoder layers


def test_analytic_flops_close_to_xla_cost_analysis():
  cfg = tiny(d_model=64, num_heads=4, head_dim=16, d_ff=128, output_vocab_size=100, input_vocab_size=100,
             fine_shared_kv=False)
  analytic = flops_per_query(cfg, src_len=16, beam=4, id_length=3)["total"]
  measured = measured_flops(cfg, src_len=16, beam=4, id_length=3)
  # XLA also counts element-wise ops (softmax, GELU, norms): a few percent more
  assert 1.0 <= measured / analytic < 1.15, (measured, analytic)


def test_bad_arguments():
  from cart_jax.core.errors import CartError
  args = _parse(["--config", "tiny", "--beam", "0"])
  with pytest.raises(CartError, match="--beam"):
    model_info.build_info(args)
  with pytest.raises(SystemExit):
    _parse(["--config", "huge"])
