"""Command-line options generated from settings models: one option (or argument) per field.

The option's name, type, choices, help and shown default all come from the field (`regcache.settings`),
so a command cannot drift from the settings a pipeline block or the Python API takes. A command
receives the values the user typed; the settings model fills the defaults and checks everything,
and its errors name the options.
"""
from __future__ import annotations

import types
import typing
from pathlib import Path
from typing import Any, Callable, Literal

import click
from click.core import ParameterSource

from ..settings import PRESETS, Settings, SettingsError, cli, fields, meta
from ..settings.base import Scope


def _bare(annotation: Any) -> Any:
    """The type inside ``Optional[...]``/``X | None`` and ``Annotated[...]``."""
    while True:
        origin = typing.get_origin(annotation)
        if origin is typing.Annotated:
            annotation = typing.get_args(annotation)[0]
        elif origin in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(annotation) if a is not type(None)]
            if len(args) != 1:
                return annotation
            annotation = args[0]
        else:
            return annotation


def flag(cls: type[Settings], name: str) -> str:
    """The option that sets field ``name`` (what error messages call it)."""
    c = cli(cls, name)
    if c.argument:
        return name.upper()
    return (c.flag or "--" + name.replace("_", "-")).split("/")[0]


def _default_text(cls: type[Settings], name: str) -> str | None:
    info, c = cls.model_fields[name], cli(cls, name)
    if c.show is not None:
        return c.show
    if info.is_required():
        return None
    if info.default_factory is not None:
        value = info.default_factory()
    else:
        value = info.default
    if value is None or value is ... or value == [] or value == {} or isinstance(value, bool):
        return None
    if isinstance(value, (list, tuple)):
        return ",".join(",".join(v) if isinstance(v, tuple) else str(v) for v in value)
    return str(value)


def _param(cls: type[Settings], name: str, text: bool = False) -> Callable:
    info, c = cls.model_fields[name], cli(cls, name)
    kind = str if text else _bare(info.annotation)
    required = info.is_required()
    if c.argument:
        return click.argument(name, nargs=-1 if c.multiple else 1, required=required,
                              type=click.Path(path_type=Path) if kind is Path else click.STRING,
                              metavar=c.metavar)
    decls = [c.flag or "--" + name.replace("_", "-"), *([c.short] if c.short else []), name]
    help_ = (info.description or "").strip()
    shown = _default_text(cls, name)
    if shown is not None:
        help_ += f" [default: {shown}]"
    elif required:
        help_ += " [required]"
    opts: dict[str, Any] = {"help": help_, "default": None, "metavar": c.metavar, "multiple": c.multiple}
    if kind is bool:
        if info.default is True or any(name in p.settings for p in PRESETS.values()):  # on without being typed
            decls[0] = f"{decls[0]}/--no-{decls[0][2:]}"
        opts.update(is_flag=True, default=None, metavar=None)
    elif text:
        own = _bare(info.annotation)
        one = ("|".join(str(v) for v in typing.get_args(own)) if typing.get_origin(own) is Literal
               else c.metavar or getattr(own, "__name__", "TEXT").upper())
        opts["metavar"] = f"{one}[{';' if ',' in one else ','}...]"
    elif typing.get_origin(kind) is Literal:
        opts["type"] = click.Choice([str(v) for v in typing.get_args(kind)])
    elif kind in (int, float):
        opts["type"] = kind
    elif kind is Path:
        opts["type"] = click.Path(path_type=Path)
    return click.option(*decls, **opts)


def options(cls: type[Settings], *, scope: tuple[Scope, ...] = ("any", "job", "cli"),
            exclude: tuple[str, ...] = (), text: tuple[str, ...] = ()) -> Callable:
    """Decorate a command with one parameter per field of ``cls`` (those of ``scope``, but ``exclude``); those in
    ``text`` take text that the command splits first (one value per model of a pass), checked by the model."""
    names = [n for n in fields(cls, scope=scope) if n not in exclude]
    names.sort(key=lambda n: (not cls.model_fields[n].is_required(), meta(cls, n).scope != "job"))  # stable

    def decorate(f: Callable) -> Callable:
        for name in reversed(names):
            f = _param(cls, name, name in text)(f)
        f.__settings__ = (cls, names)
        return f
    return decorate


def settings(cls: type[Settings], values: dict[str, Any], **extra: Any) -> Any:
    """The settings the user typed (defaults left to the model), checked; errors name the options."""
    ctx = click.get_current_context()
    given = {}
    for name, value in values.items():
        if name not in cls.model_fields:
            continue
        source = ctx.get_parameter_source(name)
        if source in (None, ParameterSource.DEFAULT) or value is None or value == ():
            continue
        parse = cli(cls, name).parse
        given[name] = parse(value) if parse else value
    try:
        return cls.make({**given, **extra}, names=lambda n: flag(cls, n))
    except SettingsError as e:
        raise click.UsageError(str(e)) from None
