"""Command-line options derived from the config dataclasses.

Every field of a run config (``dori.configs``) is one option: its flag, type, default and help
come from the field (``fields.opt``), so an option is written once. :func:`config_command` turns a
function ``body(config, *, out, resume, **load)`` into a typer command whose options are the
config's fields plus ``--out``, ``--resume`` and the load options ``--device``, ``--dtype`` and
``--gradient-checkpointing`` (``load``: ``load_model``'s keywords); the command builds and
validates the config (a bad value is a one-line error before anything is loaded) and calls the body.

Adding a command: write its config dataclass with ``opt(...)`` fields in ``configs.py``, its
stage in ``dori/stages/``, and a few lines in ``cli.py``::

    @config_command(app, MyConfig, out_help="Run folder.")
    def my_command(config: MyConfig, *, out: Path, resume: bool, **load) -> None:
        \"\"\"One line for --help.\"\"\"
        summary = run_my_stage(config, _load(config.model, **load), out, resume=resume)
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer

# The field annotations of the configs (strings: ``from __future__ import annotations``) as the
# types typer parses. A Wanda ratio ("0.05" or "auto") arrives as text and the config parses it.
TYPES = {"str": str, "int": int, "float": float, "bool": bool, "str | None": str | None, "int | None": int | None,
         "float | None": float | None, "float | str": str}  # fmt: skip

COMMON = {
    "resume": (bool, False, "--resume", "Continue an interrupted run in --out (same parameters)."),
    "device": (str, "cpu", "--device", "torch device, e.g. cpu, cuda, cuda:1."),
    "dtype": (str, "float32", "--dtype", "float32, float16 or bfloat16."),
    "gradient_checkpointing": (bool, False, "--gradient-checkpointing", "Recompute the U-Net's activations in the "
                               "backward pass (attack, locality, fine-tuning): far less GPU memory, about a third more "
                               "time per step; results unchanged."),  # fmt: skip
}
# The common options that choose how the model is loaded (passed to ``load_model``).
LOAD_OPTIONS = ("device", "dtype", "gradient_checkpointing")


def _parameter(name: str, kind: type, default, flag: str, help: str) -> inspect.Parameter:  # noqa: A002
    option = typer.Option(flag, help=help or None)
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=Annotated[kind, option],
                             default=inspect.Parameter.empty if default is dataclasses.MISSING else default)  # fmt: skip


def field_option(cls: type, name: str):
    """The ``Annotated`` type of one config field's option, for commands written by hand
    (``dori study``, ``dori generate``) that share an option with the configs."""
    item = next(f for f in dataclasses.fields(cls) if f.name == name)
    flag = item.metadata.get("flag") or "--" + name.replace("_", "-")  # both forms of a boolean
    return Annotated[TYPES[item.type], typer.Option(flag, help=item.metadata.get("help") or None)]


def common_option(name: str):
    """The ``Annotated`` type of one of :data:`COMMON` (``--resume``, ``--device``...)."""
    kind, _, flag, help = COMMON[name]  # noqa: A001
    return Annotated[kind, typer.Option(flag, help=help)]


def config_parameters(cls: type) -> list[inspect.Parameter]:
    """One typer option per command-line field of ``cls``, required ones first, in field order."""
    required, optional = [], []
    for item in dataclasses.fields(cls):
        meta = item.metadata
        if not meta.get("cli", True):
            continue
        if item.type not in TYPES:
            raise TypeError(f"{cls.__name__}.{item.name}: no command-line type for {item.type!r}")
        kind = TYPES[item.type]
        default = item.default
        if item.type == "float | str" and default is not dataclasses.MISSING:
            default = str(default)
        flag = meta.get("flag") or "--" + item.name.replace("_", "-")  # both forms of a boolean
        parameter = _parameter(item.name, kind, default, flag, meta.get("help", ""))
        (required if default is dataclasses.MISSING else optional).append(parameter)
    return required + optional


def config_command(app: typer.Typer, cls: type, *, name: str | None = None, out_help: str = "Run folder.",
                   extra: tuple[inspect.Parameter, ...] = ()) -> Callable:  # fmt: skip
    """Register ``body(config, *, out, resume, **extra, **load)`` as a command whose
    options come from ``cls`` (see the module docstring)."""

    def register(body: Callable) -> Callable:
        fields = config_parameters(cls)
        out = _parameter("out", Path, dataclasses.MISSING, "--out", out_help)
        common = [_parameter(key, kind, default, flag, help) for key, (kind, default, flag, help) in COMMON.items()]
        required = [p for p in fields if p.default is inspect.Parameter.empty]
        optional = [p for p in fields if p.default is not inspect.Parameter.empty]
        parameters = [*required, out, *optional, *extra, *common]
        names = {p.name for p in fields}

        @functools.wraps(body)
        def command(**values):
            config = cls(**{k: v for k, v in values.items() if k in names})
            rest = {k: v for k, v in values.items() if k not in names}
            return body(config, **rest)

        command.__signature__ = inspect.Signature(parameters)
        command.__annotations__ = {p.name: p.annotation for p in parameters}
        del command.__wrapped__  # typer must read the signature above, not the body's
        app.command(name)(command)
        return body

    return register
