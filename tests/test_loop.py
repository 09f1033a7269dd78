"""The shared training loop: metrics pulled only on logged steps, checkpoints announced, resume."""
import json

import jax
import jax.numpy as jnp
import numpy as np

from cart_jax.core import loop
from cart_jax.core.checkpointing import Checkpointer


def _step(step, state):
  state = state + 1.0
  return state, {"loss": state * 2.0, "step_seen": jnp.float32(step)}


def test_metrics_are_pulled_once_per_log_and_written_under_one_name(tmp_path, monkeypatch):
  pulls = []
  real = jax.device_get
  monkeypatch.setattr(jax, "device_get", lambda x: pulls.append(x) or real(x))
  writer = loop.MetricWriter(tmp_path)
  seen = []
  out = loop.run(_step, jnp.float32(0), start=0, num_steps=7, log_every=3, writer=writer,
                 on_step=lambda done, m: seen.append((done, m is not None)))
  writer.close()
  assert len(pulls) == 3  # steps 3, 6 and the last (7)
  assert [h["step"] for h in out.history] == [3, 6, 7]
  assert [h["loss"] for h in out.history] == [6.0, 12.0, 14.0]
  assert [d for d, logged in seen if logged] == [3, 6, 7] and len(seen) == 7
  rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows] == [3, 6, 7]
  assert {"train/loss", "train/step_seen"} <= set(rows[0])


def test_every_step_history_and_checkpoints(tmp_path):
  ckpt = Checkpointer(tmp_path / "ck", keep=2, save_every=2, items=("params",))
  logs = []
  out = loop.run(_step, jnp.float32(0), start=0, num_steps=5, log_every=4, checkpointer=ckpt,
                 checkpoint_items=lambda s: {"params": {"x": s}}, checkpoint_meta={"tag": "t"},
                 history_every_step=True, log=logs.append)
  assert [h["step"] for h in out.history] == [1, 2, 3, 4, 5]
  assert [l for l in logs if l.startswith("saved")] == [
      f"saved checkpoint step {s} to {tmp_path / 'ck'}" for s in (2, 4, 5)]
  assert [l.split(":")[0] for l in logs if not l.startswith("saved")] == ["step 4", "step 5"]
  assert ckpt.all_steps() == [4, 5]
  restored, meta = ckpt.restore({"params": {"x": jnp.float32(0)}})
  assert meta["step"] == 5 and meta["tag"] == "t" and meta["metrics"]["loss"] == 10.0
  resumed = loop.run(_step, restored["params"]["x"], start=5, num_steps=6, log_every=4)
  assert float(resumed.state) == 6.0 and resumed.history[-1]["step"] == 6
  ckpt.delete_all()
  assert ckpt.all_steps() == []
  ckpt.close()
  np.testing.assert_equal(float(out.state), 5.0)
