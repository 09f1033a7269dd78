"""Item encoders: precomputed embeddings and the built-in dual encoder (MiniLM + item towers).

* :mod:`precomputed` - ``.npy``/``.npz`` embeddings aligned to a corpus's item ids, validated.
* :mod:`towers`      - item towers per modality (images now) behind one interface.
* :mod:`text`        - the frozen MiniLM text tower (sentence embeddings, length buckets).
* :mod:`dual_encoder`, :mod:`train_dual` - the NNX dual encoder and its InfoNCE training.
"""
