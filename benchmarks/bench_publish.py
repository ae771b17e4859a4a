"""``publish`` vs bare boto3 uploads of the same shards to the same real S3 server.

    python -m benchmarks.bench_publish [--shards 24] [--shard-mib 8] [--parallel 8] [--repeats 3]

A real SeaweedFS server (``tests.s3server``) runs on loopback for the whole benchmark. The run
folder holds ``--shards`` tar shards of ``--shard-mib`` MiB of incompressible samples and a
manifest. Each side runs in its own fresh child process (``benchmarks._common``):

- ours: ``pipeline.publishing.publish.publish`` to a fresh prefix: one listing per folder (the
  resume check), each shard streamed from disk in one put that carries the manifest's sha256 for
  the store to check and records it in the metadata (hashed on the way too until the store has
  shown that it checks), then the indexes and the manifest.
- anchor: boto3's ``upload_file`` of the same files on a thread pool of the same size, to a fresh
  prefix, with the same multipart threshold and part size and no threads inside a file (ours
  puts a file below two parts in one request as well).

Both go through botocore of the same version with its default checksum behaviour, and both are
warmed up first on a one-shard run (client set-up, first connections). MB/s is the shard bytes
over the wall time of the whole call, and CPU seconds are the client process's; the ratio
ours/anchor is the median over ``--repeats`` of each repeat's two adjacent runs (alternating which
side goes first). Timings are never asserted:
shared machines drift, only the ratio is meaningful.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks._common import DEFAULT_OUT, machine_info, print_table, run_isolated, write_result

BUCKET = "bench"
MIB = 1 << 20


def make_run(out: Path, shards: int, shard_bytes: int) -> int:
    """A finished run of ``shards`` tars of about ``shard_bytes`` each; returns the total bytes."""
    from facemllm.pipeline.core.files import write_json_atomic
    from facemllm.pipeline.core.shards import ShardWriter, shard_info
    from facemllm.schemas import RunManifest, ShardManifest

    infos = []
    member_bytes = MIB
    for shard_id in range(shards):
        path = out / "images" / f"{shard_id:05d}.tar"
        with ShardWriter(path) as writer:
            for index in range(max(1, shard_bytes // member_bytes)):
                writer.add(f"{shard_id:05d}{index:04d}", {"bin": os.urandom(member_bytes)})
        infos.append(shard_info(path, writer.count, f"images/{path.name}"))
    stage = ShardManifest(stage="images", shards=infos, counts={"samples": sum(s.nsamples for s in infos)})
    manifest = RunManifest(config_hash="bench", package_versions={}, stages={"images": stage})
    write_json_atomic(out / "manifest.json", manifest.model_dump(mode="json"))
    return sum(s.bytes for s in infos)


def run_ours(out: str, warm_out: str, dest: str, parallel: int, chunk_bytes: int) -> dict:
    """Child process: ``facemllm publish``'s function, warmed up on a one-shard run first."""
    from facemllm.pipeline.core.storage import StorageOptions
    from facemllm.pipeline.publishing.publish import publish

    options = StorageOptions(parallel=parallel, multipart_chunk_bytes=chunk_bytes, progress=False)
    publish(Path(warm_out), f"{dest}-warm", options)  # client set-up and first connections
    begin, cpu = time.perf_counter(), time.process_time()
    report = publish(Path(out), dest, options)
    return {
        "wall_s": time.perf_counter() - begin,
        "cpu_s": time.process_time() - cpu,
        "bytes": report.bytes_uploaded,
        "files": report.uploaded,
    }


def run_anchor(out: str, warm_out: str, prefix: str, parallel: int, chunk_bytes: int, endpoint: str) -> dict:
    """Child process: boto3 ``upload_file`` of the same files on a pool of the same size, warmed up
    on the same one-shard run first."""
    from concurrent.futures import ThreadPoolExecutor

    import boto3
    from boto3.s3.transfer import TransferConfig
    from botocore.config import Config

    client = boto3.client(
        "s3", endpoint_url=endpoint, config=Config(max_pool_connections=max(10, 2 * parallel))
    )
    transfer = TransferConfig(
        multipart_threshold=2 * chunk_bytes, multipart_chunksize=chunk_bytes, use_threads=False
    )
    files = sorted(Path(out, "images").glob("*.tar"))

    def upload(path: Path, to: str = prefix) -> int:
        client.upload_file(str(path), BUCKET, f"{to}/images/{path.name}", Config=transfer)
        return path.stat().st_size

    with ThreadPoolExecutor(max_workers=parallel) as pool:
        list(pool.map(lambda path: upload(path, f"{prefix}-warm"), Path(warm_out, "images").glob("*.tar")))
    begin, cpu = time.perf_counter(), time.process_time()
    with ThreadPoolExecutor(max_workers=parallel) as pool:
        total = sum(pool.map(upload, files))
    return {
        "wall_s": time.perf_counter() - begin,
        "cpu_s": time.process_time() - cpu,
        "bytes": total,
        "files": len(files),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", type=int, default=24, help="shards in the run (24)")
    parser.add_argument("--shard-mib", type=int, default=8, help="MiB per shard (8)")
    parser.add_argument("--parallel", type=int, default=8, help="files in flight, both sides (8)")
    parser.add_argument("--chunk-mib", type=int, default=64, help="multipart part size, both sides (64)")
    parser.add_argument("--repeats", type=int, default=5, help="runs per side, alternating order (5)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="result folder or .json path")
    args = parser.parse_args(argv)

    import fsspec

    from tests.s3server import CLIENT_ENV, SeaweedS3

    chunk = args.chunk_mib * MIB
    with (
        tempfile.TemporaryDirectory(prefix="bench-publish-") as work,
        SeaweedS3(Path(work) / "seaweedfs") as server,
    ):
        os.environ.update(
            {**CLIENT_ENV, "FACEMLLM_S3_ENDPOINT": server.endpoint_url}
        )  # the children inherit it
        fsspec.filesystem("s3", client_kwargs={"endpoint_url": server.endpoint_url}).mkdir(BUCKET)
        run_dir, warm_dir = Path(work) / "run", Path(work) / "warm"
        total = make_run(run_dir, args.shards, args.shard_mib * MIB)
        make_run(warm_dir, 1, MIB)
        runs: dict[str, list[dict]] = {"ours": [], "anchor": []}
        for repeat in range(args.repeats):
            sides = ["ours", "anchor"] if repeat % 2 == 0 else ["anchor", "ours"]
            for side in sides:
                if side == "ours":
                    result = run_isolated(
                        run_ours,
                        out=str(run_dir),
                        warm_out=str(warm_dir),
                        dest=f"s3://{BUCKET}/ours-{repeat}",
                        parallel=args.parallel,
                        chunk_bytes=chunk,
                    )
                else:
                    result = run_isolated(
                        run_anchor,
                        out=str(run_dir),
                        warm_out=str(warm_dir),
                        prefix=f"anchor-{repeat}",
                        parallel=args.parallel,
                        chunk_bytes=chunk,
                        endpoint=server.endpoint_url,
                    )
                assert result["bytes"] == total, (side, result)
                result["mb_per_s"] = result["bytes"] / 1e6 / result["wall_s"]
                runs[side].append(result)

    summary = {
        side: {
            "mb_per_s": statistics.median(r["mb_per_s"] for r in results),
            "wall_s": statistics.median(r["wall_s"] for r in results),
            "cpu_s": statistics.median(r["cpu_s"] for r in results),
            "peak_rss_mb": max(r["peak_rss_self_mb"] for r in results),
        }
        for side, results in runs.items()
    }
    # each repeat's two runs are adjacent in time: their ratio is less exposed to machine drift
    paired = [o["mb_per_s"] / a["mb_per_s"] for o, a in zip(runs["ours"], runs["anchor"], strict=True)]
    ratio = statistics.median(paired)
    print(f"{args.shards} shards x {args.shard_mib} MiB = {total / 1e6:.1f} MB, parallel {args.parallel}")
    columns = ("mb_per_s", "wall_s", "cpu_s", "peak_rss_mb")
    print_table(
        ["side", "MB/s (median)", "wall s", "client CPU s", "peak RSS MiB"],
        [
            ["facemllm publish", *(summary["ours"][c] for c in columns)],
            ["boto3 upload_file", *(summary["anchor"][c] for c in columns)],
        ],
    )
    print(f"ratio publish/boto3 (MB/s), median of the repeats' paired ratios: {ratio:.3f}")
    print("paired ratios: " + ", ".join(f"{r:.3f}" for r in paired))
    result = {
        "machine": machine_info(),
        "params": vars(args) | {"out": str(args.out), "total_bytes": total},
        "ours": summary["ours"],
        "anchor": summary["anchor"],
        "ratio": ratio,
        "ratio_per_repeat": paired,
        "runs": runs,
    }
    print(f"wrote {write_result(args.out, 'bench_publish', result)}")
    return result


if __name__ == "__main__":
    main()
