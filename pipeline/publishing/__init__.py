"""Publishing a finished run: one module per command, over one shared layout.

- ``layout``: the object names under DEST, reading a version's manifest, committing a version,
  and ``shard_urls`` for readers;
- ``publish``: upload a run as version 1 (``facemllm publish``);
- ``verify``: read a version back against its manifest (``facemllm verify``);
- ``remove``: rewrite the shards holding requested samples as a new version (``facemllm remove``).

Versions are immutable and ``manifest.json`` is written last, so readers never see half a version.
Nothing is re-exported here: ``publish``, ``verify`` and ``remove`` are both module and function
names, and a re-export would hide the module behind the function.
"""
