"""The training loop: data-parallel training of the user's task that reads top to bottom (nanoGPT style).

Model, data, loss, metrics and optimizer come from the config's ``_target_`` nodes (workers/task.py);
batches from a resumable DataLoader (workers/data/loader.py). The loop adds what every run needs:
mixed precision, gradient accumulation and clipping, rank-0 checkpoints and TensorBoard, evaluation,
stop/save signals and a progress bar.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import os
import random
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from workers import checkpoint as ck
from workers import hooks, progress, rank, task
from workers.config import Config, to_dict
from workers.data.loader import TrainLoader, loader_kwargs, shard_loader, to_device
from workers.distributed import topology as preflight
from workers.distributed.comm import Comm
from workers.metrics import build_logger, flatten
from workers.optim import lr_at, set_lr
from workers.signals import SignalFlags
from workers.sources import STOP_SIGNAL, EpochSource
from workers.straggler import StragglerDetector

SCALER = "grad_scaler"  # checkpoint key of the fp16 GradScaler's state
FT_STATE = "torchft"  # checkpoint key of torchft's Manager state (--fault-tolerant)
GC_EVERY = 200  # steps between (young-generation) garbage collections while training; paused otherwise


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


def progress_bar(total: int | None, initial: int, enabled: bool, desc: str) -> tqdm:
    """tqdm on rank 0: redrawn in place on a terminal, a line every few seconds in a log."""
    tty = sys.stdout.isatty()
    return tqdm(total=total, initial=initial, disable=not enabled, desc=desc,
                file=sys.stdout if tty else _Lines(sys.stdout), mininterval=1.0 if tty else 5.0,
                ascii=not tty, ncols=None if tty else 100)


def recovery(run_dir: Path, attempt: int) -> dict[str, float]:
    """TensorBoard's record of a restart: its number and the seconds from the failure to this first step."""
    out = {"restarts/count": float(attempt)}
    with contextlib.suppress(OSError, ValueError, KeyError):  # the launcher writes it; a bare torchrun does not
        failed_at = json.loads((run_dir / "attempts" / str(attempt - 1) / "failure.json").read_text())["at"]
        out["restarts/recovery_s"] = time.time() - failed_at
    return out


def build_once(comm: Comm, build: Callable[[], Any], facts: Any = None) -> tuple[Any, list[Any]]:
    """Build on every rank; if it raises anywhere, the lowest failing rank prints the traceback (once, not
    once per rank) and all ranks exit 1. ``facts`` (this rank's pre-flight description) travel in the same
    gather, so start-up pays one collective for both: returns (what was built, every rank's facts)."""
    try:
        built, error, exc = build(), None, None
    except Exception as e:
        built, error, exc = None, traceback.format_exc(), e
    gathered = comm.allgather_object((error, facts))
    errors = [e for e, _ in gathered]
    failed = [r for r, e in enumerate(errors) if e]
    if failed:
        if comm.rank == failed[0]:
            print(f"building the task failed on rank(s) {failed}:\n{error}", file=sys.stderr, flush=True)
            rank.record_error(exc)  # the launcher's failure report shows it (failure.json)
        else:  # let the reporting rank be the first to exit: the launcher names the first failure
            time.sleep(3)
        raise SystemExit(1)
    return built, [f for _, f in gathered]


def pause_gc() -> None:
    """Keep Python's cyclic garbage collector out of the steps (torchtitan's recipe): what set-up made —
    modules, model, dataset, hundreds of thousands of objects — moves to the permanent generation, and
    the young generations are collected every GC_EVERY steps instead of whenever allocations cross a
    threshold (a full collection would scan everything made since, the TensorBoard import at the first
    log step among it: tens of ms). Startup's own garbage, if any, stays: a full collection first would
    cost a large fraction of a second before the first step."""
    global _FORK_HOOKED
    gc.freeze()
    gc.disable()
    if not _FORK_HOOKED:  # DataLoader workers forked from here run on their own: with the collector on
        os.register_at_fork(after_in_child=gc.enable)
        _FORK_HOOKED = True


def resume_gc() -> None:
    gc.unfreeze()
    gc.enable()


_FORK_HOOKED = False


class Trainer:
    def __init__(self, cfg: Config, comm: Comm, run_dir: Path) -> None:
        self.cfg, self.comm, self.run_dir = cfg, comm, run_dir
        t, W, dev = cfg.trainer, comm.world_size, comm.device
        ranks_here = getattr(comm, "ranks_on_node", comm.local_world_size)  # torchft: every group on this node
        torch.set_num_threads(t.threads or max(1, (os.cpu_count() or 1) // ranks_here))
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        random.seed(cfg.seed)
        self.channels_last = t.channels_last and dev.type == "cuda"
        # self.net: the bare module, for state dicts; self.model: what trains (DDP-wrapped, compiled).
        # One gather for the whole build and every rank's pre-flight facts (host, GPUs, versions).
        built, self.ranks = build_once(comm, self._build, preflight.describe_rank(comm.rank, comm.local_rank))
        self.net, self.eval_set, self.loss_fn, self.metric_fns, self.optimizer = built
        self.model = self.net
        self.peak = task.peak_lr(cfg, W)
        self.step = 0
        self.tokens_per_sample = 0  # targets per sample for sequence models (B, T): reported as tokens/s
        self.data_wait_s = 0.0  # time this rank waited for batches since the last log step (perf/data_wait_frac)
        config_hash = hashlib.sha256(json.dumps(to_dict(cfg), sort_keys=True).encode()).hexdigest()[:16]
        self.ckpt = ck.CheckpointManager(run_dir / "checkpoints", comm, t.checkpoint_every, t.keep_checkpoints,
                                         {"world_size": W, "comm": comm.name, "config_hash": config_hash,
                                          "torch_version": str(torch.__version__)},
                                         async_save=t.async_checkpoint)
        self.signals = SignalFlags()
        self.saved_step = -1  # the step of the newest checkpoint this run saved or resumed from
        self.metrics: Any = None  # TensorBoard (rank 0), opened by run()
        if cfg.mode == "online":
            from workers.online import StreamSource

            self.source: Any = StreamSource(self)
        else:
            self.source = EpochSource(self)
        cuda = dev.type == "cuda"
        amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(t.precision)
        self.autocast = torch.autocast("cuda", dtype=amp) if amp and cuda else contextlib.nullcontext()
        # fp16 gradients underflow without loss scaling; bf16 has fp32's range and needs none
        self.scaler = torch.amp.GradScaler("cuda") if t.precision == "fp16" and cuda else None
        if amp and not cuda and comm.is_main:
            print(f"trainer.precision={t.precision} applies on CUDA only; training in fp32 on the CPU", flush=True)

    def _build(self) -> tuple[Any, ...]:
        cfg, dev = self.cfg, self.comm.device
        model = task.build_model(cfg).to(dev)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        train, evaluation = task.build_data(cfg)
        self.loader = TrainLoader(train, int(cfg.data["batch_size"]), self.comm.world_size, self.comm.rank, cfg.seed,
                                  dev, loader_kwargs(cfg.data, dev), self.channels_last)
        optimizer = task.build_optimizer(cfg, model, self.comm.world_size, dev.type)
        return model, evaluation, task.build_loss(cfg), task.build_metrics(cfg), optimizer

    # -- checkpoint state ------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        state = {
            ck.MODEL: self.net.state_dict(),
            ck.OPTIMIZER: self.optimizer.state_dict(),
            ck.TRAIN_STATE: {"step": self.step, **self.source.state_dict()},
            ck.RNG: {"torch": torch.get_rng_state(), "python": random.getstate(),
                     # dropout on the GPU draws from the device's generator: an exact resume needs it too
                     **({"cuda": torch.cuda.get_rng_state(self.comm.device)} if self.comm.device.type == "cuda"
                        else {})},
            ck.CONFIG: to_dict(self.cfg),
        }
        if self.scaler is not None:
            state[SCALER] = self.scaler.state_dict()
        if self.comm.name == "torchft":  # the Manager's state: a whole-job restart resumes it from disk
            state[FT_STATE] = self.comm.state_dict()
        return state

    def restore(self, state: dict[str, Any]) -> None:
        self.net.load_state_dict(state[ck.MODEL])
        self.optimizer.load_state_dict(state[ck.OPTIMIZER])
        self.step = self.saved_step = state[ck.TRAIN_STATE]["step"]
        self.source.load_state_dict(state[ck.TRAIN_STATE])
        if self.scaler is not None and SCALER in state:
            self.scaler.load_state_dict(state[SCALER])
        if self.comm.is_main:  # other ranks re-seeded deterministically below; rank 0 continues exactly
            torch.set_rng_state(state[ck.RNG]["torch"])
            random.setstate(state[ck.RNG]["python"])
            if "cuda" in state[ck.RNG] and self.comm.device.type == "cuda":
                torch.cuda.set_rng_state(state[ck.RNG]["cuda"], self.comm.device)

    # -- torchft: the state a healing group receives from a live peer ------------------------
    def heal_state(self) -> dict[str, Any]:
        return {"step": self.step, ck.MODEL: self.net.state_dict(), ck.OPTIMIZER: self.optimizer.state_dict(),
                ck.TRAIN_STATE: self.source.state_dict()}

    def load_healed(self, state: dict[str, Any]) -> None:
        """Take a live peer's state: its weights, optimizer and step, and the data position that goes with it (the
        batches this group would have trained in the steps it missed are skipped: workers/distributed/ft.py counts)."""
        self.net.load_state_dict(state[ck.MODEL])
        self.optimizer.load_state_dict(state[ck.OPTIMIZER])
        self.reposition(int(state["step"]), state[ck.TRAIN_STATE])

    def position(self) -> tuple[int, dict[str, Any]]:
        """(step, data position): what Horovod Elastic commits beside the weights and the optimizer."""
        return self.step, self.source.state_dict()

    def reposition(self, step: int, train_state: dict[str, Any]) -> None:
        """Go on from ``step`` at the data position ``train_state``, after a heal (torchft) or an elastic reset
        (Horovod), whose world may have another size: the loader re-shards the rest of the epoch for this rank."""
        if (self.loader.rank, self.loader.world_size) != (self.comm.rank, self.comm.world_size):
            self.loader.close()
            self.loader = TrainLoader(self.loader.dataset, self.loader.batch_size, self.comm.world_size,
                                      self.comm.rank, self.cfg.seed, self.comm.device,
                                      loader_kwargs(self.cfg.data, self.comm.device), self.channels_last)
        self.peak = task.peak_lr(self.cfg, self.comm.world_size)  # scale_lr_with_world_size follows the new size
        self.source.load_state_dict(train_state)
        self.step = step
        self.source.restart()

    # -- data --------------------------------------------------------------------------------
    def batches(self) -> Iterator[Any]:
        """This rank's training batches, on the device."""
        return iter(self.loader)

    def forward_loss(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """(loss, outputs, targets) of one ``(inputs, targets)`` batch, under autocast."""
        inputs, targets = batch
        with self.autocast:
            outputs = self.model(inputs)
            loss = self.loss_fn(outputs, targets)
        return loss, outputs, targets

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Loss and metrics on the eval split: each rank scores a shard, sums are all-reduced."""
        if self.eval_set is None:
            return {}
        progress.phase("eval")
        model, dev, comm = self.model, self.comm.device, self.comm
        model.eval()
        names = [*self.metric_fns, "loss"]  # metrics first: the closing line leads with them
        sums = torch.zeros(2 * len(names), dtype=torch.float64, device=dev)  # (value * n, n) per name
        kw = {k: v for k, v in loader_kwargs(self.cfg.data, dev).items() if k != "persistent_workers"}
        batch_size = max(256, int(self.cfg.data["batch_size"]))
        batches = shard_loader(self.eval_set, comm.rank, comm.world_size, batch_size, kw)
        for batch in batches:
            loss, outputs, targets = self.forward_loss(to_device(batch, dev, self.channels_last))
            n = float(len(targets))
            values = [*(fn(outputs, targets) for fn in self.metric_fns.values()), loss]
            for i, v in enumerate(values):
                if v is not None:
                    sums[2 * i] += float(v) * n
                    sums[2 * i + 1] += n
            progress.beat()
        totals = (comm.allreduce_mean(sums) * comm.world_size).tolist()
        model.train()
        progress.phase("step")
        return {f"test/{name}": totals[2 * i] / totals[2 * i + 1] for i, name in enumerate(names) if totals[2 * i + 1]}

    # -- the loop ----------------------------------------------------------------------------
    def prepare(self) -> None:
        """Pre-flight check, wrap for data parallelism, resume from the newest intact checkpoint."""
        cfg, comm, t = self.cfg, self.comm, self.cfg.trainer
        ranks = self.ranks  # gathered with the build (build_once)
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
        comm.broadcast_state(self.model, self.optimizer)
        if comm.name == "torchft":  # a healing group gets this state from a live peer (workers/distributed/ft.py)
            comm.register(self.heal_state, self.load_healed)
            comm.resume_at(self.step, state.get(FT_STATE) if state is not None else None)
        if getattr(comm, "elastic", False):  # Horovod Elastic commits and restores it (workers/distributed/elastic.py)
            comm.register(self.position, self.reposition)
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
                progress.phase("step")  # the batch is here: computing now (and waiting in the all-reduce)
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

    def agree(self, loss_sum: torch.Tensor, *parts: list[float]) -> tuple[float, list[list[float]]]:
        """A log step's one all-reduce: (the loss averaged over the ranks, each part's values summed over them).
        What rides along: the source's (batch mode's stop/save requests, online mode's prequential sums) and
        the straggler detector's (every rank's local step time)."""
        comm = self.comm
        buffer = torch.tensor([0.0, *(v for part in parts for v in part)], dtype=torch.float64, device=comm.device)
        buffer[0] = loss_sum
        mean = comm.allreduce_mean(buffer).tolist()  # .tolist() syncs with the device
        sums, start = [], 1
        for part in parts:
            sums.append([v * comm.world_size for v in mean[start : start + len(part)]])
            start += len(part)
        return mean[0], sums

    def finish(self, result: dict[str, float], summary: str) -> None:
        """Rank 0: the closing line, result.json and the TensorBoard hparams of the run."""
        if self.comm.is_main:
            print(summary, flush=True)
            if self.comm.name == "torchft":
                print(self.comm.summary(self.source.batch_size * self.cfg.trainer.grad_accum_steps), flush=True)
            (self.run_dir / "result.json").write_text(json.dumps({"step": self.step, **result}, indent=1))

    def checkpoint(self, last: bool = False, force: bool = False) -> float | None:
        """Save if due or forced (every rank calls it; each step at most once); rank 0's stall in seconds."""
        due = force or ck.should_save(self.step, last, self.cfg.trainer.checkpoint_every)
        if not due or self.saved_step == self.step:
            return None
        progress.phase("checkpoint")
        self.source.before_save()
        self.saved_step = self.step
        stall = self.ckpt.save(self.step, last, self.state, force=force)
        progress.phase("step")
        return stall

    def train(self) -> dict[str, float]:
        self.prepare()
        return self.comm.drive(self.run)  # Horovod Elastic: run() again after each reset (distributed/elastic.py)

    def run(self) -> dict[str, float]:
        """The loop, from ``self.step`` to the end, then the closing evaluation and line."""
        cfg, comm, t, source = self.cfg, self.comm, self.cfg.trainer, self.source
        source.start()
        if self.metrics is not None:  # a Horovod Elastic reset: the writer starts again at the step rolled back to
            self.metrics.close()
        # torchft: whichever group is rank 0 of the quorum at the moment writes
        metrics = self.metrics = build_logger(comm.is_main, self.run_dir / "tb", self.step,
                                              gate=getattr(comm, "writes", None))
        self.straggler = StragglerDetector(t.straggler_factor, t.straggler_windows, self.model,  # the wrapped model
                                           hosts=[r["host"] for r in self.ranks])

        def saved(stall: float | None, forced: bool = False) -> None:
            if stall is not None:  # rank 0 only
                metrics.log({"perf/checkpoint_stall_ms": stall * 1e3}, self.step)
                mode = "async" if t.async_checkpoint and not forced and self.step != t.max_steps else "sync"
                tqdm.write(f"checkpoint step {self.step}: training stalled {stall * 1e3:.1f} ms ({mode})",
                           file=sys.stdout)

        samples_per_step = source.batch_size * t.grad_accum_steps * comm.world_size
        bar = progress_bar(t.max_steps or None, self.step, comm.is_main, source.name)
        result: dict[str, float] = {}
        ended = "max_steps"
        tick, tick_step = time.perf_counter(), self.step
        attempt = rank.current_attempt()
        recovered_at = self.step + 1 if attempt and comm.is_main else -1  # a restart's first step
        current_lr = None
        if hooks.loop_start:
            hooks.loop_start(self)
        pause_gc()
        while not t.max_steps or self.step < t.max_steps:  # max_steps=0: until the stream ends (online)
            if hooks.before_step:
                hooks.before_step(self)
            progress.step(self.step + 1)
            turn = source.next(self.step)
            if turn.save or turn.stop:
                saved(self.checkpoint(force=True), forced=True)
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
            if self.step == recovered_at:
                metrics.log(recovery(self.run_dir, attempt), self.step)
            if hooks.after_step:
                hooks.after_step(self)
            last = self.step == t.max_steps
            bar.update(1)  # redraws at most every mininterval (progress_bar)
            if t.log_lr_every_step and not logging:  # opt-in: a test checks a schedule step by step
                metrics.log({"lr": lr}, self.step)
            if logging:
                assert loss_sum is not None
                # the log step's one all-reduce
                loss_avg, (sums, times) = self.agree(loss_sum, source.log_values(), self.straggler.local(comm))
                now = time.perf_counter()
                rate = (self.step - tick_step) * samples_per_step / max(now - tick, 1e-9)
                window_start, tick, tick_step = tick, now, self.step
                logged = {"train/loss": loss_avg, "lr": lr, "perf/samples_per_s": rate, **source.log(sums),
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
                    logged.update(comm.log_values(self.source.batch_size * t.grad_accum_steps))
                metrics.log(logged, self.step)
                bar.set_postfix(loss=f"{loss_avg:.4f}", lr=f"{lr:.2e}", refresh=False)
            saved(self.checkpoint(last=last))
            if self.step % t.eval_every == 0 or last:
                result = self.evaluate()
                metrics.log(result, self.step)
            if self.step % GC_EVERY == 0:
                gc.collect(1)  # the young generations: what the last steps made (see pause_gc)
        bar.close()
        if hooks.loop_end:
            hooks.loop_end(self)
        resume_gc()
        if ended == STOP_SIGNAL and not source.finish_on_stop:  # saved above; no final evaluation, exit quickly
            if comm.is_main:
                print(f"stopping on request at step {self.step}: checkpoint saved", flush=True)
            metrics.close()
            self.loader.close()
            return result
        saved(self.checkpoint(last=True, force=True), forced=True)  # the end, however it came
        fresh = ended != "max_steps" or not result  # else the last step's evaluation is the result
        if fresh:
            result = self.evaluate()
        result, line = source.summary(ended, result)
        self.finish(result, line)
        if fresh or source.finish_on_stop:
            metrics.log(result, self.step)
        metrics.hparams(flatten(to_dict(cfg)), {"hparam/" + k: v for k, v in result.items()})
        metrics.close()
        self.loader.close()
        return result
