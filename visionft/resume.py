"""Resuming a run from its folder alone: ``python -m visionft resume=true paths.output_dir=RUN`` runs with the
overrides the run was started with (``RUN/overrides.yaml``, else Hydra's ``RUN/.hydra/overrides.yaml``), and any
override given beside ``resume=true`` is applied on top of them. The resume checks (``resume_changes``) then compare
the result with the checkpoint as for any resume. ``resume_command(run)`` is that command, quoted for a shell."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

PASS_THROUGH = ("--help", "-h", "--hydra-help", "--info", "-i", "--cfg", "-c", "--resolve", "--package", "-p",
                "--shell-completion", "-sc", "--version", "--experimental-rerun")


def split_argv(argv: list[str]) -> tuple[list[str], str | None] | None:
    """(overrides, config dir) of a command line, or None when it is not a plain run or multirun."""
    overrides, config_dir, it = [], None, iter(argv)
    for a in it:
        if a in PASS_THROUGH or a.startswith(("--config-name", "-cn", "--config-path", "-cp")):
            return None
        if a in ("--config-dir", "-cd"):
            config_dir = next(it, None)
        elif a.startswith("--config-dir="):
            config_dir = a.split("=", 1)[1]
        elif a not in ("-m", "--multirun"):
            overrides.append(a)
    return overrides, config_dir


# not carried over: a resumed run continues from the folder's last.ckpt, whatever checkpoint the run began from, and
# never replaces the run it continues (overwrite=true started it)
NOT_CARRIED = ("ckpt_path", "resume", "overwrite")


def _key(override) -> str:
    return override.key_or_group + (f"@{override.package}" if override.package else "")


def stored_overrides(run: Path) -> list[str] | None:
    """The command-line overrides a run was started with, or None when its folder holds none."""
    import yaml

    for path in (run / "overrides.yaml", run / ".hydra" / "overrides.yaml"):
        if path.is_file():
            loaded = yaml.safe_load(path.read_text())
            if isinstance(loaded, list) and all(isinstance(o, str) for o in loaded):
                return loaded
    return None


def with_run_overrides(argv: list[str], output_dir: str | Path | None = None) -> list[str]:
    """``argv`` with the stored overrides of the run it resumes inserted before its own (those it does not set
    again); ``argv`` as it is when it resumes no run folder (no ``resume=true`` with ``paths.output_dir`` or
    ``output_dir``, a multirun, a folder without stored overrides) or is not Hydra's grammar (Hydra reports it)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser


    split = split_argv(argv)
    if split is None or not split[0] or "-m" in argv or "--multirun" in argv:
        return argv
    parser = OverridesParser.create()
    try:
        given = {_key(o): o for o in parser.parse_overrides(split[0])}
    except Exception:  # noqa: BLE001 - Hydra reports its own grammar errors
        return argv
    resume, out = given.get("resume"), given.get("paths.output_dir")
    run = output_dir or (out.value() if out is not None else None)
    if resume is None or resume.value() is not True or not run:
        return argv
    skip = {*given, *NOT_CARRIED, *(["paths.output_dir"] if output_dir else [])}
    kept = [raw for raw in stored_overrides(Path(str(run)).expanduser()) or [] if _raw_key(parser, raw) not in skip]
    first = argv.index(split[0][0])  # Hydra takes its overrides as one run of arguments
    return [*argv[:first], *kept, *argv[first:]]


def _raw_key(parser, raw: str) -> str:
    try:
        return _key(parser.parse_override(raw))
    except Exception:  # noqa: BLE001 - e.g. a path Hydra's grammar cannot take, recorded by the Python API
        return raw.split("=", 1)[0].lstrip("+~")


def resume_command(run: str | Path) -> str:
    """``python -m visionft resume=true paths.output_dir=RUN`` for this run, ready to paste into a shell (the path
    absolute, quoted for Hydra's override grammar and for the shell where it needs to be)."""
    path = hydra_quoted(str(Path(run).resolve()))
    return f"python -m visionft resume=true {shlex.quote(f'paths.output_dir={path}')}"


def hydra_quoted(text: str) -> str:
    """``text`` as a value of Hydra's override grammar: as it is when plain, else a quoted string (backslashes are
    literal in it except a run of them before a quote, or before the end)."""
    if re.fullmatch(r"[\w./-]+", text, re.ASCII):
        return text
    return '"' + re.sub(r'(\\*)("|$)', lambda m: 2 * m[1] + ("\\" + m[2] if m[2] else ""), text) + '"'
