import json
import math

import pytest
import torch

from visionft.train import train


def test_train_in_process_writes_metrics_and_config(tiny_cfg, tmp_path):
    cfg = tiny_cfg("trainer.max_epochs=2", output_dir=tmp_path / "run")
    metrics = train(cfg)
    out = tmp_path / "run"
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["test"] == metrics["test"]
    assert {"test/acc", "test/f1_macro", "test/top5", "test/loss"} <= set(saved["test"])
    assert {"val/acc", "val/f1_macro", "val/top5"} <= set(saved["val"])
    assert saved["trainable_params"] == saved["total_params"] > 0
    assert saved["train_images_per_s"] > 0 and saved["wall_time_s"] > 0 and saved["epochs"] == 2
    assert (out / "config.yaml").is_file()
    assert (out / "checkpoints" / "best.ckpt").is_file() and (out / "checkpoints" / "last.ckpt").is_file()
    assert saved["best_checkpoint"].endswith("best.ckpt")
    assert (out / "csv" / "metrics.csv").is_file()
    assert any((out / "tb").iterdir())


def test_two_classes_have_no_top5(tiny_cfg, tmp_path):
    metrics = train(tiny_cfg("data.num_classes=2", output_dir=tmp_path / "two"))
    assert "test/top5" not in metrics["test"] and 0.0 <= metrics["test"]["test/acc"] <= 1.0


def test_resume_from_checkpoint_continues_with_plain_hparams(tiny_cfg, tmp_path):
    out = tmp_path / "resume"
    train(tiny_cfg("trainer.max_epochs=1", output_dir=out))
    last = out / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, map_location="cpu", weights_only=True)  # Lightning 2.6 resumes weights-only
    assert ckpt["epoch"] == 0 and isinstance(ckpt["hyper_parameters"], dict)
    first_step = ckpt["global_step"]
    metrics = train(tiny_cfg("trainer.max_epochs=3", "resume=true", output_dir=out))
    assert metrics["epochs"] == 3
    after = torch.load(last, map_location="cpu", weights_only=True)
    assert after["global_step"] == 3 * first_step  # continued, not restarted
    sched = after["lr_schedulers"][0]
    assert sched["last_epoch"] == 3 * first_step


def test_resume_without_checkpoint_is_a_clear_error(tiny_cfg, tmp_path):
    with pytest.raises(FileNotFoundError, match="ckpt_path"):
        train(tiny_cfg("resume=true", output_dir=tmp_path / "none"))


def test_training_options_run(tiny_cfg, tmp_path):
    """Label smoothing, mixup/cutmix, balanced class weights, EMA, clipping, accumulation and early stopping."""
    metrics = train(tiny_cfg(
        "trainer.max_epochs=2", "loss.mixup=0.2", "loss.cutmix=1.0", "loss.label_smoothing=0.1",
        "loss.class_weights=balanced", "callbacks=[default,ema,early_stopping]", "callbacks.ema.decay=0.9",
        "trainer.gradient_clip_val=1.0",
        "trainer.accumulate_grad_batches=2", "callbacks.early_stopping.patience=1", "deterministic=true",
        output_dir=tmp_path / "opts"))
    assert metrics["epochs"] >= 1 and "test/acc" in metrics["test"]


def test_nan_loss_is_a_clear_error(tiny_cfg, tmp_path):
    from visionft.callbacks import NonFiniteLoss

    with pytest.raises(NonFiniteLoss, match="strategy.lr"):
        train(tiny_cfg("strategy.lr=1e30", "strategy.bn=train", output_dir=tmp_path / "nan"))


def test_compile_failure_falls_back_to_eager(tiny_cfg, monkeypatch):
    """A compiler that breaks in backward (as inductor did on ResNet-18 + channels_last) leaves the run eager."""
    from visionft.compile import maybe_compile
    from visionft.train import build

    class BrokenBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            raise RuntimeError("inductor stride assert")

    def fake_compile(model, **kwargs):
        return lambda x: BrokenBackward.apply(model(x))

    dm, _, module = build(tiny_cfg())
    eager = module.model
    before = {k: v.clone() for k, v in eager.state_dict().items()}
    monkeypatch.setattr(torch, "compile", fake_compile)
    assert maybe_compile(module, dm) is False
    assert module.model is eager and module.__dict__["_compiled"] is None
    assert all(torch.equal(before[k], v) for k, v in eager.state_dict().items())  # the trial step left no trace
    assert all(p.grad is None for p in eager.parameters())
    monkeypatch.setattr(torch, "compile", lambda model, **kw: model.forward)  # a compiler that works is kept
    assert maybe_compile(module, dm) is True
    assert module.__dict__["_compiled"] is not None and module.model is eager


def test_resume_appends_to_the_csv_history(tiny_cfg, tmp_path):
    import csv

    out = tmp_path / "hist"
    train(tiny_cfg("trainer.max_epochs=1", output_dir=out))
    train(tiny_cfg("trainer.max_epochs=3", "resume=true", output_dir=out))
    rows = list(csv.DictReader(open(out / "csv" / "metrics.csv")))
    epochs = sorted({int(r["epoch"]) for r in rows if r.get("train/loss")})
    assert epochs == [0, 1, 2]  # epoch 0 came from the first run


def test_epoch_train_loss_is_the_batch_weighted_mean_of_the_steps(tiny_cfg, tmp_path):
    """The epoch's logged train/loss (accumulated on the device, logged once at the epoch's end) against each step's
    own loss, recorded by a callback."""
    import lightning as L

    from visionft.train import build, build_trainer

    class Steps(L.Callback):
        def __init__(self):
            self.loss, self.n = [], []

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            self.n.append(len(batch[1]))
            self.loss.append(float(outputs["loss"]))

    cfg = tiny_cfg("trainer.max_epochs=1", "data.batch_size=40", output_dir=tmp_path / "run")
    dm, _, module = build(cfg)
    trainer, _, _ = build_trainer(cfg, tmp_path / "run")
    steps = Steps()
    trainer.callbacks.append(steps)
    trainer.fit(module, datamodule=dm)
    assert len(steps.n) == 3
    weighted = sum(loss * n for loss, n in zip(steps.loss, steps.n)) / sum(steps.n)
    assert float(trainer.callback_metrics["train/loss"]) == pytest.approx(weighted, rel=1e-5)
    assert 0.0 <= float(trainer.callback_metrics["train/acc"]) <= 1.0


def test_cli_run_output_is_single_quiet_and_in_output_dir(tmp_path):
    """One `python -m visionft` run: every log line once, no third-party noise, the param-group table once per
    change, and `paths.output_dir=X` holds Hydra's .hydra/ and log too (no outputs/<date>/ in the working dir)."""
    import os
    import subprocess
    import sys

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "visionft", "data=synthetic", "data.train_size=64", "data.test_size=16",
           "backbone.name=test_resnet", "backbone.pretrained=false", "strategy=gradual_unfreeze",
           "trainer.max_epochs=2", "trainer.enable_progress_bar=false", "trainer.accelerator=cpu",
           f"paths.output_dir={out}"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    text = r.stdout + r.stderr
    lines = [line.split(" - ", 1)[-1] for line in text.splitlines() if "`Trainer.fit` stopped" in line]
    assert len(lines) == 1, text[-3000:]
    for noise in ("Tip:", "litlogger", "LeafSpec", "log_every_n_steps", "| Name", "Total estimated model params"):
        assert noise not in text, noise
    assert text.count("param groups at epoch 0") == 1 and text.count("param groups at epoch 1") == 1
    assert "base_lr" in text and "lr_now" in text
    assert (out / ".hydra" / "config.yaml").is_file() and (out / "metrics.json").is_file()
    assert not (tmp_path / "outputs").exists()


def test_every_param_group_lr_reaches_the_loggers(tiny_cfg, tmp_path):
    """LearningRateMonitor (callbacks group): one LR column per optimizer param group, named by the group."""
    import csv

    out = tmp_path / "lrs"
    train(tiny_cfg("strategy=full", output_dir=out))
    header = next(csv.reader(open(out / "csv" / "metrics.csv")))
    lr_cols = {c for c in header if c.startswith("lr-")}
    assert {f"lr-AdamW/{g}" for g in ("stem", "stem/no_decay", "head", "head/no_decay")} <= lr_cols
    assert len(lr_cols) == 12  # test_resnet: 6 depth groups x (decay, no decay), each with its own LR


def test_logger_none_and_a_missing_extra(tiny_cfg, tmp_path, monkeypatch):
    out = tmp_path / "nolog"
    metrics = train(tiny_cfg("logger=none", output_dir=out))
    assert "test/acc" in metrics["test"] and not (out / "csv").exists() and not (out / "tb").exists()
    import lightning.pytorch.loggers.mlflow as lightning_mlflow

    monkeypatch.setattr(lightning_mlflow, "_MLFLOW_AVAILABLE", False)  # as on an install without the extra
    with pytest.raises(ValueError, match=r'logger=mlflow needs its library: pip install "visionft\[mlflow\]"'):
        train(tiny_cfg("logger=[csv,mlflow]", output_dir=tmp_path / "ml"))


def test_mlflow_and_wandb_loggers_record_the_run(tiny_cfg, tmp_path):
    """The optional loggers for real: MLflow's local sqlite store holds every param group's LR and the validation
    accuracy; W&B writes an offline run."""
    pytest.importorskip("mlflow")
    pytest.importorskip("wandb")
    from mlflow.tracking import MlflowClient

    out = tmp_path / "ml"
    train(tiny_cfg("logger=[mlflow,wandb]", "trainer.max_epochs=2", output_dir=out))
    client = MlflowClient(tracking_uri=f"sqlite:///{out}/mlflow.db")
    run = client.search_runs([client.get_experiment_by_name("visionft").experiment_id])[0]
    assert {"val/acc", "lr-AdamW/head", "lr-AdamW/stem/no_decay"} <= set(run.data.metrics)
    assert len(client.get_metric_history(run.info.run_id, "val/acc")) == 3  # 2 epochs + the final model
    assert run.info.artifact_uri.startswith(str(out))
    assert list((out / "wandb").glob("offline-run-*"))


@pytest.mark.parametrize("optimizer,cls", [("sgd", "SGD"), ("lion", "Lion"), ("adamw", "AdamW")])
def test_optimizer_group_builds_the_optimizer_with_per_group_decay(tiny_cfg, optimizer, cls):
    from visionft.train import build, build_trainer

    cfg = tiny_cfg(f"optimizer={optimizer}", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1")
    dm, _, module = build(cfg)
    trainer, _, _ = build_trainer(cfg, __import__("pathlib").Path(cfg.paths.output_dir))
    trainer.fit(module, datamodule=dm)
    opt = trainer.optimizers[0]
    assert type(opt).__name__ == cls
    decays = {g["name"]: g["weight_decay"] for g in opt.param_groups}
    assert decays["head"] == cfg.optimizer.weight_decay and decays["head/no_decay"] == 0.0


def test_step_scheduler_decays_at_its_milestones(tiny_cfg):
    from visionft.schedules import Step

    shape = Step(milestones=[0.5, 0.75], gamma=0.1)
    assert [shape(t, 8, 2) for t in (0, 3, 4, 5, 6, 7)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])


def test_a_failure_after_fit_keeps_metrics_json(tiny_cfg, tmp_path, monkeypatch):
    import visionft.train as t

    def broken(*a, **k):
        raise RuntimeError("evaluation crashed")

    monkeypatch.setattr(t, "evaluate", broken)
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="evaluation crashed"):
        train(tiny_cfg(output_dir=out))
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["epochs"] == 1 and saved["trainable_params"] > 0 and saved["best_checkpoint"].endswith("best.ckpt")


def test_optimizer_lr_is_refused_in_favour_of_strategy_lr(tiny_cfg):
    with pytest.raises(ValueError, match="strategy.lr"):
        train(tiny_cfg("+optimizer.lr=0.1"))


import lightning as L  # noqa: E402


class GradsAtForward(L.Callback):
    """Records, for every training forward, its batch index and whether the model held gradients then."""

    seen: list = []

    def on_fit_start(self, trainer, module) -> None:
        GradsAtForward.seen = []
        module.model.register_forward_pre_hook(lambda m, args: GradsAtForward.seen.append(
            (self.batch_idx, any(p.grad is not None for p in m.parameters()))) if m.training else None)

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self.batch_idx = batch_idx


@pytest.mark.parametrize("accumulate", [1, 2])
def test_gradients_are_freed_before_the_forward_and_the_weights_are_lightnings(tiny_cfg, tmp_path, monkeypatch,
                                                                              accumulate):
    """visionft frees the gradients before each forward (PyTorch's order), not between the forward and the backward as
    Lightning's loop does; the weights must be exactly those of Lightning's own order, across an epoch boundary and
    with gradient accumulation (9 batches an epoch: the last one steps alone)."""
    from visionft.module import TransferModule

    def run(name):
        train(tiny_cfg("trainer.max_epochs=2", f"trainer.accumulate_grad_batches={accumulate}",
                       f"+callbacks.grads._target_={__name__}.GradsAtForward", output_dir=tmp_path / name))
        ckpt = torch.load(tmp_path / name / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
        return ckpt["state_dict"], list(GradsAtForward.seen)

    ours, seen = run("visionft")
    assert len(seen) == 18 and all(has == (i % accumulate != 0) for i, has in seen), seen
    monkeypatch.setattr(TransferModule, "on_train_batch_start", L.LightningModule.on_train_batch_start)
    monkeypatch.setattr(TransferModule, "optimizer_zero_grad", L.LightningModule.optimizer_zero_grad)
    lightnings, seen = run("lightning")
    assert any(has for i, has in seen if i % accumulate == 0 and i > 0)  # Lightning's order: they were still there
    assert ours.keys() == lightnings.keys() and all(torch.equal(ours[k], lightnings[k]) for k in ours)


def _disk_full_at(monkeypatch, name: str, nth: int) -> None:
    """Every open of a file whose path contains ``name`` for writing works, except the ``nth``: it writes half of
    what it is given, then fails as a full disk does (ENOSPC)."""
    import builtins
    import errno
    import io
    import os

    real, seen = builtins.open, {"n": 0}

    class Full:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            self.f.write(data[: len(data) // 2])
            self.f.flush()
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, key):
            return getattr(self.f, key)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def fake(file, mode="r", *args, **kwargs):
        f = real(file, mode, *args, **kwargs)
        if isinstance(file, (str, os.PathLike)) and name in os.fspath(file) and set(mode) & set("wax+"):
            seen["n"] += 1
            if seen["n"] == nth:
                return Full(f)
        return f

    monkeypatch.setattr(builtins, "open", fake)
    monkeypatch.setattr(io, "open", fake)


def test_a_full_disk_writing_metrics_json_keeps_the_previous_file_and_is_one_line(tmp_path, monkeypatch, capsys):
    import sys

    from conftest import TINY

    from visionft.__main__ import main

    out = tmp_path / "run"
    _disk_full_at(monkeypatch, "metrics.json", 2)  # the fit's record is written; the evaluated one hits a full disk
    monkeypatch.setattr(sys, "argv", ["visionft", *TINY, f"paths.output_dir={out}"])
    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"error: no space left on the device writing {out / 'metrics.json'} (the previous file "
                           f"there is intact)"), line
    saved = json.loads((out / "metrics.json").read_text())  # the fit's record, whole
    assert saved["epochs"] == 1 and saved["test"] == {} and saved["best_checkpoint"].endswith("best.ckpt")
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]


def test_without_checkpoint_callbacks_the_evaluated_weights_are_the_final_checkpoint(tiny_cfg, tmp_path):
    from hydra.utils import instantiate

    import visionft

    cfg = tiny_cfg("callbacks.best=null", "callbacks.last=null", output_dir=tmp_path / "run")
    metrics = train(cfg)
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    final = tmp_path / "run" / "checkpoints" / "final.ckpt"
    assert saved["final_checkpoint"] == str(final) and final.is_file() and saved["best_checkpoint"] is None
    # the file's weights, deployed on their own, score the recorded test accuracy and loss on the test images
    trained = visionft.load(final)
    dm = instantiate(cfg.data)
    dm.setup()
    images, labels = dm.splits["test"].images, dm.splits["test"].labels
    k = len(trained.classes)
    rows = trained.predict(list(images), topk=k)
    probs = [{trained.classes.index(r[f"label_{i}"]): r[f"prob_{i}"] for i in range(1, k + 1)} for r in rows]
    acc = sum(int(max(p, key=p.get) == y) for p, y in zip(probs, labels)) / len(labels)
    loss = -sum(math.log(p[int(y)]) for p, y in zip(probs, labels)) / len(labels)
    assert acc == pytest.approx(metrics["test"]["test/acc"], abs=1e-6) == saved["test"]["test/acc"]
    assert loss == pytest.approx(saved["test"]["test/loss"], abs=1e-4)
