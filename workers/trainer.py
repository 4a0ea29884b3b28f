"""The training loop: data-parallel training of the user's task that reads top to bottom (nanoGPT style).

Model, data, loss, metrics and optimizer come from the config's ``_target_`` nodes (workers/task.py, built by
workers/build.py); batches from a source (workers/sources.py: epochs over a resumable DataLoader, or a stream,
workers/online.py). The loop adds what every run needs: mixed precision, gradient accumulation and clipping,
rank-0 checkpoints and TensorBoard, evaluation (workers/evaluate.py), stop/save signals and a progress bar.
"""

from __future__ import annotations

import json
import random
import sys
import time
from collections.abc import Iterable
from functools import partial
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from workers import checkpoint as ck
from workers import collector, contract, hooks, progress, rank, task
from workers import state as train_state
from workers.build import build, build_once, mixed_precision, threads_and_seeds
from workers.config import Config, to_dict
from workers.distributed import topology
from workers.distributed.comm import Comm, agree
from workers.evaluate import evaluate
from workers.metrics import build_logger, flatten, progress_bar, recovery
from workers.optim import lr_at, set_lr
from workers.signals import SignalFlags
from workers.sources import STOP_SIGNAL, EpochSource
from workers.straggler import StragglerDetector


class Trainer:
    def __init__(self, cfg: Config, comm: Comm, run_dir: Path) -> None:
        self.cfg, self.comm, self.run_dir = cfg, comm, run_dir
        t, W, dev = cfg.trainer, comm.world_size, comm.device
        threads_and_seeds(cfg, comm)
        self.channels_last = t.channels_last and dev.type == "cuda"
        # self.net: the bare module, for state dicts; self.model: what trains (DDP-wrapped, compiled).
        # One gather for the whole build and every rank's pre-flight facts (host, GPUs, versions).
        built, self.ranks = build_once(comm, lambda: build(cfg, comm, self.channels_last),
                                       topology.describe_rank(comm.rank, comm.local_rank))
        self.net, self.loader, self.eval_set = built.net, built.loader, built.eval_set
        self.loss_fn, self.metric_fns, self.optimizer = built.loss_fn, built.metric_fns, built.optimizer
        self.model = self.net
        self.peak = task.peak_lr(cfg, W)
        self.step = 0
        self.tokens_per_sample = 0  # targets per sample for sequence models (B, T): reported as tokens/s
        self.data_wait_s = 0.0  # time this rank waited for batches since the last log step (perf/data_wait_frac)
        self.ckpt = ck.for_run(run_dir, comm, to_dict(cfg), t.checkpoint_every, t.keep_checkpoints,
                               t.async_checkpoint)
        self.signals = SignalFlags()
        self.saved_step = -1  # the step of the newest checkpoint this run saved or resumed from
        self.metrics: Any = None  # TensorBoard (rank 0), opened by run()
        if cfg.mode == "online":
            from workers.online import StreamSource

            self.source: Any = StreamSource(cfg.online, comm, self.signals, cfg.seed)
        else:
            self.source = EpochSource(self.loader, comm, self.signals, t.grad_accum_steps)
        self.autocast, self.scaler = mixed_precision(t.precision, dev, comm.is_main)

    # -- data --------------------------------------------------------------------------------
    def forward_loss(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """(loss, outputs, targets) of one ``(inputs, targets)`` batch, under autocast."""
        inputs, targets = batch
        with self.autocast:
            outputs = self.model(inputs)
            loss = self.loss_fn(outputs, targets)
        return loss, outputs, targets

    def evaluate(self) -> dict[str, float]:
        return evaluate(self.model, self.eval_set, self.forward_loss, self.metric_fns, self.comm, self.cfg.data,
                        self.channels_last)

    # -- the loop ----------------------------------------------------------------------------
    def prepare(self) -> None:
        """Pre-flight check, wrap for data parallelism, resume from the newest intact checkpoint."""
        cfg, comm, t = self.cfg, self.comm, self.cfg.trainer
        topology.check(self.ranks, comm.is_main, comm.local_world_size, comm.device.type)  # gathered by build_once
        # wrap first, then load: Horovod's DistributedOptimizer is a new optimizer object that would
        # drop a state loaded into the one it wraps
        self.model = comm.wrap_model(self.net)
        if t.compile:  # after DDP: its optimizer splits the graph at bucket boundaries
            self.model = torch.compile(self.model)
        self.optimizer = comm.wrap_optimizer(self.optimizer, self.model, t.grad_accum_steps)
        state = self.ckpt.load()
        if state is not None:
            train_state.restore(self, state)
        comm.broadcast_state(self.model, self.optimizer)
        if comm.name == "torchft":  # a healing group gets this state from a live peer (workers/distributed/ft.py)
            comm.register(partial(train_state.heal_state, self), partial(train_state.load_healed, self))
            comm.resume_at(self.step, state.get(train_state.FT_STATE) if state is not None else None)
        if getattr(comm, "elastic", False):  # Horovod Elastic commits and restores it (workers/distributed/elastic.py)
            comm.register(partial(train_state.position, self), partial(train_state.reposition, self))
        if state is None or not comm.is_main:  # rank 0 of a resumed run goes on with the generators it restored
            random.seed(cfg.seed + comm.rank + self.step)
            torch.manual_seed(cfg.seed + comm.rank + self.step)

    def train_step(self, batches: Iterable[Any], logging: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """One optimizer step over grad_accum_steps micro-batches: (the micro-batches' summed loss, the grad norm)
        at a log step; else the loss is None (nothing accumulated or allocated for it) and so is the norm, unless
        clipping computed it anyway."""
        comm, model, accum = self.comm, self.model, self.cfg.trainer.grad_accum_steps
        if comm.name == "torchft":
            # torchft's zero_grad starts this step's quorum (in the background, during the forward pass). Here, not
            # after the last step: a log step's all-reduce must stay in the quorum of the step it belongs to, which
            # a group that heals joins at a step's start
            self.optimizer.zero_grad()
        loss_sum = None
        data_s, forward_s, clock = 0.0, 0.0, time.perf_counter()  # this rank's own share of the step (straggler)
        for micro, batch in enumerate(batches):  # waits for the batch (on the device): data_s
            if hooks.before_forward:
                hooks.before_forward(self)
            fetched = time.perf_counter()
            data_s += fetched - clock
            if micro == 0:
                progress.phase(contract.STEP)  # the batch is here: computing now (and waiting in the all-reduce)
            if not self.tokens_per_sample and isinstance(batch[1], torch.Tensor):
                self.tokens_per_sample = batch[1][0].numel() if batch[1].dim() > 1 else -1
            with comm.no_sync(model, last_micro_step=micro == accum - 1):
                loss, outputs, targets = self.forward_loss(batch)
                forward_s += time.perf_counter() - fetched
                if accum > 1:
                    loss = loss / accum
                (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            if logging:
                loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
            self.source.trained(outputs, targets)  # not detached here: a source that keeps them detaches
            clock = time.perf_counter()
        self.straggler.add(data_s, forward_s)
        self.data_wait_s += data_s
        grad_norm = comm.clip_and_step(self.optimizer, model, self.cfg.trainer.grad_clip, logging, self.scaler)
        if comm.name != "torchft":
            self.optimizer.zero_grad()  # set_to_none by default (Horovod's optimizer takes no argument)
        self.step = comm.committed_step(self.step + 1)  # torchft: a discarded step is not one, a heal jumps
        return loss_sum, grad_norm

    def checkpoint(self, last: bool = False, force: bool = False) -> float | None:
        """Save if due or forced (every rank calls it; each step at most once); rank 0's stall in seconds."""
        due = force or ck.should_save(self.step, last, self.cfg.trainer.checkpoint_every)
        if not due or self.saved_step == self.step:
            return None
        progress.phase(contract.CHECKPOINT)
        self.source.before_save()
        self.saved_step = self.step
        stall = self.ckpt.save(self.step, last, partial(train_state.checkpoint_state, self), force=force)
        progress.phase(contract.STEP)
        return stall

    def train(self) -> dict[str, float]:
        self.prepare()
        return self.comm.drive(self.run)  # Horovod Elastic: run() again after each reset (distributed/elastic.py)

    def run(self) -> dict[str, float]:
        """The loop, from ``self.step`` to the end, then the closing evaluation and line."""
        cfg, comm, t, source = self.cfg, self.comm, self.cfg.trainer, self.source
        self.open_run()
        result: dict[str, float] = {}
        ended, current_lr = "max_steps", None
        if hooks.loop_start:
            hooks.loop_start(self)
        collector.pause()
        while not t.max_steps or self.step < t.max_steps:  # max_steps=0: until the stream ends (online)
            if hooks.before_step:
                hooks.before_step(self)
            progress.step(self.step + 1)
            turn = source.next(self.step)
            if turn.save or turn.stop:
                self.report_save(self.checkpoint(force=True), forced=True)
            if turn.stop:
                ended = turn.ended
                break
            if turn.batches is None:
                continue
            lr = lr_at(self.step, self.peak, cfg.schedule, t.max_steps or sys.maxsize)
            if lr != current_lr:  # the param groups are touched only when the schedule moves
                set_lr(self.optimizer, lr)
                current_lr = lr
            # every reduction and every TensorBoard scalar of a step happens at log steps only
            logging = (self.step + 1) % t.log_every == 0 or self.step + 1 == t.max_steps
            loss_sum, grad_norm = self.train_step(turn.batches, logging)
            if comm.name == "torchft":  # a heal in this step jumped to the peers' step: log (a collective) as they do
                logging = self.step % t.log_every == 0 or self.step == t.max_steps
                loss_sum = loss_sum if loss_sum is not None or not logging else torch.zeros((), device=comm.device)
            if self.step == self.recovered_at:
                self.metrics.log(recovery(self.run_dir, self.attempt), self.step)
            if hooks.after_step:
                hooks.after_step(self)
            last = self.step == t.max_steps
            self.bar.update(1)  # redraws at most every mininterval (progress_bar)
            if t.log_lr_every_step and not logging:  # opt-in: a test checks a schedule step by step
                self.metrics.log({"lr": lr}, self.step)
            if logging:
                assert loss_sum is not None
                self.log_step(loss_sum, grad_norm, lr)
            self.report_save(self.checkpoint(last=last))
            if self.step % t.eval_every == 0 or last:
                result = self.evaluate()
                self.metrics.log(result, self.step)
            collector.collect(self.step)
        self.bar.close()
        if hooks.loop_end:
            hooks.loop_end(self)
        collector.resume()
        return self.close(ended, result)

    def open_run(self) -> None:
        """What each run() opens (Horovod Elastic runs it again after a reset): the source at the current step,
        TensorBoard, the straggler detector, the progress bar and the throughput window."""
        comm, t = self.comm, self.cfg.trainer
        self.source.start(self.step)
        if self.metrics is not None:  # a Horovod Elastic reset: the writer starts again at the step rolled back to
            self.metrics.close()
        # torchft: whichever group is rank 0 of the quorum at the moment writes
        self.metrics = build_logger(comm.is_main, contract.tensorboard_dir(self.run_dir), self.step,
                                    gate=getattr(comm, "writes", None))
        self.straggler = StragglerDetector(t.straggler_factor, t.straggler_windows, self.model,  # the wrapped model
                                           hosts=[r["host"] for r in self.ranks])
        self.bar = progress_bar(t.max_steps or None, self.step, comm.is_main, self.source.name)
        self.window = (time.perf_counter(), self.step)  # the throughput window: since the last log step
        self.attempt = rank.current_attempt()
        self.recovered_at = self.step + 1 if self.attempt and comm.is_main else -1  # a restart's first step

    def log_step(self, loss_sum: torch.Tensor, grad_norm: torch.Tensor | None, lr: float) -> None:
        """A log step: its one all-reduce, then rank 0's TensorBoard scalars and the bar's loss."""
        comm, t, source = self.comm, self.cfg.trainer, self.source
        loss_avg, (sums, times) = agree(comm, loss_sum, source.log_values(self.step), self.straggler.local(comm))
        now = time.perf_counter()
        window_start, window_step = self.window
        samples = (self.step - window_step) * source.batch_size * t.grad_accum_steps * comm.world_size
        rate = samples / max(now - window_start, 1e-9)
        self.window = (now, self.step)
        logged = {"train/loss": loss_avg, "lr": lr, "perf/samples_per_s": rate, **source.log(sums, self.step),
                  # the share of the window rank 0 waited for its input: the loader keeping up is ~0
                  "perf/data_wait_frac": self.data_wait_s / max(now - window_start, 1e-9)}
        self.data_wait_s = 0.0
        if comm.device.type == "cuda":  # the allocator's own counter: no device sync
            logged["perf/max_memory_gb"] = torch.cuda.max_memory_allocated(comm.device) / 1e9
        if self.tokens_per_sample > 0:
            logged["perf/tokens_per_s"] = rate * self.tokens_per_sample
        if grad_norm is not None:
            logged["train/grad_norm"] = grad_norm.item()
        logged.update(self.straggler.check(comm, times))  # rank 0's scalars
        if comm.name == "torchft":
            logged.update(comm.log_values(source.batch_size * t.grad_accum_steps))
        self.metrics.log(logged, self.step)
        self.bar.set_postfix(loss=f"{loss_avg:.4f}", lr=f"{lr:.2e}", refresh=False)

    def report_save(self, stall: float | None, forced: bool = False) -> None:
        """Rank 0 (the only one with a stall): a checkpoint's stall in TensorBoard and a line above the bar."""
        if stall is not None:
            t = self.cfg.trainer
            self.metrics.log({"perf/checkpoint_stall_ms": stall * 1e3}, self.step)
            mode = "async" if t.async_checkpoint and not forced and self.step != t.max_steps else "sync"
            tqdm.write(f"checkpoint step {self.step}: training stalled {stall * 1e3:.1f} ms ({mode})", file=sys.stdout)

    def close(self, ended: str, result: dict[str, float]) -> dict[str, float]:
        """After the loop: the final checkpoint, evaluation, closing line, result.json and hparams; a stop signal
        (batch mode) skips all but the checkpoint, saved already, to exit quickly."""
        source, metrics = self.source, self.metrics
        if ended == STOP_SIGNAL and not source.finish_on_stop:
            if self.comm.is_main:
                print(f"stopping on request at step {self.step}: checkpoint saved", flush=True)
            metrics.close()
            self.loader.close()
            return result
        self.report_save(self.checkpoint(last=True, force=True), forced=True)  # the end, however it came
        fresh = ended != "max_steps" or not result  # else the last step's evaluation is the result
        if fresh:
            result = self.evaluate()
        result, line = source.summary(ended, result, self.step)
        if self.comm.is_main:  # the closing line(s) and result.json
            print(line, flush=True)
            if self.comm.name == "torchft":
                print(self.comm.summary(source.batch_size * self.cfg.trainer.grad_accum_steps), flush=True)
            contract.result_file(self.run_dir).write_text(json.dumps({"step": self.step, **result}, indent=1))
        if fresh or source.finish_on_stop:
            metrics.log(result, self.step)
        metrics.hparams(flatten(to_dict(self.cfg)), {"hparam/" + k: v for k, v in result.items()})
        metrics.close()
        self.loader.close()
        return result
