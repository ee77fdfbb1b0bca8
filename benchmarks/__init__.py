"""Benchmarks and load generators: every ``cots bench`` command and the tools they drive.

They sit beside the product, not in it: they may import every package (``model``, ``runtime``,
``indexer``, ``service``), no product package imports them (``tests/test_layering.py`` checks
it), and neither the wheel nor the serving image contains them, so ``cots bench`` runs from a
source checkout. Synthetic data that tests share lives in the product
(``indexer.synthetic_vectors``), not here. Results are recorded in ``docs/bench/``.
"""
