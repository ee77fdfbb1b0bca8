"""COTS training: the job that uses the ``model`` library (as open_clip_train uses open_clip).

Data flows one way through it::

    recipes.py (JSON config file + overrides -> model.config.TrainConfig)
      -> training_data.py / video_data.py (model.data readers -> batches, via model.preprocess)
      -> train.py (model.factory towers + model.objectives, checkpoint.py saves and resumes)
      -> evaluate.py / eval_splits.py / scene_eval.py / video_checks.py (Recall@K, scene checks)
      -> export.py (+ zero_shot.py) -> an ONNX bundle that ``runtime`` loads and ``indexer`` uses

``cli.py`` holds the ``cots train``, ``cots eval`` and ``cots export`` commands;
``visual_tokenizer_train.py`` trains the codebook the masked objective can read.

Layers: ``training`` imports ``model`` (``model.data`` included) and ``runtime``; nothing of ours
but the ``cots`` command and ``benchmarks`` imports it (tests/test_layering.py). Nothing heavy is
imported here.
"""
