"""The run settings as click options: ``run_options`` turns settings' definitions
(genfl_shared.config, which knows nothing of click) into options, ``given_run_options`` reads them
back (folding in deprecated spellings), and ``resolve_config`` makes a ``RunConfig`` of a preset and
the options given, refusing what cannot run as a usage error. ``group_options`` does the same for a
settings group outside ``RunConfig`` (``PathSettings``).
"""

from __future__ import annotations

from dataclasses import Field, fields
from pathlib import Path
from typing import Any, Callable, Mapping

import click

from .cli import option
from .config import (PRESETS, ROUNDS, Choice, ExistingPath, FloatRange, IntRange, RunConfig, RunOption,
                     UnknownPresetError, is_switch, option_flag, preset_config, setting_fields)

_ROUNDS_HELP = "Rounds of each federated phase (the default of --cvae-rounds and --classifier-rounds)."
_ROUNDS_TYPE = IntRange(0)


def click_type(kind: IntRange | FloatRange | Choice | ExistingPath | None) -> click.ParamType | None:
    """The click type of a setting's type description (None: click infers it)."""
    if kind is None:
        return None
    if isinstance(kind, IntRange):
        return click.IntRange(kind.min, kind.max)
    if isinstance(kind, FloatRange):
        return click.FloatRange(kind.min, kind.max, min_open=kind.min_open, max_open=kind.max_open)
    if isinstance(kind, Choice):
        return click.Choice(kind.values)
    if isinstance(kind, ExistingPath):
        return click.Path(exists=True, file_okay=not kind.folder, dir_okay=kind.folder, path_type=Path)
    raise TypeError(f"no click type for {kind!r}")


def _shown(name: str, value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return "all" if name == "train_subset" and value is None else str(value)


def _preset_note(name: str) -> str:
    values = {preset: config.setting(name) for preset, config in PRESETS.items()}
    shown = {p: _shown(name, v) for p, v in values.items()}
    if len(set(map(repr, values.values()))) == 1:
        return f" [preset: {next(iter(shown.values()))}]"
    return " [preset: " + ", ".join(f"{p} {v}" for p, v in sorted(shown.items())) + "]"


def _deprecated_name(old_flag: str) -> str:
    return "deprecated_" + old_flag[2:].replace("-", "_")


def _run_option(name: str) -> RunOption:
    return setting_fields()[name].metadata["option"]


def _setting_options(setting: Field, help_text: str) -> list[Callable]:
    """The click options of one setting: ``--name`` (a ``--x/--no-x`` pair for a boolean)
    defaulting to None, and its deprecated spellings, hidden."""
    name, meta = setting.name, setting.metadata["option"]
    if is_switch(setting):
        decorators = [option(f"{option_flag(name)}/--no-{name.replace('_', '-')}", name, default=None,
                             help=help_text)]
    else:
        decorators = [option(option_flag(name), name, type=click_type(meta.type), default=None, help=help_text)]
    for old in meta.deprecated:
        # Also read from its old GENFL_* variable, so a stale container setting still works (and warns).
        decorators.append(option(old, _deprecated_name(old), type=click_type(meta.type), default=None,
                                 hidden=True, help=f"Deprecated spelling of {option_flag(name)}."))
    return decorators


def _apply(decorators: list[Callable]) -> Callable:
    def apply(command):
        for decorator in reversed(decorators):
            command = decorator(command)
        return command

    return apply


def run_options(*names: str, preset_notes: bool = True) -> Callable:
    """Decorator adding the click options of these settings (and ``"rounds"``) to a command
    (``preset_notes``: say each preset's value in the help; off for a command without presets).

    Every option defaults to None ("not given", so the preset decides; see ``resolve_config``);
    a boolean field is a ``--x/--no-x`` pair. Deprecated spellings are hidden options that
    ``given_run_options`` folds into the new name with a warning."""
    decorators = []
    settings = setting_fields()
    for name in names:
        if name == ROUNDS:
            decorators.append(option("--rounds", type=click_type(_ROUNDS_TYPE), default=None, help=_ROUNDS_HELP))
            continue
        help_text = _run_option(name).help + (_preset_note(name) if preset_notes else "")
        decorators += _setting_options(settings[name], help_text)
    return _apply(decorators)


def group_options(group: type) -> Callable:
    """Decorator adding the click options of every setting of a settings group that is not part of
    ``RunConfig`` (so no preset sets it), in definition order; each defaults to None."""
    return _apply([decorator for setting in fields(group)
                   for decorator in _setting_options(setting, setting.metadata["option"].help)])


def given_run_options(params: dict[str, Any]) -> dict[str, Any]:
    """Pop the run options (and their deprecated spellings) out of a command's parameters:
    {field name or "rounds": value or None}. A deprecated spelling warns on stderr; giving both
    spellings is an error."""
    given: dict[str, Any] = {}
    for name in (ROUNDS, *setting_fields()):
        if name in params:
            given[name] = params.pop(name)
        if name == ROUNDS:
            continue
        for old in _run_option(name).deprecated:
            value = params.pop(_deprecated_name(old), None)
            if value is None:
                continue
            click.echo(f"Warning: {old} is deprecated and will be removed; use {option_flag(name)}", err=True)
            if given.get(name) is not None:
                raise click.UsageError(f"{old} and {option_flag(name)} are the same option; give one")
            given[name] = value
    return given


def resolve_config(preset: str, given: Mapping[str, Any]) -> RunConfig:
    """``genfl_shared.config.preset_config``, with an unknown preset a bad parameter and settings
    that cannot run together (``check_dp``, ``check_distill``) a usage error."""
    try:
        config = preset_config(preset, given)
    except UnknownPresetError as error:
        raise click.BadParameter(str(error)) from None
    try:
        config.check_dp()
        config.check_distill()
    except ValueError as error:
        raise click.UsageError(str(error)) from None
    return config
