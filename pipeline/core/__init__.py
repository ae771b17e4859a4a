"""The base layer every other layer stands on (no Beam here): atomic files, the WebDataset shard
format, storage on local folders and object stores, manifests, and config loading.

It imports only ``facemllm.schemas`` and libraries; ``annotators``, ``reformatters``, ``training``
and ``evaluation`` import it (and ``schemas``) and nothing of the Beam stages. Importing
``facemllm.pipeline.core`` runs ``pipeline/__init__.py``, which therefore imports nothing.
"""
