"""What visionft costs over a hand-written loop (``python tools/bench.py --case overhead [--device cuda]``).

For every backbone x strategy cell, the same model trains on the same data two ways:

- **visionft**: the real path, ``train(cfg)`` (Trainer, its callbacks and loggers, the gates, the datamodule's
  loader and augmentation, the LR schedule), on the synthetic in-memory dataset (uint8 images; the data path every
  in-memory dataset takes) or, with ``photos``, an ImageFolder of JPEGs;
- **raw**: the loop a user writes by hand: a copy of the model visionft built (same weights, same parameters frozen,
  same BatchNorm modes: the strategy's state at epoch 0, read off ``module.gates``), replaying the batches visionft
  just trained on (with ``photos``: the files decoded once into a tensor, random batches, shifts and flips); zero
  the gradients, normalize, forward, cross-entropy, backward, AdamW step (fused on CUDA), no logging.

Same precision (bf16 autocast on CUDA, fp32 on CPU), batch size, optimizer, image size and memory format. Speed is
paired: inside visionft's run, windows of its optimizer steps alternate with as many raw steps on a copy of the
model (``Interleaved``; ``WINDOWING``: one step a window on CPU, five on CUDA), after ``WARMUP`` steps of each, the
device synchronized at window boundaries only; each visionft window is compared with the raw loop's speed over the
two raw windows around it (this shared machine's speed drifts 10-20% within seconds and ±20% between processes:
measured side by side in separate processes or even one after the other in one process, ratios read ±0.1; windows
of five steps still read ±0.05). ``ROUNDS`` such processes per cell; the ratio is the throughput over the paired
windows (summed times), with a 95% bootstrap interval, and the median pair ratio (a typical step) beside it. Peak
memory: one child per side (CUDA: ``max_memory_allocated`` after warm-up; CPU: the child's peak resident set).
``linear_probe`` here is its gradient head (``strategy.solver=adamw``, the only one with training steps); the default
closed-form probe's cost is ``--case probe``'s.
"""
from __future__ import annotations

import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch

WARMUP = 3  # steps of each side excluded
# (steps per timed window, timed visionft windows per process): on CPU windows of one step, so that a pair's two sides
# run within a step of each other (this machine's speed drifts within seconds), many of them; on CUDA, 5 steps, the
# device synchronized only at window boundaries (a sync per step would idle the GPU on both sides)
WINDOWING = {"cpu": (1, 25), "cuda": (5, 5)}
ROUNDS = 2  # speed processes per cell, each with `windows` visionft windows between `windows` + 1 raw ones
BACKBONES = {  # name: (overrides, image size on CPU, on CUDA); offline, weights other than the default are random
    "efficientnet_lite0": (["backbone=efficientnet_lite0"], 64, 224),
    "resnet50": (["backbone=resnet50", "backbone.pretrained=false"], 64, 224),
    "vit_base_patch16_224": (["backbone=vit_base", "backbone.pretrained=false"], 64, 224),
    "vit_small_patch14_dinov2": (["backbone=dinov2_small", "backbone.pretrained=false"], 56, 224),
    "resnet18@32": (["backbone=resnet18", "backbone.pretrained=false"], 32, 32),
}
STRATEGIES = {"full": ["strategy=full"], "linear_probe": ["strategy=linear_probe", "strategy.solver=adamw"],
              "partial": ["strategy=partial"], "lora": ["strategy=lora"]}
CONVNETS = {"efficientnet_lite0", "resnet50", "resnet18@32"}


def batch_size(backbone: str, device: str) -> int:
    if device == "cuda":
        return 512 if backbone == "resnet18@32" else 256
    return 128 if backbone == "resnet18@32" else 16


def cell_overrides(backbone: str, strategy: str, device: str, photos: str | None = None) -> list[str]:
    """The cell's run: synthetic in-memory images, or (``photos``) an ImageFolder of JPEGs on the resident path."""
    over, cpu_size, cuda_size = BACKBONES[backbone]
    size, bs = cuda_size if device == "cuda" else cpu_size, batch_size(backbone, device)
    steps = WARMUP + _total(device)
    data = ["data=imagefolder", f"data.root={photos}", "data.resident=true", "data.augment.name=crop_flip"] if photos \
        else ["data=synthetic", f"data.train_size={int(bs * (steps + 1) / 0.9) + 1}", "data.test_size=16",
              f"+data.native_size={size}"]  # generated at the training size, as the raw loop's batch is
    return [*over, *STRATEGIES[strategy], *data, f"data.image_size={size}", f"data.batch_size={bs}",
            "data.num_workers=0",
            f"channels_last={device == 'cuda' and backbone in CONVNETS}",
            f"trainer.accelerator={'gpu' if device == 'cuda' else 'cpu'}", "trainer.devices=1",
            "trainer.max_epochs=1", f"trainer.limit_train_batches={steps}", "trainer.limit_val_batches=1",
            "trainer.limit_test_batches=1", "trainer.enable_progress_bar=false"]


def _total(device: str) -> int:
    steps, windows = WINDOWING[device]
    return steps * windows


def _sync(device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def _peak_mib(device: str) -> float:
    peak = (torch.cuda.max_memory_allocated() if device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return round(peak / 2 ** 20, 1)


class RawLoop:
    """The loop a user writes by hand, on a model visionft built (its epoch-0 trainable set and BatchNorm modes): the
    batches it is given (``Interleaved`` replays visionft's), else a fixed batch of the cell's own training images, or
    with ``decoded`` random batches of the files decoded once, shifted and flipped; zero the gradients, normalize,
    forward, cross-entropy, backward, AdamW (fused on CUDA)."""

    def __init__(self, model, mean, std, device: str, channels_last: bool, batch=None, decoded=None,
                 batch_size: int = 0) -> None:
        self.model, self.mean, self.std, self.device, self.channels_last = model, mean, std, device, channels_last
        if channels_last:
            model.to(memory_format=torch.channels_last)
        params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.05, fused=device == "cuda")
        self.batch, self.decoded, self.batch_size = batch, decoded, batch_size
        self.g = torch.Generator().manual_seed(0)

    def step(self, batch=None) -> None:
        import torch.nn.functional as F

        if batch is None:
            batch = self.batch if self.decoded is None else _tensor_batch(*self.decoded, self.batch_size, self.g)
        x, y = batch
        xf = (x.float() - self.mean) / self.std
        if self.channels_last:
            xf = xf.contiguous(memory_format=torch.channels_last)
        self.opt.zero_grad(set_to_none=True)  # first, as in PyTorch's own examples (and as Lightning does)
        with torch.autocast(self.device, dtype=torch.bfloat16, enabled=self.device == "cuda"):
            loss = F.cross_entropy(self.model(xf), y)
        loss.backward()
        self.opt.step()

    def window(self, steps: int, batches: list | None = None) -> float:
        """Seconds for ``steps`` steps (on ``batches`` when given), the device synchronized at both ends."""
        t = _sync(self.device)
        for i in range(steps):
            self.step(batches[i % len(batches)] if batches else None)
        return _sync(self.device) - t


def raw_loop_for(module, device: str, batch, photos_dm=None, copy_model: bool = True) -> RawLoop:
    """A RawLoop on ``module.model`` (a copy of it by default) with the strategy's epoch-0 gates (requires_grad,
    BatchNorm modes)."""
    import copy

    model = (copy.deepcopy(module.model) if copy_model else module.model).to(device).train()
    module.gates.apply(model, 0, toggle_requires_grad=True)
    x, y = (t.detach().clone().to(device) for t in batch)
    decoded = _decode_once(photos_dm, x.shape[-1], device) if photos_dm is not None else None
    return RawLoop(model, module.mean.to(device), module.std.to(device), device, bool(module.options.channels_last),
                   (x, y), decoded, x.shape[0])


class Interleaved(L.Callback):
    """Speed, paired: inside visionft's own training run, its windows of steps alternate with the raw
    loop's (raw, visionft, raw, ..., visionft, raw) on a copy of the same model, after ``WARMUP`` steps of each.
    Every visionft window is compared with the raw loop over the two raw windows around it, so a shared machine's speed,
    which drifts by 10-20% over seconds, moves both sides of a pair alike. The device is synchronized only at window
    boundaries; the raw windows run between visionft's steps, outside its timed spans."""

    def __init__(self, out: str, device: str, photos: bool = False) -> None:
        self.out, self.device, self.photos = out, device, photos
        self.steps, self.windows = WINDOWING[device]
        self.raw, self.raw_spans, self.vf_spans, self._open, self.seen = None, [], [], None, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.raw is None:  # before visionft's first step; its warm-up steps then separate this from raw window 0
            self.raw = raw_loop_for(pl_module, self.device, batch, trainer.datamodule if self.photos else None)
            self.raw.window(WARMUP)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # every boundary at a batch end: each visionft window holds whole loop iterations (fetch, hooks, step)
        if not self.photos:  # the raw window replays the batches visionft just trained on (same images, same order)
            self.seen = [*self.seen, batch][-self.steps:]
        self._boundary(batch_idx + 1)
        if batch_idx == trainer.num_training_batches - 1:
            if len(self.vf_spans) < self.windows:
                raise RuntimeError(f"only {len(self.vf_spans)} of {self.windows} windows were timed ({batch_idx + 1} "
                                   f"steps; {WARMUP + _total(self.device)} needed)")
            Path(self.out).write_text(json.dumps({"raw_spans": self.raw_spans, "visionft_spans": self.vf_spans,
                                                  "steps": self.steps}))

    def _boundary(self, step: int) -> None:
        if step < WARMUP or (step - WARMUP) % self.steps or len(self.vf_spans) >= self.windows:
            return
        now = _sync(self.device)
        if self._open is not None:
            self.vf_spans.append(now - self._open)
        self.raw_spans.append(self.raw.window(self.steps, self.seen or None))
        self._open = _sync(self.device) if len(self.vf_spans) < self.windows else None


class PeakMemory(L.Callback):
    """visionft's side of the memory comparison (a process of its own): peak after the timed steps."""

    def __init__(self, out: str, device: str) -> None:
        self.out, self.device = out, device

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == WARMUP and self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx == trainer.num_training_batches - 1:
            Path(self.out).write_text(json.dumps({"peak_mem_mib": _peak_mib(self.device)}))


def _compose(overrides: list[str]):
    from hydra import compose, initialize_config_module

    with initialize_config_module("visionft.conf", version_base="1.3"):
        return compose("config", overrides=overrides)


def run_visionft(overrides: list[str], out: Path, device: str, timer: dict) -> None:
    from omegaconf import open_dict

    from visionft.train import train

    out.mkdir(parents=True, exist_ok=True)
    cfg = _compose([*overrides, f"paths.output_dir={out / 'run'}", f"paths.cache_dir={out / 'cache'}"])
    with open_dict(cfg):
        cfg.callbacks.bench_timer = {"out": str(out / "result.json"), "device": device, **timer}
    train(cfg)


def run_both(overrides: list[str], out: Path, device: str, batch: int, photos: bool) -> None:
    """Speed: visionft's run with the raw loop's windows interleaved (``Interleaved``)."""
    run_visionft(overrides, out, device, {"_target_": "bench_overhead.Interleaved", "photos": photos})


def run_visionft_memory(overrides: list[str], out: Path, device: str, batch: int, photos: bool) -> None:
    run_visionft(overrides, out, device, {"_target_": "bench_overhead.PeakMemory"})


def run_raw(overrides: list[str], out: Path, device: str, batch: int, photos: bool) -> None:
    """Memory: the raw loop alone in its process, on the model visionft builds for this cell."""
    from visionft.train import build

    cfg = _compose([*overrides, f"paths.output_dir={out / 'run'}"])
    L.seed_everything(cfg.seed, verbose=False)
    dm, _, module = build(cfg)
    raw = raw_loop_for(module, device, next(iter(dm.train_dataloader())), dm if photos else None, copy_model=False)
    raw.window(WARMUP)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    raw.window(_total(device))
    (out / "result.json").write_text(json.dumps({"peak_mem_mib": _peak_mib(device)}))


def _decode_once(dm, size: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The training files decoded once with PIL into one uint8 tensor, as a hand-written loop would."""
    import numpy as np
    from PIL import Image

    dm.setup()
    split = dm.splits["train"]
    images = np.stack([np.asarray(Image.open(f).convert("RGB").resize((size, size))) for f in split.images])
    return (torch.from_numpy(images).permute(0, 3, 1, 2).contiguous().to(device),
            torch.as_tensor(split.labels).to(device))


def _tensor_batch(images, labels, batch: int, g: torch.Generator):
    idx = torch.randint(0, len(labels), (batch,), generator=g).to(images.device)
    x = images[idx]
    dx, dy = (int(v) for v in torch.randint(-4, 5, (2,), generator=g))
    x = torch.roll(x, (dy, dx), (2, 3))
    flip = (torch.rand(batch, generator=g) < 0.5).to(images.device)
    return torch.where(flip[:, None, None, None], x.flip(3), x), labels[idx]


def measure(side: str, backbone: str, strategy: str, device: str, work: Path, extra: list[str],
            photos: str | None = None) -> dict:
    """One side of one cell in a child process (a fresh process: its own peak memory, no state carried over)."""
    out = Path(tempfile.mkdtemp(prefix=f"{side}-{backbone}-{strategy}-", dir=work))
    cmd = [sys.executable, __file__, side, backbone, strategy, device, photos or "-", str(out), *extra]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join(
        [str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    try:
        if proc.returncode != 0:
            return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1][:200]}
        return json.loads((out / "result.json").read_text())
    finally:  # each child writes a whole run (checkpoints of a ViT-B are 1 GB): keep only the numbers
        shutil.rmtree(out, ignore_errors=True)


def overhead_rows(work: Path, device: str, extra: list[str], cells: list[str] | None = None,
                  photos: str | None = None) -> list[dict]:
    """Every backbone x strategy cell (or those ``cells`` names: ``BACKBONE`` or ``BACKBONE:STRATEGY``); with
    ``photos`` (an ImageFolder), on those JPEGs through the resident path against a decode-once tensor loop.
    Speed: ``ROUNDS`` processes of interleaved windows (``Interleaved``); peak memory: one process per side."""
    wanted = [(b, s) for b in BACKBONES for s in STRATEGIES
              if cells is None or b in cells or f"{b}:{s}" in cells]
    rows = []
    for backbone, strategy in wanted:
        row = {"backbone": backbone, "strategy": strategy, "data": "photos" if photos else "synthetic",
               "batch": batch_size(backbone, device),
               "image_size": BACKBONES[backbone][2 if device == "cuda" else 1]}
        speed = [measure("both", backbone, strategy, device, work, extra, photos) for _ in range(ROUNDS)]
        memory = {side: measure(side, backbone, strategy, device, work, extra, photos) for side in ("raw", "visionft")}
        bad = [r["error"] for r in [*speed, *memory.values()] if "error" in r]
        if bad:
            row.update(error=bad[0])
        else:
            row.update(paired_speeds(speed, row["batch"]),
                       raw_peak_mib=memory["raw"]["peak_mem_mib"], visionft_peak_mib=memory["visionft"]["peak_mem_mib"],
                       mem_ratio=round(memory["visionft"]["peak_mem_mib"] / memory["raw"]["peak_mem_mib"], 3))
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def paired_speeds(speed: list[dict], batch: int) -> dict:
    """Images/s per side (medians over windows) and their ratio over the paired windows: each visionft window against
    the raw loop over the two raw windows around it. ``ratio``: throughput, the raw loop's summed time over visionft's
    (every step counts, the ones that log too), with a 95% bootstrap interval over the pairs (treating them as
    independent; they come from ``ROUNDS`` processes, so read it as the measurement's precision within this run);
    ``step_ratio``: the median pair ratio (a typical step) and the middle half of the pair ratios."""
    import random

    raw, vf, pairs = [], [], []  # pairs: (raw seconds over the windows around, visionft seconds)
    for r in speed:
        raw += [r["steps"] * batch / s for s in r["raw_spans"]]
        vf += [r["steps"] * batch / s for s in r["visionft_spans"]]
        pairs += [((a + b) / 2, v) for a, b, v in zip(r["raw_spans"], r["raw_spans"][1:], r["visionft_spans"])]
    ratios = [a / v for a, v in pairs]
    q1, _, q3 = statistics.quantiles(ratios, n=4)
    rng = random.Random(0)

    def throughput(sample):
        return sum(a for a, _ in sample) / sum(v for _, v in sample)

    boot = sorted(throughput(rng.choices(pairs, k=len(pairs))) for _ in range(2000))
    return {"raw_images_per_s": round(statistics.median(raw), 1),
            "visionft_images_per_s": round(statistics.median(vf), 1),
            "ratio": round(throughput(pairs), 3), "ratio_ci95": f"{boot[50]:.3f}-{boot[1949]:.3f}",
            "step_ratio": round(statistics.median(ratios), 3), "step_ratio_iqr": f"{q1:.3f}-{q3:.3f}",
            "pairs": len(pairs), "raw_windows": [round(w, 1) for w in raw],
            "visionft_windows": [round(w, 1) for w in vf]}


COLUMNS = ["backbone", "strategy", "data", "image_size", "batch", "raw_images_per_s", "visionft_images_per_s", "ratio",
           "ratio_ci95", "step_ratio", "raw_peak_mib", "visionft_peak_mib", "mem_ratio"]


if __name__ == "__main__":  # a child: python bench_overhead.py SIDE BACKBONE STRATEGY DEVICE OUT [overrides]
    side, backbone, strategy, device, photos, out, *extra = sys.argv[1:]
    # value-dependent speed off: on CPU, denormal floats (a random-init network on smooth synthetic images makes
    # them, more or fewer with each batch and weight state) run 10-30% slower; flushed to zero on both sides
    torch.set_flush_denormal(device == "cpu")
    over = [*cell_overrides(backbone, strategy, device, None if photos == "-" else photos), *extra]
    run = {"raw": run_raw, "visionft": run_visionft_memory, "both": run_both}[side]
    run(over, Path(out), device, batch_size(backbone, device), photos != "-")
