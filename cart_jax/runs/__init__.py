"""A trained run (MODEL_DIR): its layout (:mod:`layout`) and loading it for inference
(:mod:`restore`). Below both ``train/`` (which writes runs) and ``inference/`` (which reads them)."""
