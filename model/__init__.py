"""COTS model library: towers and their factory, objectives and their parts, tokenizers,
preprocessing, the training config's schema, and the torch-free ``model.data``. The job that
uses them (training loop, data loaders, evaluation, export, the CLI) is ``training``, which
imports this package; this package never imports ``training``.

Nothing heavy is imported here: ``indexer`` and ``service`` import ``model.data`` and must not
pull in torch by doing so.
"""
