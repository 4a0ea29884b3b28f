"""Building the user's parts (workers/task.py) and the input pipeline (workers/data/loader.py), in-process."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from launcher.config.compose import compose_config
from workers import task
from workers.data.loader import TrainLoader, loader_kwargs
from workers.metrics import accuracy, cross_entropy


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.linear = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)


def test_weight_decay_applies_to_weight_matrices_only() -> None:
    cfg = compose_config(["optimizer=adamw"])  # weight_decay 0.01
    net = _Net()
    opt = task.build_optimizer(cfg, net, world_size=1, device_type="cpu")
    decayed, plain = opt.param_groups
    assert decayed["weight_decay"] == 0.01 and plain["weight_decay"] == 0.0
    assert [p for p in decayed["params"]] == [net.linear.weight]
    assert {id(p) for p in plain["params"]} == {id(net.embed.weight), id(net.linear.bias), id(net.norm.weight),
                                                id(net.norm.bias)}
    assert "fused" not in opt.defaults or not opt.defaults["fused"]  # fused kernels are for CUDA only
    everything = task.build_optimizer(compose_config(["optimizer=adamw", "optimizer.decay_norms_and_biases=true"]),
                                      net, world_size=1, device_type="cpu")
    assert len(everything.param_groups) == 1 and everything.param_groups[0]["weight_decay"] == 0.01


def test_fused_adamw_on_cuda_and_lr_scaling_opt_in() -> None:
    cfg = compose_config(["optimizer=adamw", "optimizer.scale_lr_with_world_size=true"])
    assert task.peak_lr(cfg, 4) == 4 * 0.001
    net = nn.Linear(2, 2)
    opt = task.build_optimizer(compose_config(["optimizer=adamw"]), net, world_size=4, device_type="cpu")
    assert opt.param_groups[0]["lr"] == 0.001
    if torch.cuda.is_available():
        cuda = task.build_optimizer(compose_config(["optimizer=adamw"]), net.cuda(), 1, "cuda")
        assert cuda.defaults["fused"] is True


def test_any_torch_optimizer_and_loss_by_target() -> None:
    cfg = compose_config(["optimizer._target_=torch.optim.RMSprop", "optimizer.alpha=0.9",
                          "loss._target_=torch.nn.SmoothL1Loss", "loss.beta=0.5", "metrics={}"])
    opt = task.build_optimizer(cfg, nn.Linear(2, 1), 1, "cpu")
    assert isinstance(opt, torch.optim.RMSprop) and opt.defaults["alpha"] == 0.9
    loss = task.build_loss(cfg)
    assert isinstance(loss, nn.SmoothL1Loss) and loss.beta == 0.5
    assert task.build_metrics(cfg) == {}


def test_default_loss_and_accuracy_handle_classes_and_sequences() -> None:
    logits = torch.tensor([[2.0, 0.0], [0.0, 3.0]])
    assert accuracy(logits, torch.tensor([0, 0])).item() == 0.5
    seq = torch.randn(2, 5, 7)  # (B, T, vocab) with (B, T) targets: flattened
    targets = torch.randint(0, 7, (2, 5))
    assert torch.allclose(cross_entropy(seq, targets), nn.functional.cross_entropy(seq.reshape(10, 7),
                                                                                    targets.reshape(10)))
    assert accuracy(torch.randn(4, 1), torch.randn(4, 1)) is None  # regression: no accuracy


class _Plain(Dataset):
    def __init__(self, n: int) -> None:
        self.x = torch.arange(n, dtype=torch.float32)[:, None]

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], self.x[i, 0].long()


def _take(loader: TrainLoader, n: int) -> list[list[int]]:
    it = iter(loader)
    return [next(it)[1].tolist() for _ in range(n)]


def test_loader_fast_path_and_plain_dataset_give_the_same_batches() -> None:
    n, cpu = 50, torch.device("cpu")
    fast = TrainLoader(TensorDataset(torch.arange(n, dtype=torch.float32)[:, None], torch.arange(n)), 4, 2, 1, 0,
                       cpu, loader_kwargs({"num_workers": 0}, cpu))
    plain = TrainLoader(_Plain(n), 4, 2, 1, 0, cpu, loader_kwargs({"num_workers": 0}, cpu))
    assert _take(fast, 14) == _take(plain, 14)  # 25 samples per rank: 6 batches an epoch, across epochs


def test_loader_position_counts_taken_batches_and_resumes_there() -> None:
    """The position counts what the loop took (not what was loaded ahead); a loader restored from it continues
    with the next batch, also with worker processes."""
    n, cpu = 64, torch.device("cpu")
    kw = loader_kwargs({"num_workers": 2, "persistent_workers": True, "prefetch_factor": 2}, cpu)
    first = TrainLoader(_Plain(n), 4, 2, 0, 0, cpu, kw)
    whole = _take(first, 12)  # 8 batches an epoch per rank
    cut = TrainLoader(_Plain(n), 4, 2, 0, 0, cpu, kw)
    it = iter(cut)
    head = [next(it)[1].tolist() for _ in range(5)]
    assert cut.state_dict() == {"epoch": 0, "epoch_pos": 5 * 4 * 2}
    resumed = TrainLoader(_Plain(n), 4, 2, 0, 0, cpu, kw)
    resumed.load_state_dict(cut.state_dict())
    assert head + _take(resumed, 7) == whole
    assert loader_kwargs({"num_workers": 0, "pin_memory": True}, cpu) == {"num_workers": 0, "pin_memory": False}


def test_resume_check_tells_structural_from_harmless_changes() -> None:
    from launcher.config.resume import changed_keys

    base = compose_config([])
    structural, harmless = changed_keys(base, compose_config(["model.hidden=64", "trainer.max_steps=9",
                                                              "optimizer.lr=0.01", "data.num_workers=2"]))
    assert structural == ["model.hidden"]
    assert harmless == ["data.num_workers", "optimizer.lr", "trainer.max_steps"]
    assert changed_keys(base, compose_config(["optimizer=sgd"]))[0] == ["optimizer._target_"]
    assert changed_keys(base, compose_config(["mode=online", "trainer.max_steps=0"]))[0] == ["mode"]
