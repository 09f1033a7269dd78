"""The Colab notebook runs top to bottom through cart_jax.api (reduced size: 24 emoji, a few steps)."""
import json
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "cart_colab.ipynb"


def test_notebook_executes_at_reduced_size(tmp_path, monkeypatch):
  monkeypatch.setenv("CART_NB_LIMIT", "24")
  monkeypatch.setenv("CART_NB_EMBED_STEPS", "3")
  monkeypatch.setenv("CART_NB_TRAIN_STEPS", "2")
  monkeypatch.setenv("CART_NB_WORKDIR", str(tmp_path / "work"))
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  nb = nbformat.read(NOTEBOOK, as_version=4)
  client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                   resources={"metadata": {"path": str(tmp_path)}})
  client.execute()
  outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
  assert "cart_jax from" in outputs  # the install cell found the installed package
  assert "CART + rerank" in outputs and "dual tower" in outputs  # the results table
  pictures = [c for c in nb.cells if c.cell_type == "code"
              if any("image/png" in o.get("data", {}) for o in c.get("outputs", []))]
  # the corpus grid, the training curve, the recall bars, the search results, the reduced ablation
  assert len(pictures) == 5, [c.source[:40] for c in pictures]
  abl = json.loads((tmp_path / "work" / "ablations" / "ablations.json").read_text())
  assert {r["variant"] for r in abl["runs"]} == {"full", "no_rdrop"}  # (Colab: also no_fusion)
  assert "order of harm" in outputs or "verdict" in outputs  # the driver's table was printed
  assert (tmp_path / "work" / "training_curve.png").stat().st_size > 1000
  assert (tmp_path / "work" / "cart_test.json").exists()
  assert (tmp_path / "work" / "search.json").exists()
  errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
            if o.get("output_type") == "error"]
  assert not errors
