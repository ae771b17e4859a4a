"""``facemllm demo`` and the offline sample behind it, kept apart from the pipeline's stages.

- ``server``: ``SampleServer``, a loopback image host with one route per real-web failure;
- ``sample``: LAION-style metadata and a LAION-Face id list pointing at that server, with the
  counts a correct run must report;
- ``run``: ``run_demo``, which serves the sample, runs ``configs/demo.yaml`` on it and checks the
  counts.

Tests and benchmarks use ``server`` and ``sample`` too, which is why they are modules of their own.
"""
