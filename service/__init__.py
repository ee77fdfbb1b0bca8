"""Search service: FastAPI app serving text, image and video retrieval over index bundles.

Torch-free by design; it encodes queries through ``indexer``'s ONNX runtime.
"""
