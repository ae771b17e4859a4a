"""The training loop: plain PyTorch (DDP via torch.distributed), one stage per run.

``torchrun --nproc_per_node N -m facemllm.training CONFIG`` or ``facemllm train CONFIG`` (one process). Per
optimizer step: ``grad_accum`` micro-batches, the loss summed over answer tokens and divided by the
answer tokens of the whole global batch (all ranks, all micro-batches), so every token weighs the
same however the batch is split; gradients clipped; AdamW; cosine schedule with linear warmup.
bf16 autocast on GPU (fp32 master weights), fp32 on CPU.

Checkpoints (``output_dir/checkpoints/step-NNNNNNNN/``, written to a temporary folder and renamed,
the newest ``keep_last`` kept) hold the trainable tensors, the optimizer and scheduler, and per rank
the RNG states and the data position. Resuming restores all of it and continues with the same
batches in the same order, so the loss curve continues as if never interrupted. The end of a stage
writes ``output_dir/final/``: a plain transformers checkpoint (LoRA merged) with tokenizer,
processor and chat template, which the next stage's ``model.pretrained`` and vLLM load.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from facemllm.pipeline.core.files import write_json_atomic
from facemllm.training.config import TrainRunConfig
from facemllm.training.data import DataState, ShardBatches, make_loader, resolve_sources, total_samples
from facemllm.training.model import (
    SAVE_DTYPES,
    AnswerLoss,
    LoadedModel,
    apply_tuning,
    build_model,
    export_model,
    load_trainable_state,
    parameter_report,
    trainable_state,
)

log = logging.getLogger("facemllm.train")
CHECKPOINTS = "checkpoints"
FINAL = "final"
STATE_FILE = "trainer_state.json"


# --- processes ----------------------------------------------------------------------------------


@dataclass
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def all_sum(self, values: list[float]) -> list[float]:
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.distributed:
            dist.all_reduce(tensor)
        return tensor.tolist()


def init_distributed() -> DistEnv:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local_rank)
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank() if world_size > 1 else 0
    return DistEnv(rank, world_size, local_rank, device)


# --- optimiser and schedule ---------------------------------------------------------------------


def make_optimizer(loaded: LoadedModel, config: TrainRunConfig, device: torch.device) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for name, param in loaded.model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or "norm" in name.lower() else decay).append(param)
    groups = [{"params": decay, "weight_decay": config.optim.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return torch.optim.AdamW(
        groups,
        lr=config.optim.lr,
        betas=config.optim.betas,
        eps=config.optim.eps,
        # fused on GPU; on CPU the default (foreach): an explicit fused=False would pick the slow
        # one-tensor-at-a-time loop
        fused=True if device.type == "cuda" else None,
    )


def lr_factor(step: int, total: int, warmup: int, floor: float) -> float:
    """Multiplier of the peak lr for optimizer step ``step`` (0-based): linear warmup, cosine decay."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


# --- RNG state ----------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    _, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": pos,
            "has_gauss": has_gauss,
            "cached": cached,
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    numpy = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            numpy["keys"].numpy().astype(np.uint32),
            numpy["pos"],
            numpy["has_gauss"],
            numpy["cached"],
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --- checkpoints --------------------------------------------------------------------------------


def checkpoint_dirs(output_dir: Path) -> list[Path]:
    """Complete checkpoints (their state file is written last), oldest first."""
    root = output_dir / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step-*") if (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def find_resume(config: TrainRunConfig) -> Path | None:
    choice = config.loop.resume
    if choice == "never":
        return None
    if choice == "auto":
        found = checkpoint_dirs(Path(config.output_dir))
        return found[-1] if found else None
    path = Path(choice)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"loop.resume: {path} is not a complete checkpoint (no {STATE_FILE})")
    return path


class Trainer:
    def __init__(self, config: TrainRunConfig, env: DistEnv | None = None):
        self.config = config
        self.env = env or init_distributed()
        self.output_dir = Path(config.output_dir)
        self.stop_requested = False

    def info(self, message: str, *args: Any) -> None:
        """Progress for the person running the job: printed by rank 0 only."""
        if self.env.is_main:
            print(message % args, flush=True)

    def run(self) -> dict[str, Any]:
        config, env = self.config, self.env
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        self.output_dir.mkdir(parents=True, exist_ok=True)
        sources = resolve_sources(config.data)  # a missing shard set fails before the model loads
        max_steps = self._max_steps(sources)
        done = self._finished(max_steps)
        if done is not None:
            self.info("stage %d is already complete in %s; nothing to do", config.stage, done)
            return {"status": "completed", "stage": config.stage, "step": max_steps, "final": str(done)}

        random.seed(config.loop.seed)
        np.random.seed(config.loop.seed)
        loaded = build_model(config.model, seed=config.loop.seed)
        loaded = apply_tuning(loaded, config.tune, config.trainable_parts)
        counts, report = parameter_report(loaded)
        if sum(c["trainable"] for c in counts.values()) == 0:
            raise ValueError("no parameter trains: check tune.trainable")
        if env.is_main:
            print(
                f"stage {config.stage}: {type(loaded.base).__name__} ({loaded.family.name})\n{report}",
                flush=True,
            )
        loaded.model.to(env.device)
        loaded.model.train()  # from_pretrained gives eval mode: dropout (LoRA's too) must be on
        torch.manual_seed(config.loop.seed + env.rank)  # dropout differs between ranks

        amp = self._autocast_dtype()
        optimizer = make_optimizer(loaded, config, env.device)
        warmup = (
            config.optim.warmup_steps
            if config.optim.warmup_steps is not None
            else math.ceil(config.optim.warmup_ratio * max_steps)
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: lr_factor(s, max_steps, warmup, config.optim.min_lr_ratio)
        )

        step, data_state, rng = 0, None, None
        resume_from = find_resume(config)
        if resume_from is not None:
            step, data_state, rng = self._load_checkpoint(resume_from, loaded, optimizer, scheduler)
            self.info("resumed from %s at step %d", resume_from, step)
        self._trim_logs(step)

        dataset = ShardBatches(
            config.data,
            sources,
            loaded.processor,
            loaded.family,
            config.loop.seed,
            env.rank,
            env.world_size,
            data_state,
        )
        data_state = dataset.state
        # starting the DataLoader draws from torch's RNG: restore the RNG after it, as it was saved
        loader = iter(make_loader(dataset, pin_memory=env.device.type == "cuda"))
        if rng is not None:
            set_rng_state(rng)

        loss_module = AnswerLoss(loaded).to(env.device)
        if env.distributed:
            ids = [env.local_rank] if env.device.type == "cuda" else None
            wrapped = DistributedDataParallel(
                loss_module, device_ids=ids, find_unused_parameters=config.loop.ddp_find_unused_parameters
            )
        else:
            wrapped = loss_module
        trainable = [p for p in loaded.model.parameters() if p.requires_grad]

        writer = self._tensorboard(step)
        metrics_path = self.output_dir / "metrics.jsonl"
        keys_path = self.output_dir / f"samples-rank{env.rank}.txt"
        previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm) if _main_thread() else None
        window = {
            "loss": 0.0,
            "tokens": 0.0,
            "samples": 0.0,
            "labels": 0.0,
            "wait": 0.0,
            "time": 0.0,
            "steps": 0,
        }
        last: dict[str, Any] = {}
        status = "completed"
        stop_at = config.loop.stop_at_step
        started = time.perf_counter()
        try:
            while step < max_steps:
                tick = time.perf_counter()
                micro = []
                for _ in range(config.loop.grad_accum):
                    micro.append(next(loader))
                    data_state.update(micro[-1])
                waited = time.perf_counter() - tick
                local_labels = sum(m["meta"]["n_label_tokens"] for m in micro)
                (global_labels,) = env.all_sum([local_labels])
                loss_sum = 0.0
                for i, batch in enumerate(micro):
                    inputs = {
                        k: v.to(env.device, non_blocking=True)
                        for k, v in batch.items()
                        if isinstance(v, torch.Tensor)
                    }
                    sync = (not env.distributed) or i == len(micro) - 1
                    with nullcontext() if sync else wrapped.no_sync(), self._amp(amp):
                        summed = wrapped(**inputs)
                        loss = summed * env.world_size / max(global_labels, 1.0)
                    loss.backward()
                    loss_sum += float(summed.detach())
                grad_norm = None
                if global_labels > 0:
                    if config.optim.max_grad_norm is not None:
                        grad_norm = float(
                            torch.nn.utils.clip_grad_norm_(trainable, config.optim.max_grad_norm)
                        )
                    optimizer.step()
                else:
                    self.info(
                        "step %d: no answer tokens in the global batch; optimizer step skipped", step + 1
                    )
                lr = scheduler.get_last_lr()[0]
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1

                samples = sum(m["meta"]["n_samples"] for m in micro)
                tokens = sum(m["meta"]["n_tokens"] for m in micro)
                g_loss, g_samples, g_tokens = env.all_sum([loss_sum, samples, tokens])
                elapsed = time.perf_counter() - tick
                loss_value = g_loss / max(global_labels, 1.0)
                last = {
                    "step": step,
                    "loss": loss_value,
                    "lr": lr,
                    "grad_norm": grad_norm,
                    "samples": int(g_samples),
                    "tokens": int(g_tokens),
                    "answer_tokens": int(global_labels),
                    "step_s": elapsed,
                    "data_wait_s": waited,
                }
                for key, value in (
                    ("loss", g_loss),
                    ("labels", global_labels),
                    ("samples", g_samples),
                    ("tokens", g_tokens),
                    ("wait", waited),
                    ("time", elapsed),
                ):
                    window[key] += value
                window["steps"] += 1
                if env.is_main:
                    with open(metrics_path, "a") as handle:
                        handle.write(json.dumps(last) + "\n")
                    if writer is not None:
                        for key in ("loss", "lr", "grad_norm"):
                            if last[key] is not None:
                                writer.add_scalar(f"train/{key}", last[key], step)
                        writer.add_scalar("train/samples_per_s", g_samples / elapsed, step)
                        writer.add_scalar("train/tokens_per_s", g_tokens / elapsed, step)
                if config.loop.log_sample_keys:
                    with open(keys_path, "a") as handle:
                        for m in micro:
                            handle.writelines(f"{step}\t{key}\n" for key in m["meta"]["keys"])
                if step % config.loop.log_every == 0 or step == max_steps:
                    self._print_window(
                        step, max_steps, window, lr, grad_norm, micro[-1]["meta"].get("skipped", {})
                    )
                    window = dict.fromkeys(window, 0.0) | {"steps": 0}

                stop = self._stop_agreed() or (stop_at is not None and step >= stop_at)
                periodic = config.loop.save_every is not None and step % config.loop.save_every == 0
                if (periodic or stop) and step < max_steps:
                    self._save_checkpoint(step, loaded, optimizer, scheduler, data_state)
                if stop and step < max_steps:
                    status = "interrupted"
                    self.info("stopped at step %d; rerun the same command to resume", step)
                    break
        finally:
            if previous_handler is not None:
                signal.signal(signal.SIGTERM, previous_handler)
            if writer is not None:
                writer.close()
            del loader

        summary = {
            "status": status,
            "stage": config.stage,
            "step": step,
            "max_steps": max_steps,
            "last": last,
            "wall_s": time.perf_counter() - started,
            "parameters": counts,
        }
        if status == "completed":
            self._export(loaded, summary)
        env.barrier()
        return summary

    # --- pieces of run ---------------------------------------------------------------------------

    def _max_steps(self, sources) -> int:
        loop, data = self.config.loop, self.config.data
        if loop.max_steps is not None:
            return loop.max_steps
        per_step = data.batch_size * loop.grad_accum * self.env.world_size
        return max(1, math.ceil(loop.epochs * total_samples(sources[0]) / per_step))

    def _finished(self, max_steps: int) -> Path | None:
        """The stage's model, when a run of this same configuration already wrote it."""
        final = self.output_dir / FINAL
        try:
            meta = json.loads((final / "facemllm_training.json").read_text())
        except (FileNotFoundError, ValueError):
            return None
        same = meta.get("config_digest") == self.config.config_hash() and meta.get("steps") == max_steps
        return final if same else None

    def _autocast_dtype(self) -> torch.dtype | None:
        precision = self.config.loop.precision
        if precision == "auto":
            cuda = self.env.device.type == "cuda" and torch.cuda.is_bf16_supported()
            return torch.bfloat16 if cuda else None
        return torch.bfloat16 if precision == "bf16" else None

    def _amp(self, dtype: torch.dtype | None):
        if dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.env.device.type, dtype=dtype)

    def _on_sigterm(self, signum, frame) -> None:
        self.stop_requested = True

    def _stop_agreed(self) -> bool:
        (flag,) = self.env.all_sum([1.0 if self.stop_requested else 0.0])
        return flag > 0

    def _tensorboard(self, step: int):
        if not (self.config.loop.tensorboard and self.env.is_main):
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            raise ImportError(
                "loop.tensorboard needs the tensorboard package: pip install 'facemllm[tensorboard]'"
            ) from err
        return SummaryWriter(log_dir=str(self.output_dir / "tensorboard"), purge_step=step + 1)

    def _print_window(self, step, max_steps, window, lr, grad_norm, skipped) -> None:
        if not self.env.is_main or not window["steps"]:
            return
        seconds = max(window["time"], 1e-9)
        norm = "-" if grad_norm is None else f"{grad_norm:.3f}"
        line = (
            f"step {step}/{max_steps}  loss {window['loss'] / max(window['labels'], 1):.4f}  lr {lr:.2e}  "
            f"grad_norm {norm}  samples/s {window['samples'] / seconds:.1f}  tokens/s {window['tokens'] / seconds:.0f}  "
            f"data_wait {100 * window['wait'] / seconds:.0f}%"
        )
        skipped = {k: v for k, v in skipped.items() if v}
        if skipped:
            line += f"  skipped(stream) {skipped}"
        print(line, flush=True)

    def _trim_logs(self, step: int) -> None:
        """After a resume, forget what was logged past the checkpoint (it is about to be redone)."""
        paths = [self.output_dir / f"samples-rank{self.env.rank}.txt"]
        if self.env.is_main:
            paths.append(self.output_dir / "metrics.jsonl")
        for path in paths:
            if not path.is_file():
                continue
            kept = []
            for line in path.read_text().splitlines():
                at = json.loads(line)["step"] if line.startswith("{") else int(line.split("\t", 1)[0])
                if at <= step:
                    kept.append(line + "\n")
            path.write_text("".join(kept))

    def _save_checkpoint(self, step, loaded, optimizer, scheduler, data_state: DataState) -> None:
        from safetensors.torch import save_file

        env = self.env
        root = self.output_dir / CHECKPOINTS
        final = root / f"step-{step:08d}"
        tmp = root / f".tmp-step-{step:08d}"
        if env.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        env.barrier()
        torch.save({"rng": rng_state()}, tmp / f"rng-rank{env.rank:05d}.pt")
        write_json_atomic(tmp / f"data-rank{env.rank:05d}.json", data_state.to_json())
        env.barrier()
        if env.is_main:
            save_file(trainable_state(loaded), str(tmp / "trainable.safetensors"))
            torch.save(
                {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
                tmp / "optimizer.pt",
            )
            write_json_atomic(
                tmp / STATE_FILE,
                {
                    "step": step,
                    "world_size": env.world_size,
                    "num_workers": self.config.data.num_workers,
                    "config_digest": self.config.config_hash(),
                    "config": self.config.model_dump(mode="json"),
                },
            )
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            for old in checkpoint_dirs(self.output_dir)[: -self.config.loop.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
            print(f"checkpoint {final}", flush=True)
        env.barrier()

    def _load_checkpoint(self, path: Path, loaded, optimizer, scheduler) -> tuple[int, DataState, dict]:
        from safetensors.torch import load_file

        env = self.env
        state = json.loads((path / STATE_FILE).read_text())
        if state["world_size"] != env.world_size:
            raise ValueError(
                f"{path} was written by {state['world_size']} process(es); this run has {env.world_size}: "
                "resume with the same number of processes"
            )
        if state["config_digest"] != self.config.config_hash():
            log.warning("resuming %s with a changed configuration: the run will not replay exactly", path)
        load_trainable_state(loaded, load_file(str(path / "trainable.safetensors")))
        saved = torch.load(path / "optimizer.pt", map_location=env.device, weights_only=True)
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        rng = torch.load(path / f"rng-rank{env.rank:05d}.pt", weights_only=True)["rng"]
        data = DataState.from_json(json.loads((path / f"data-rank{env.rank:05d}.json").read_text()))
        return int(state["step"]), data, rng

    def _export(self, loaded: LoadedModel, summary: dict[str, Any]) -> None:
        if not self.env.is_main:
            return
        config = self.config
        amp = self._autocast_dtype()
        choice = config.loop.save_dtype
        dtype = (
            (torch.bfloat16 if amp is not None else torch.float32)
            if choice == "auto"
            else SAVE_DTYPES[choice]
        )
        final = self.output_dir / FINAL
        tmp = self.output_dir / f".tmp-{FINAL}"
        shutil.rmtree(tmp, ignore_errors=True)
        loaded.model.to("cpu")
        export_model(loaded, tmp, dtype)
        write_json_atomic(
            tmp / "facemllm_training.json",
            {
                "stage": config.stage,
                "trainable": config.trainable_parts,
                "lora": config.tune.lora.model_dump() if config.tune.lora.enabled else None,
                "steps": summary["step"],
                "config_digest": config.config_hash(),
                "last": summary["last"],
                "sources": [s.model_dump() for s in config.data.sources],
                "started_from": config.model.pretrained
                or {"vision_tower": config.model.vision_tower, "language_model": config.model.language_model},
                "config": config.model_dump(mode="json"),
            },
        )
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        summary["final"] = str(final)
        print(f"stage {config.stage} model saved to {final}", flush=True)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def train(config: TrainRunConfig) -> dict[str, Any]:
    """Run one stage in this process (one of ``torchrun``'s processes, or alone)."""
    env = init_distributed()
    try:
        return Trainer(config, env).run()
    finally:
        if env.distributed and dist.is_initialized():
            dist.destroy_process_group()
