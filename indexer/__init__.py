"""Offline indexer: embeds corpora with a model bundle into versioned FAISS index bundles.

Torch-free by design; it reads corpora through ``model.data``.
"""
