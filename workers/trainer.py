"""The training loop: data-parallel batch training that reads top to bottom (nanoGPT style)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset, default_collate
from tqdm import tqdm

from workers import checkpoint as ck
from workers import preflight, testhooks
from workers.comm import Comm
from workers.config import Config, to_dict, to_yaml
from workers.data import ResumableSampler, build_data
from workers.metrics import build_logger, flatten
from workers.model import build_model
from workers.optim import build_optimizer, lr_at, peak_lr, set_lr
from workers.signals import Requests, SignalFlags

SIGNAL_POLL_EVERY = 10  # steps between checks for stop/save requests


class _Lines:
    """tqdm target for pipes and log files: one line per refresh instead of carriage returns."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream

    def write(self, s: str) -> None:
        s = s.replace("\r", "").strip()
        if s:
            self.stream.write(s + "\n")

    def flush(self) -> None:
        self.stream.flush()


class Trainer:
    def __init__(self, cfg: Config, comm: Comm, run_dir: Path) -> None:
        self.cfg, self.comm, self.run_dir = cfg, comm, run_dir
        t, W = cfg.trainer, comm.world_size
        torch.set_num_threads(t.threads or max(1, (os.cpu_count() or 1) // comm.local_world_size))
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        self.data = build_data(cfg.data)
        # self.net: the bare module, for state dicts; self.model: what trains (DDP-wrapped, compiled)
        self.net = self.model = build_model(cfg.model, self.data).to(comm.device)
        self.optimizer = build_optimizer(cfg.optimizer, self.net.parameters(), W)
        self.peak = peak_lr(cfg.optimizer, W)
        self.sampler = ResumableSampler(self.data.train, W, comm.rank, cfg.seed)
        self.step, self.epoch, self.epoch_pos = 0, 0, 0  # epoch_pos: global samples done this epoch
        config_hash = hashlib.sha256(to_yaml(cfg).encode()).hexdigest()[:16]
        self.ckpt = ck.CheckpointManager(run_dir / "checkpoints", comm, t.checkpoint_every, t.keep_checkpoints,
                                         {"world_size": W, "comm": comm.name, "config_hash": config_hash,
                                          "torch_version": str(torch.__version__)},
                                         async_save=t.async_checkpoint)
        self.signals = SignalFlags()
        self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16)
                         if t.precision == "bf16" and comm.device.type == "cuda" else contextlib.nullcontext())
        if t.precision == "bf16" and comm.device.type != "cuda" and comm.is_main:
            print("trainer.precision=bf16 applies on CUDA only; training in fp32 on the CPU", flush=True)

    # -- checkpoint state ------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {
            ck.MODEL: self.net.state_dict(),
            ck.OPTIMIZER: self.optimizer.state_dict(),
            ck.TRAIN_STATE: {"step": self.step, "epoch": self.epoch, "epoch_pos": self.epoch_pos},
            ck.RNG: {"torch": torch.get_rng_state(), "python": random.getstate()},
            ck.CONFIG: to_dict(self.cfg),
        }

    def restore(self, state: dict[str, Any]) -> None:
        self.net.load_state_dict(state[ck.MODEL])
        self.optimizer.load_state_dict(state[ck.OPTIMIZER])
        ts = state[ck.TRAIN_STATE]
        self.step, self.epoch, self.epoch_pos = ts["step"], ts["epoch"], ts["epoch_pos"]
        if self.comm.is_main:  # other ranks re-seeded deterministically below; rank 0 continues exactly
            torch.set_rng_state(state[ck.RNG]["torch"])
            random.setstate(state[ck.RNG]["python"])

    # -- data --------------------------------------------------------------------------------
    def batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Endless stream of this rank's batches; keeps (epoch, epoch_pos) current for checkpoints."""
        B, W = self.cfg.data.batch_size, self.comm.world_size
        while True:
            self.sampler.set_epoch(self.epoch, start=self.epoch_pos)
            for idx in _chunks(list(self.sampler), B):
                self.epoch_pos += B * W
                if testhooks.SAMPLE_LOG:
                    self._log_samples(idx)
                x, y = _take(self.data.train, idx)
                yield x.to(self.comm.device, non_blocking=True), y.to(self.comm.device, non_blocking=True)
            self.epoch, self.epoch_pos = self.epoch + 1, 0

    def _log_samples(self, idx: list[int]) -> None:
        """Test hook: the dataset indices of the batch just taken."""
        with open(Path(testhooks.SAMPLE_LOG) / f"rank{self.comm.rank}.txt", "a") as f:
            f.write(f"{self.epoch} " + " ".join(map(str, idx)) + "\n")

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Test-split loss and accuracy; each rank scores a shard and the sums are all-reduced."""
        model, test = self.model, self.data.test
        model.eval()
        shard = Subset(test, range(self.comm.rank, len(test), self.comm.world_size))
        sums = torch.zeros(3, dtype=torch.float64, device=self.comm.device)  # loss sum, correct, count
        for x, y in DataLoader(shard, batch_size=256):
            x, y = x.to(self.comm.device), y.to(self.comm.device).flatten()
            with self.autocast:
                logits = model(x).flatten(0, -2).float()
            sums += torch.stack([F.cross_entropy(logits, y, reduction="sum"), (logits.argmax(1) == y).sum(),
                                 torch.tensor(len(y), device=y.device)]).double()
        loss_sum, correct, count = self.comm.allreduce_mean(sums).tolist()
        model.train()
        return {"test/loss": loss_sum / count, "test/accuracy": correct / count}

    # -- the loop ----------------------------------------------------------------------------
    def prepare(self) -> None:
        """Pre-flight check, wrap for data parallelism, resume from the newest intact checkpoint."""
        cfg, comm, t = self.cfg, self.comm, self.cfg.trainer
        ranks = comm.allgather_object(preflight.describe_rank(comm.rank, comm.local_rank))
        if comm.is_main:
            print(f"ranks:\n{preflight.table(ranks)}", flush=True)
        if found := preflight.problems(ranks, comm.local_world_size, comm.device.type):
            raise RuntimeError("pre-flight check failed: " + "; ".join(found))
        # wrap first, then load: Horovod's DistributedOptimizer is a new optimizer object that would
        # drop a state loaded into the one it wraps
        self.model = comm.wrap_model(self.net)
        if t.compile:  # after DDP: its optimizer splits the graph at bucket boundaries
            self.model = torch.compile(self.model)
        self.optimizer = comm.wrap_optimizer(self.optimizer, self.model, t.grad_accum_steps)
        state = self.ckpt.load()
        if state is not None:
            self.restore(state)
            if comm.is_main:
                print(f"resuming from step {self.step} (epoch {self.epoch}, sample {self.epoch_pos})", flush=True)
        comm.broadcast_state(self.model, self.optimizer)
        random.seed(cfg.seed + comm.rank + self.step)
        if state is None or not comm.is_main:
            torch.manual_seed(cfg.seed + comm.rank + self.step)

    def train_step(self, data: Iterator[tuple[torch.Tensor, torch.Tensor]],
                   want_norm: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One optimizer step over grad_accum_steps micro-batches: (summed loss, grad norm or None)."""
        comm, model, accum = self.comm, self.model, self.cfg.trainer.grad_accum_steps
        loss_sum = torch.zeros((), device=comm.device)
        for micro in range(accum):
            x, y = next(data)
            with comm.no_sync(model, last_micro_step=micro == accum - 1), self.autocast:
                # flatten(0, -2): (B, classes) stays; an LM's (B, T, vocab) becomes (B*T, vocab)
                loss = F.cross_entropy(model(x).flatten(0, -2).float(), y.flatten()) / accum
                loss.backward()
            loss_sum += loss.detach()
        grad_norm = comm.clip_and_step(self.optimizer, model, self.cfg.trainer.grad_clip, want_norm)
        self.optimizer.zero_grad()  # set_to_none by default (Horovod's optimizer takes no argument)
        self.step += 1
        return loss_sum, grad_norm

    def train(self) -> dict[str, float]:
        cfg, comm, t = self.cfg, self.comm, self.cfg.trainer
        self.prepare()
        metrics = build_logger(comm.is_main, self.run_dir / "tb", self.step)
        data = self.batches()
        samples_per_step = cfg.data.batch_size * t.grad_accum_steps * comm.world_size
        tty = sys.stdout.isatty()
        bar = tqdm(total=t.max_steps, initial=self.step, disable=not comm.is_main, desc="train",
                   file=sys.stdout if tty else _Lines(sys.stdout), mininterval=1.0 if tty else 5.0,
                   ascii=not tty, ncols=None if tty else 100)
        result: dict[str, float] = {}
        tick, tick_step = time.perf_counter(), self.step
        while self.step < t.max_steps:
            lr = lr_at(self.step, self.peak, cfg.schedule, t.max_steps)
            set_lr(self.optimizer, lr)
            logging = (self.step + 1) % t.log_every == 0 or self.step + 1 == t.max_steps
            loss_sum, grad_norm = self.train_step(data, want_norm=logging)
            last = self.step == t.max_steps
            bar.update(1)
            metrics.log({"lr": lr}, self.step)  # every step: schedules are checked against their formula
            if logging:
                loss_avg = comm.allreduce_mean(loss_sum).item()  # .item() syncs with the device
                now = time.perf_counter()
                rate = (self.step - tick_step) * samples_per_step / max(now - tick, 1e-9)
                tick, tick_step = now, self.step
                perf = {"perf/samples_per_s": rate}
                if self.data.context:
                    perf["perf/tokens_per_s"] = rate * self.data.context
                metrics.log({"train/loss": loss_avg, "train/grad_norm": grad_norm.item(), **perf,
                             "train/epoch": self.epoch}, self.step)
                bar.set_postfix(loss=f"{loss_avg:.4f}", lr=f"{lr:.2e}", refresh=False)
            # a collective: polling every SIGNAL_POLL_EVERY steps keeps its cost off the step time, and
            # a stop or save still lands within those few steps of the signal
            asked = self.signals.poll(comm) if self.step % SIGNAL_POLL_EVERY == 0 else Requests()
            stall = self.ckpt.save(self.step, last, self.state, force=asked.stop or asked.save)
            if stall is not None:  # rank 0 only
                metrics.log({"perf/checkpoint_stall_ms": stall * 1e3}, self.step)
                mode = "async" if t.async_checkpoint and not (last or asked.stop or asked.save) else "sync"
                tqdm.write(f"checkpoint step {self.step}: training stalled {stall * 1e3:.1f} ms ({mode})",
                           file=sys.stdout)
            if asked.stop:
                if comm.is_main:
                    print(f"stopping on request at step {self.step}: checkpoint saved", flush=True)
                break
            if self.step % t.eval_every == 0 or last:
                result = self.evaluate()
                metrics.log(result, self.step)
        bar.close()
        if self.step < t.max_steps:  # stopped by a signal: no final evaluation, exit quickly
            metrics.close()
            return result
        result = result or self.evaluate()
        if comm.is_main:
            print(f"step {self.step}: test accuracy {result['test/accuracy']:.4f}, "
                  f"test loss {result['test/loss']:.4f}", flush=True)
            (self.run_dir / "result.json").write_text(json.dumps({"step": self.step, **result}, indent=1))
            metrics.hparams(flatten(to_dict(cfg)), {"hparam/" + k: v for k, v in result.items()})
        metrics.close()
        return result


def _chunks(indices: list[int], size: int) -> Iterator[list[int]]:
    """Full batches only (drop_last): every rank takes the same number of steps."""
    for start in range(0, len(indices) - size + 1, size):
        yield indices[start : start + size]


def _take(dataset: Dataset, idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    # in-memory tensors: one fancy-index per batch instead of DataLoader's per-sample fetch + collate
    if isinstance(dataset, TensorDataset):
        x, y = dataset.tensors
        return x[idx], y[idx]
    return default_collate([dataset[i] for i in idx])
