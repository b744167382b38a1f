"""One run per output folder, never mixed with another, never inside the data.

``claim(cfg, out)``: the global-rank-0 process locks the folder (``<out>/.lock``, an OS lock that the kernel drops
when the process ends, so a killed run leaves none behind) until ``train()`` returns; a second run into it is
refused. A folder that already holds a run (``metrics.json`` or a checkpoint) is refused too, unless the new run
resumes it (``resume=true``, or a ``ckpt_path`` inside it) or ``overwrite=true`` replaces it: that run's files are
removed first, so that none of them is mixed into the new run's. ``inside_data``: an output or cache folder inside
``data.root`` (whose files a later run would read as images, a folder of them as a class).

The command line does both before Hydra writes its ``.hydra/`` and log into the folder (``visionft.preflight``);
``train()`` does them again for the Python API and for each job of a sweep (each job its own folder)."""
from __future__ import annotations

import functools
import logging
import os
import shutil
import socket
import threading
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from visionft.errors import UsageError

try:
    import fcntl
except ImportError:  # not a POSIX system: no lock
    fcntl = None

log = logging.getLogger(__name__)
LOCK_FILE = ".lock"
# what a run writes into its folder (outputs, checkpoints, loggers, report, artifacts, a sweep job's error line)
RUN_FILES = ("checkpoints", "metrics.json", "config.yaml", "overrides.yaml", "README.md", "report", "predictions",
             "bad_images.csv", "csv", "tb", "export", "wise", "mlflow.db", "mlflow-artifacts", "wandb",
             "adapter.safetensors", "adapter_config.json", "adapters.safetensors", "prompts.safetensors", "error.txt")
HYDRA_FILES = (".hydra", "__main__.log")  # what Hydra writes as a run starts: the new run's own once Hydra ran
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")
_held: dict[str, FolderLock] = {}  # this process's locks, by real path
_calls = threading.local()  # the locks taken during the current train() call of this thread


def global_zero() -> bool:
    """Whether this process is (or will be) the global rank 0: every rank variable a launcher sets (torchrun,
    Lightning's DDP relaunch, SLURM, LSF) is absent or 0. Known before any Trainer exists."""
    return all(os.environ.get(k, "0").strip() in ("", "0") for k in RANK_VARIABLES)


class FolderLock:
    """An exclusive ``flock`` on ``<out>/.lock``, which names its holder (pid, host, start time)."""

    def __init__(self, out: Path) -> None:
        self.fd: int | None = os.open(out / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(self.fd, 300).decode(errors="replace").strip() or "pid unknown"
            self.release()
            raise UsageError(f"{out} is in use by another visionft run ({holder}){_ended(holder)}: wait for it to "
                             f"finish or pass another paths.output_dir") from None
        except BaseException:
            self.release()
            raise
        os.ftruncate(self.fd, 0)
        os.write(self.fd, f"pid {os.getpid()} on {socket.gethostname()}, started "
                          f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())

    def release(self) -> None:
        """Unlock (for forked workers that share the descriptor too), then close."""
        if self.fd is not None:
            fd, self.fd = self.fd, None
            try:
                fcntl.flock(fd, fcntl.LOCK_UN)
            finally:
                os.close(fd)


def _ended(holder: str) -> str:
    """A note when the holder named is a process of this machine that has ended: its data-loader workers hold the
    lock until they notice (a few seconds)."""
    words = holder.split()
    if len(words) < 4 or words[0] != "pid" or not words[1].isdigit() or words[3] != socket.gethostname():
        return ""
    try:
        os.kill(int(words[1]), 0)
    except ProcessLookupError:
        return "; that process has ended and its data-loader workers are stopping: retry in a few seconds"
    except OSError:
        pass
    return ""


def lock(out: Path) -> None:
    """Take the folder's lock for this process (kept when this process holds it already, e.g. taken by the command
    line before Hydra started); the current ``train()`` call releases it when it returns."""
    key = os.path.realpath(out)
    held = _held.get(key)
    if held is None:
        if fcntl is None:
            return
        out.mkdir(parents=True, exist_ok=True)
        held = _held[key] = FolderLock(out)
    taken = getattr(_calls, "taken", None)
    if taken is not None and key not in taken:
        taken.append(key)


def unlock(out: Path) -> None:
    held = _held.pop(os.path.realpath(out), None)
    if held is not None:
        held.release()


def releasing(fn):
    """Decorate ``train``: the folder locks taken during a call are released when it returns or raises."""
    @functools.wraps(fn)
    def call(*args, **kwargs):
        outer, _calls.taken = getattr(_calls, "taken", None), []
        try:
            return fn(*args, **kwargs)
        finally:
            for key in _calls.taken:
                unlock(Path(key))
            _calls.taken = outer
    return call


def run_in(out: Path) -> list[str]:
    """The files that say a run is in the folder: ``metrics.json`` and its checkpoints."""
    found = ["metrics.json"] if (out / "metrics.json").is_file() else []
    return found + sorted(f"checkpoints/{p.name}" for p in (out / "checkpoints").glob("*.ckpt"))


def written_by_visionft(out: Path, found: list[str]) -> bool:
    """Whether the run in ``out`` is visionft's: its command line on record, or a checkpoint (read weights-only) that
    holds visionft's model record, or its ``metrics.json``. Another tool's folder (its own ``checkpoints/*.ckpt``,
    README, logs) is not."""
    from visionft.checkpoints import read_checkpoint

    if (out / "overrides.yaml").is_file() or "strategy" in _json(out / "metrics.json"):
        return True
    for name in found:
        try:
            if name.endswith(".ckpt") and "visionft" in read_checkpoint(out / name):
                return True
        except (UsageError, OSError):
            continue
    return False


def _json(path: Path) -> dict:
    import json

    try:
        loaded = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return loaded if isinstance(loaded, dict) else {}


def _within(path, folder) -> bool:
    path, folder = (Path(os.path.realpath(os.path.expanduser(str(p)))) for p in (path, folder))
    return path == folder or folder in path.parents


def claim(cfg: DictConfig, out: Path) -> None:
    """On the global rank 0: lock the folder, then refuse a run already in it unless this run resumes it or
    ``overwrite=true`` (which removes its files). Other ranks write into the folder rank 0 holds."""
    if not global_zero():
        return
    lock(out)
    found = run_in(out)
    if not found:
        return
    resuming = "resume=true" if cfg.get("resume") else (
        f"ckpt_path={cfg.ckpt_path}" if cfg.get("ckpt_path") and _within(cfg.ckpt_path, out) else None)
    if resuming and cfg.get("overwrite"):
        raise UsageError(f"overwrite=true would remove the run in {out} that {resuming} continues: pass one or "
                         f"the other")
    if resuming:
        return
    if not cfg.get("overwrite"):
        raise UsageError(held_run(out, found))
    if not written_by_visionft(out, found):
        raise UsageError(f"overwrite=true removes a visionft run's files, and {out} holds files no visionft run wrote "
                         f"({', '.join(found)}): choose another paths.output_dir")
    log.warning("overwrite=true: removing the run in %s (%s)", out, ", ".join(found))
    clear(out, hydra=not hydra_started_in(out))


def held_run(out: Path, found: list[str]) -> str:
    from visionft.resume import resume_command

    state = "a finished" if "metrics.json" in found else "an unfinished"
    resume = (f"resume it with `{resume_command(out)}`, " if "checkpoints/last.ckpt" in found else "")
    return (f"{out} holds {state} run ({', '.join(found)}): {resume}pass overwrite=true to replace it, or "
            f"choose another paths.output_dir")


def hydra_started_in(out: Path) -> bool:
    """Whether Hydra runs this process's job in ``out`` (then ``.hydra/`` and the log there are this run's)."""
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.initialized() and os.path.realpath(HydraConfig.get().runtime.output_dir) == \
        os.path.realpath(out)


def clear(out: Path, hydra: bool) -> None:
    """Remove a run's files from its folder (and Hydra's record of it with ``hydra``); nothing else in it."""
    for name in RUN_FILES + (HYDRA_FILES if hydra else ()):
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.is_file() or path.is_symlink():
            path.unlink()


def inside_data(cfg: DictConfig, out: str | Path | None, multirun: bool = False) -> str | None:
    """The line refusing an output folder (``out``; None: Hydra's default run or sweep folder) or cache folder
    inside ``data.root``; None when neither is."""
    root = OmegaConf.select(cfg, "data.root", default=None, throw_on_missing=False, throw_on_resolution_failure=False)
    if not root:
        return None
    default = "multirun" if multirun else "outputs"  # Hydra's (conf/config.yaml), in the current folder
    folders = [(f"paths.output_dir={out}" if out else f"the run folder {default}/ (Hydra's default, in the current "
                f"folder)", "paths.output_dir", out or default)] + [
        (f"{key}={path}", key, path) for key in ("paths.cache_dir", "data.cache_dir")
        if (path := OmegaConf.select(cfg, key, default=None, throw_on_resolution_failure=False))]
    for name, key, path in folders:
        if _within(path, root):
            return (f"{name} is inside data.root={root}: the run would write into the data, where its files are read "
                    f"as images (a folder of them as a class): pass a {key} outside {root}")
    return None


def claim_before_hydra(cfg: DictConfig, out: str | None, multirun: bool) -> str | None:
    """The command line's checks of ``paths.output_dir`` before Hydra writes its ``.hydra/`` and log there: a single
    run's ``claim`` (the run then keeps the lock), a sweep's ``sweep_claim``. The line refusing it, or None."""
    if not out or not global_zero():
        return None
    try:
        (sweep_claim if multirun else claim)(cfg, Path(out))
    except UsageError as e:
        unlock(Path(out))
        return str(e)
    return None


def sweep_claim(cfg: DictConfig, root: Path) -> None:
    """A sweep into ``root`` (its jobs in ``root/<n>``): locked for the sweep's life; where an earlier sweep's jobs
    hold runs: refused, or with
    ``overwrite=true`` those runs are removed (each job folder that no run holds at the moment), so that the new
    sweep's report lists its own jobs alone. Each job then claims its own folder as it starts."""
    lock(root)  # held by the launching process for the whole sweep: a second sweep into root is refused
    jobs = sorted((d for d in (root.iterdir() if root.is_dir() else []) if d.name.isdigit() and run_in(d)),
                  key=lambda d: int(d.name))
    if not jobs or cfg.get("resume"):
        return
    if not cfg.get("overwrite"):
        names = ", ".join(d.name for d in jobs[:5]) + (", ..." if len(jobs) > 5 else "")
        raise UsageError(f"{root} holds the runs of an earlier sweep (jobs {names}): pass overwrite=true to replace "
                         f"them, or choose another paths.output_dir")
    for job in jobs:
        if fcntl is not None:
            FolderLock(job).release()  # in use: refused
        clear(job, hydra=True)
