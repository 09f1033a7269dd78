"""Whole jobs over a MODEL_DIR or a corpus: each composes the layers below (data, index, models,
runs, train, inference) into one command's work: :mod:`train` (``cart train``), :mod:`evaluate`
(``cart eval``), :mod:`search` (``cart search``), :mod:`baseline` (``cart baseline``), :mod:`embed`
(``cart embed``), :mod:`rerank` (the re-ranker fitted after training) and :mod:`pseudo_queries`."""
