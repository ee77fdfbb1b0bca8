"""The model bundle's contract and its torch-free runtime.

``bundle.py`` is the schema of ``bundle.json`` (and its checks), ``spec.py`` the preprocessing
it prescribes; ``text.py``, ``images.py`` and ``video.py`` turn texts, images and videos into
model inputs exactly as training does (``image_decode.py`` and ``video_decode.py`` decode
media for training's readers too); ``encoder.py`` runs the ONNX towers with ONNX Runtime.
``model/`` writes bundles with these (and checks its export by loading it back), ``indexer/``
and ``service/`` read them. Nothing here imports torch, ``model``, ``indexer`` or ``service``.
"""
