"""COTS model package: towers, objectives, training, export, and the torch-free ``model.data``.

Nothing heavy is imported here: ``indexer`` and ``service`` import ``model.data`` and must not
pull in torch by doing so.
"""
