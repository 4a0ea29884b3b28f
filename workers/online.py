"""Online (streaming) training: the model learns from records as they arrive, each record once.

The same model, optimizer, schedule, DDP and checkpoints as batch training (this class extends
:class:`~workers.trainer.Trainer`); what differs is where batches come from. Each step every rank
takes its next ``online.batch_size`` records of the stream (workers/stream.py), scores them with the
current model before learning from them (prequential, test-then-train accuracy), and the gradients are
averaged across ranks as usual, so all ranks hold the same weights.

Ranks move in lockstep: before each step they agree (one small all-reduce) on whether everyone has a
batch, whether a stop/save signal arrived, whether a wall-time checkpoint is due and whether the
stream went silent past ``online.idle_timeout_s`` — then they train, wait a little longer, save, or
checkpoint and end together. Checkpoints hold every rank's stream position, so a restarted run
continues with the first record not yet trained.
"""

from __future__ import annotations

import sys
import time
from collections import deque
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from workers import checkpoint as ck
from workers import testhooks
from workers.data.stream import Position, Record, StreamReader, resume_point
from workers.metrics import build_logger
from workers.optim import lr_at, set_lr
from workers.trainer import Trainer, progress_bar

STREAM = "stream"  # checkpoint key: {"world_size": W, "positions": [Position as dict per rank]}


class OnlineTrainer(Trainer):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.records = 0  # records trained, all ranks
        self.committed = Position()  # this rank's stream position after its last trained record
        self.positions: list[dict] | None = None  # every rank's, gathered for the next checkpoint
        self.resume_from: dict[str, Any] | None = None

    def state(self) -> dict[str, Any]:
        state = super().state()
        state["train_state"]["records"] = self.records
        state[STREAM] = {"world_size": self.comm.world_size, "positions": self.positions}
        return state

    def restore(self, state: dict[str, Any]) -> None:
        super().restore(state)
        self.records = state["train_state"].get("records", 0)
        self.resume_from = state.get(STREAM)

    def _reader(self) -> StreamReader:
        cfg, comm = self.cfg, self.comm
        start, skip = Position(), (lambda _index: False)
        if self.resume_from and self.resume_from.get("positions"):
            start, skip = resume_point(self.resume_from["positions"], comm.world_size, comm.rank)
        self.committed = start
        if comm.is_main and self.resume_from:
            file = cfg.online.source != "synthetic"
            where = f", {start.shard or cfg.online.path} byte {start.offset}" if file else ""
            print(f"resuming the stream after {self.records} records (rank 0 at line {start.line}{where})", flush=True)
        return StreamReader(cfg.online, cfg.online.features, cfg.online.classes, comm.rank, comm.world_size,
                            start, skip, cfg.seed)

    def _agree(self, reader: StreamReader, has_batch: bool, clock_due: bool) -> dict[str, bool]:
        """One all-reduce: what any rank asks for before this step (every rank must call it)."""
        local = torch.tensor([self.signals.stop_signal > 0, self.signals.take_save_request(), not has_batch,
                              reader.idle() and not has_batch, clock_due], dtype=torch.float32, device=self.comm.device)
        stop, save, missing, idle, due = (self.comm.allreduce_mean(local) > 0).tolist()
        if save:
            self.signals.mark_saved()
        return {"stop": stop, "save": save or due, "missing": missing, "idle": idle}

    def _checkpoint(self, force: bool, last: bool = False) -> None:
        """Gather every rank's stream position (a collective), then rank 0 saves if due or forced."""
        if not (force or ck.should_save(self.step, last, self.cfg.trainer.checkpoint_every)):
            return
        self.positions = self.comm.allgather_object(self.committed.to_dict())
        self.ckpt.save(self.step, last, self.state, force=True)

    def _train_batch(self, batch: list[Record]) -> tuple[torch.Tensor, torch.Tensor]:
        """Test, then train: (per-record losses, correct predictions) of this rank's records, before the update."""
        dev = self.comm.device
        x = torch.tensor([r.x for r in batch], dtype=torch.float32, device=dev)
        y = torch.tensor([r.y for r in batch], dtype=torch.long, device=dev)
        with self.autocast:
            logits = self.model(x).float()
            losses = F.cross_entropy(logits, y, reduction="none")
        losses.mean().backward()
        self.comm.clip_and_step(self.optimizer, self.model, self.cfg.trainer.grad_clip, False)
        self.optimizer.zero_grad()
        self.step += 1
        return losses.detach(), (logits.detach().argmax(1) == y)

    def train(self) -> dict[str, float]:
        cfg, comm, t, o = self.cfg, self.comm, self.cfg.trainer, self.cfg.online
        self.prepare()
        reader = self._reader()
        metrics = build_logger(comm.is_main, self.run_dir / "tb", self.step)
        # this rank's last outcomes and losses, for the rolling prequential metrics
        window: deque[float] = deque(maxlen=max(1, o.window // comm.world_size))
        window_loss: deque[float] = deque(maxlen=window.maxlen)
        seen = correct = 0.0  # this rank's, since the start of this run
        bar = progress_bar(t.max_steps or None, self.step, comm.is_main, "online")
        last_save, tick, tick_records = time.monotonic(), time.perf_counter(), self.records
        ended = "max_steps"
        while not t.max_steps or self.step < t.max_steps:
            has_batch = reader.fill(o.poll_s)
            clock_due = comm.is_main and 0 < o.checkpoint_every_s < time.monotonic() - last_save
            asked = self._agree(reader, has_batch, clock_due)
            if asked["stop"] or asked["idle"]:
                ended = ("a stop signal" if asked["stop"] else "the stream ended" if reader.finished()
                         else f"the stream was silent for {o.idle_timeout_s:g}s")
                break
            if asked["save"]:
                self._checkpoint(force=True)
                last_save = time.monotonic()
            if asked["missing"]:
                continue  # someone's batch is not complete yet: wait together
            batch, after = reader.take()
            lr = lr_at(self.step, self.peak, cfg.schedule, t.max_steps or sys.maxsize)
            set_lr(self.optimizer, lr)
            losses, hits = self._train_batch(batch)
            self.committed = after
            window_loss.extend(losses.tolist())
            self.records += len(batch) * comm.world_size
            window.extend(hits.float().tolist())
            seen, correct = seen + len(batch), correct + hits.sum().item()
            if testhooks.SAMPLE_LOG:
                with open(Path(testhooks.SAMPLE_LOG) / f"rank{comm.rank}.txt", "a") as f:
                    f.write(f"{self.step} " + " ".join(str(r.index) for r in batch) + "\n")
            bar.update(1)
            metrics.log({"lr": lr}, self.step)
            if self.step % t.log_every == 0:
                sums = comm.allreduce_mean(torch.tensor(
                    [losses.mean().item(), sum(window_loss), sum(window), len(window), correct, seen, reader.bad],
                    dtype=torch.float64, device=comm.device))
                loss_avg, win_loss, win_hits, win_n, hits_all, n_all, bad = (sums * comm.world_size).tolist()
                now = time.perf_counter()
                metrics.log({"train/loss": loss_avg / comm.world_size,
                             "online/prequential_loss": win_loss / max(win_n, 1),
                             "online/prequential_accuracy": win_hits / max(win_n, 1),
                             "online/prequential_accuracy_run": hits_all / max(n_all, 1),
                             "online/records": self.records, "online/bad_records": bad,
                             "perf/records_per_s": (self.records - tick_records) / max(now - tick, 1e-9)}, self.step)
                tick, tick_records = now, self.records
                bar.set_postfix(loss=f"{loss_avg / comm.world_size:.4f}", preq=f"{win_hits / max(win_n, 1):.3f}",
                                refresh=False)
            self._checkpoint(force=False)
            if self.step % t.eval_every == 0:
                metrics.log(self.evaluate(), self.step)
        bar.close()
        # the end, however it came: a checkpoint of what was trained, so a restart continues from here
        self._checkpoint(force=True, last=True)
        result = self.evaluate()
        totals = comm.allreduce_mean(torch.tensor([correct, seen, reader.bad], dtype=torch.float64,
                                                  device=comm.device)) * comm.world_size
        hits_all, n_all, bad = totals.tolist()
        result = {**result, "online/prequential_accuracy_run": hits_all / max(n_all, 1), "online/bad_records": bad,
                  "online/records": self.records}
        self.finish(result, f"online: ended ({ended}) at step {self.step} after {self.records} records; prequential "
                    f"accuracy {result['online/prequential_accuracy_run']:.4f}, {int(bad)} bad records; "
                    f"test accuracy {result.get('test/accuracy', float('nan')):.4f}")
        metrics.log(result, self.step)
        metrics.close()
        return result
