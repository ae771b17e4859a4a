"""Scoring models on the face perception tasks (``facemllm eval``), one module per part:

- ``config``: ``EvalConfig`` and ``ModelSpec`` (YAML, ``--set``, ``--model [LABEL=]TARGET``);
- ``data``: the QA shards, read through reformat or published manifests;
- ``clients``: a checkpoint in-process, or an OpenAI-compatible endpoint;
- ``parsing`` and ``tasks``: strict answer parsing, and which samples each task scores;
- ``metrics``: accuracies, MAE, per class and per group, bootstrap intervals over images;
- ``report``: markdown, HTML and the side-by-side comparison;
- ``run``: the loop that ties them together, resumable reply by reply.
"""
