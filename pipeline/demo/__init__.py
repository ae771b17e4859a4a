"""``facemllm demo`` and the offline sample behind it, kept apart from the pipeline's stages.

- ``server``: ``SampleServer``, a loopback image host with one route per real-web failure;
- ``sample``: LAION-style metadata and a LAION-Face id list pointing at that server, with the
  counts a correct run must report;
- ``face_datasets``: CelebA, RAF-DB, UTKFace and FairFace in their native layouts, from real photos;
- ``run``: ``run_demo``, which serves the sample, builds the rest and runs the whole recipe
  (``configs/demo_recipe.yaml``) on it, checking the acquisition's counts.

Tests and benchmarks use ``server``, ``sample`` and ``face_datasets`` too, which is why they are
modules of their own.
"""
