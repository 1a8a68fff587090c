"""The PyTorch eager contender: `torch_nets` trained the way cnnlab trains, in plain PyTorch.

The same data (the arrays cnnlab loaded: uint8 images or float32 series, converted once to NCHW
or NCL tensors), the same batches
in the same order, the same augmentation (random crop after zero padding, random flip) and
normalization, the same loss and the same optimizer: AdamW with decay on weights only and
cnnlab's learning-rate schedule, step for step. Each step also computes the accuracy and gradient
norm that cnnlab's step returns, so both do the same work. No torch.compile: this is eager mode.

Run by `experiments/bench.py`: `python -m experiments.bench_workers.torch_worker SPEC_JSON`.
Glossary: `N` examples, `B` batch, `C` channels, `H, W` spatial, `L` length, `K` classes.
"""

import math

import numpy as np
import torch
import torch.nn.functional as F

from experiments.bench_workers.common import Spec, main
from experiments.bench_workers.torch_nets import NETS


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """cnnlab.train.loop.epoch_order, copied because importing it would load JAX."""
    return np.random.default_rng([seed, epoch]).permutation(n).astype(np.int32)


def learning_rate(opt: dict, step: int, steps_per_epoch: int, epochs: int) -> float:
    """cnnlab.train.optim's schedules (optax's formulas) at `step`, the number of updates so far."""
    peak, total = opt["lr"], steps_per_epoch * epochs
    if opt["schedule"] == "constant":
        return peak
    warmup = (
        round(opt["warmup_epochs"] * steps_per_epoch) if opt["schedule"] == "warmup_cosine" else 0
    )
    if step < warmup:
        return peak * step / warmup  # linear from 0
    decay_steps = max(total, warmup + 1) - warmup if warmup else total
    t = min(step - warmup, decay_steps) / decay_steps
    alpha = opt["end_lr_factor"]
    return peak * ((1 - alpha) * 0.5 * (1 + math.cos(math.pi * t)) + alpha)


def crop_flip(x: torch.Tensor, pad: int, flip: bool, gen: torch.Generator) -> torch.Tensor:
    """Random crop after zero padding by `pad`, and random horizontal flip; uint8 [B, C, H, W]."""
    b, _, h, w = x.shape
    if pad:
        padded = F.pad(x, (pad, pad, pad, pad))  # [B, C, H + 2 pad, W + 2 pad]
        oy, ox = torch.randint(0, 2 * pad + 1, (2, b, 1), generator=gen)  # [B, 1] each
        rows, cols = oy + torch.arange(h), ox + torch.arange(w)  # [B, H], [B, W]
        batch = torch.arange(b)[:, None, None]  # [B, 1, 1]
        x = padded[batch, :, rows[:, :, None], cols[:, None, :]]  # [B, H, W, C]
        x = x.permute(0, 3, 1, 2)  # [B, C, H, W]
    if flip:
        flipped = torch.rand(b, generator=gen) < 0.5  # [B]
        x = torch.where(flipped[:, None, None, None], x.flip(3), x)
    return x.contiguous()


class TorchTrainer:
    contender = "torch"

    def __init__(self, spec: Spec, data: dict[str, np.ndarray]):
        opt = spec.optimizer
        if opt["name"] != "adamw" or opt["grad_clip_norm"] is not None:
            raise ValueError(f"the PyTorch worker implements AdamW without clipping, not {opt}")
        if spec.augment["erase"]:
            raise ValueError("the PyTorch worker implements crop and flip, not random erasing")
        torch.set_num_threads(spec.threads)
        torch.manual_seed(spec.seed)  # initialisation and dropout
        self.gen = torch.Generator().manual_seed(spec.seed)  # augmentation
        self.spec = spec
        # [N, H, W, C] -> [N, C, H, W] images, [N, L, C] -> [N, C, L] series
        channels_first = lambda a: torch.from_numpy(a).movedim(-1, 1).contiguous()
        self.images = channels_first(data["train_images"])  # uint8 images, float32 series
        self.labels = torch.from_numpy(data["train_labels"].astype(np.int64))  # [N]
        self.test_images = channels_first(data["test_images"])
        self.test_labels = torch.from_numpy(data["test_labels"].astype(np.int64))
        per_channel = (1, -1) + (1,) * (self.images.ndim - 2)  # [1, C, 1, 1] or [1, C, 1]
        self.mean = torch.from_numpy(data["mean"].astype(np.float32)).view(per_channel)
        self.std = torch.from_numpy(data["std"].astype(np.float32)).view(per_channel)
        num_classes = int(max(self.labels.max(), self.test_labels.max())) + 1
        self.net = NETS[spec.model["name"]](data["train_images"].shape[1:], num_classes)
        self.params = list(self.net.parameters())
        self.num_params = sum(p.numel() for p in self.params)
        weights = [p for p in self.params if p.ndim > 1]  # cnnlab decays kernels, not biases
        biases = [p for p in self.params if p.ndim <= 1]
        self.opt = torch.optim.AdamW(
            [{"params": weights, "weight_decay": opt["weight_decay"]},
             {"params": biases, "weight_decay": 0.0}],
            lr=opt["lr"], betas=(opt["b1"], opt["b2"]), eps=opt["eps"],
        )  # fmt: skip
        steps_per_epoch = len(self.labels) // spec.batch_size
        factor = lambda s: learning_rate(opt, s, steps_per_epoch, spec.epochs) / opt["lr"]
        self.schedule = torch.optim.lr_scheduler.LambdaLR(self.opt, factor)
        self.metrics: dict[str, torch.Tensor] = {}

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:  # -> float32 [B, C, H, W] or [B, C, L]
        return (x.float() - self.mean) / self.std

    def step(self, idx: np.ndarray) -> None:
        index = torch.from_numpy(idx.astype(np.int64))  # [B]
        x, y = self.images[index], self.labels[index]  # [B, C, H, W] or [B, C, L], [B]
        aug = self.spec.augment
        if aug["crop_padding"] or aug["flip"]:
            x = crop_flip(x, aug["crop_padding"], aug["flip"], self.gen)
        logits = self.net(self._normalize(x))  # [B, K]
        loss = F.cross_entropy(logits, y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():
            self.metrics = {
                "loss": loss.detach(),
                "accuracy": (logits.argmax(-1) == y).float().mean(),
                "grad_norm": torch.linalg.vector_norm(
                    torch.stack([torch.linalg.vector_norm(p.grad) for p in self.params])
                ),
            }
        self.opt.step()
        self.schedule.step()

    def sync(self) -> float:
        return float(self.metrics["loss"])  # eager: every step has already finished

    @torch.inference_mode()
    def test_accuracy(self) -> float:
        self.net.eval()  # dropout off
        correct, n, size = 0, len(self.test_labels), self.spec.eval_batch_size
        for start in range(0, n, size):
            logits = self.net(self._normalize(self.test_images[start : start + size]))
            correct += int((logits.argmax(-1) == self.test_labels[start : start + size]).sum())
        self.net.train()
        return correct / n

    def info(self) -> dict:
        return {
            "framework": f"torch {torch.__version__}",
            "backend": "cpu",
            "torch_threads": torch.get_num_threads(),
            "torch_interop_threads": torch.get_num_interop_threads(),
        }


if __name__ == "__main__":
    main(TorchTrainer, epoch_order)
