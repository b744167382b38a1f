"""What visionft costs over a hand-written loop (``python tools/bench.py --case overhead [--device cuda]``).

For every backbone x strategy cell, the same model trains on the same data two ways:

- **visionft**: the real path, ``train(cfg)`` (Trainer, its callbacks and loggers, the gates, the datamodule's
  loader and augmentation, the LR schedule), on the synthetic in-memory dataset (uint8 images; the data path every
  in-memory dataset takes) or, with ``photos``, an ImageFolder of JPEGs;
- **raw**: the loop a user writes by hand: the model visionft built (same weights, same parameters frozen, same
  BatchNorm modes: the strategy's state at epoch 0, read off ``module.gates``), one batch of the same training
  images fixed on the device (with ``photos``: the files decoded once into a tensor, random batches, shifts and flips), normalize,
  forward, cross-entropy, backward, AdamW step (fused on CUDA), no logging.

Same precision (bf16 autocast on CUDA, fp32 on CPU), batch size, optimizer, image size and memory format. Each side
times windows of ``STEPS`` optimizer steps after ``WARMUP`` steps, the device synchronized at window boundaries
only. Speed: ``ROUNDS`` child processes, each running raw, visionft, raw (a shared machine's process-to-process
swings of ±20% then move both sides alike); the median over all windows. Peak memory: one child per side (CUDA:
``max_memory_allocated`` after warm-up; CPU: the child's peak resident set). ``linear_probe`` here is its gradient
head (``strategy.solver=adamw``, the only one with training steps); the default closed-form probe's cost is
``--case probe``'s.
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

import torch
import lightning as L

WARMUP, STEPS, WINDOWS = 3, 5, 5  # steps excluded, steps per timed window, windows (median reported)
ROUNDS = 2  # speed processes per cell (each: raw, visionft, raw); the median over all their windows counts
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
    steps = WARMUP + STEPS * WINDOWS
    data = ["data=imagefolder", f"data.root={photos}", "data.resident=true", "data.augment.name=crop_flip"] if photos \
        else ["data=synthetic", f"data.train_size={int(bs * (steps + 1) / 0.9) + 1}", "data.test_size=16",
              f"+data.native_size={size}"]  # generated at the training size, as the raw loop's batch is
    return [*over, *STRATEGIES[strategy], *data, f"data.image_size={size}", f"data.batch_size={bs}",
            "data.num_workers=0",
            f"channels_last={device == 'cuda' and backbone in CONVNETS}",
            f"trainer.accelerator={'gpu' if device == 'cuda' else 'cpu'}", "trainer.devices=1",
            "trainer.max_epochs=1", f"trainer.limit_train_batches={steps}", "trainer.limit_val_batches=1",
            "trainer.limit_test_batches=1", "trainer.enable_progress_bar=false"]


class Windows:
    """Times windows of ``STEPS`` steps after ``WARMUP``; call ``tick()`` at the start of every step and once after
    the last. The device is synchronized only at window boundaries."""

    def __init__(self, device: str) -> None:
        self.device, self.step, self.marks = device, 0, []

    def tick(self) -> None:
        if self.step >= WARMUP and (self.step - WARMUP) % STEPS == 0 and len(self.marks) <= WINDOWS:
            if self.device == "cuda":
                torch.cuda.synchronize()
                if not self.marks:
                    torch.cuda.reset_peak_memory_stats()
            self.marks.append(time.perf_counter())
        self.step += 1

    def result(self, batch: int) -> dict:
        spans = [b - a for a, b in zip(self.marks, self.marks[1:])]
        if len(spans) < WINDOWS:
            raise RuntimeError(f"only {len(spans)} of {WINDOWS} windows were timed ({self.step} steps)")
        peak = (torch.cuda.max_memory_allocated() if self.device == "cuda"
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        return {"images_per_s": round(STEPS * batch / statistics.median(spans), 1),
                "window_images_per_s": [round(STEPS * batch / s, 1) for s in spans],
                "peak_mem_mib": round(peak / 2 ** 20, 1)}


class StepTimer(L.Callback):
    """visionft's side: ``Windows`` ticked at every training batch start and after the last batch (before the
    epoch's validation and checkpoints, which are not train steps)."""

    def __init__(self, out: str, device: str, batch: int) -> None:
        self.out, self.windows, self.batch = out, Windows(device), batch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.windows.tick()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx == trainer.num_training_batches - 1:
            self.windows.tick()
            Path(self.out).write_text(json.dumps(self.windows.result(self.batch)))


def _compose(overrides: list[str]):
    from hydra import compose, initialize_config_module

    with initialize_config_module("visionft.conf", version_base="1.3"):
        return compose("config", overrides=overrides)


def run_visionft(overrides: list[str], out: Path, device: str, batch: int) -> None:
    from omegaconf import open_dict

    from visionft.train import train

    out.mkdir(parents=True, exist_ok=True)
    cfg = _compose([*overrides, f"paths.output_dir={out / 'run'}", f"paths.cache_dir={out / 'cache'}"])
    with open_dict(cfg):
        cfg.callbacks.step_timer = {"_target_": "bench_overhead.StepTimer", "out": str(out / "result.json"),
                                    "device": device, "batch": batch}
    train(cfg)


def run_raw(overrides: list[str], out: Path, device: str, batch: int, name: str = "result.json") -> None:
    """The hand-written loop on the model visionft builds for this cell (its epoch-0 trainable set and BN modes)."""
    import torch.nn.functional as F

    from visionft.train import build

    cfg = _compose([*overrides, f"paths.output_dir={out / 'run'}"])
    L.seed_everything(cfg.seed, verbose=False)
    dm, _, module = build(cfg)
    model = module.model.to(device).train()
    module.gates.apply(model, 0, toggle_requires_grad=True)  # requires_grad and BatchNorm modes at epoch 0
    channels_last = bool(cfg.channels_last)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.05, fused=device == "cuda")
    mean, std = module.mean.to(device), module.std.to(device)
    g = torch.Generator().manual_seed(0)
    size = int(cfg.data.image_size)
    # the same data: a batch of the cell's own training images (random bytes run at another speed on CPU: a
    # random-init network's activations on smooth images go denormal, 10-20% slower)
    x, y = (t.to(device) for t in next(iter(dm.train_dataloader())))
    decoded = _decode_once(dm, size, device) if cfg.data.get("root") else None
    windows = Windows(device)
    for _ in range(WARMUP + STEPS * WINDOWS):
        windows.tick()
        if decoded is not None:  # a decode-once tensor loop: random batch, random shift, flips
            x, y = _tensor_batch(*decoded, batch, g)
        xf = (x.float() - mean) / std
        if channels_last:
            xf = xf.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            loss = F.cross_entropy(model(xf), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    windows.tick()
    (out / name).write_text(json.dumps(windows.result(batch)))


def run_both(overrides: list[str], out: Path, device: str, batch: int) -> None:
    """Speed, in one process: raw, visionft, raw again (ABA), so a process that happens to run slower or faster on a
    shared machine moves both sides alike; the raw side counts both its passes."""
    run_raw(overrides, out, device, batch, "raw1.json")
    run_visionft(overrides, out / "vf", device, batch)
    run_raw(overrides, out, device, batch, "raw2.json")
    raw = [json.loads((out / f).read_text())["window_images_per_s"] for f in ("raw1.json", "raw2.json")]
    vf = json.loads((out / "vf" / "result.json").read_text())["window_images_per_s"]
    (out / "result.json").write_text(json.dumps({"raw": raw[0] + raw[1], "visionft": vf}))


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
    Speed: ``ROUNDS`` processes each timing raw, visionft, raw (``run_both``); peak memory: one process per side."""
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
            raw = [w for r in speed for w in r["raw"]]
            vf = [w for r in speed for w in r["visionft"]]
            row.update(raw_images_per_s=round(statistics.median(raw), 1),
                       visionft_images_per_s=round(statistics.median(vf), 1),
                       ratio=round(statistics.median(vf) / statistics.median(raw), 3),
                       raw_peak_mib=memory["raw"]["peak_mem_mib"], visionft_peak_mib=memory["visionft"]["peak_mem_mib"],
                       mem_ratio=round(memory["visionft"]["peak_mem_mib"] / memory["raw"]["peak_mem_mib"], 3),
                       raw_windows=raw, visionft_windows=vf)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


COLUMNS = ["backbone", "strategy", "data", "image_size", "batch", "raw_images_per_s", "visionft_images_per_s", "ratio",
           "raw_peak_mib", "visionft_peak_mib", "mem_ratio"]


if __name__ == "__main__":  # a child: python bench_overhead.py SIDE BACKBONE STRATEGY DEVICE OUT [overrides]
    side, backbone, strategy, device, photos, out, *extra = sys.argv[1:]
    over = [*cell_overrides(backbone, strategy, device, None if photos == "-" else photos), *extra]
    run = {"raw": run_raw, "visionft": run_visionft, "both": run_both}[side]
    run(over, Path(out), device, batch_size(backbone, device))
