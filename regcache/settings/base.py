"""What every settings model shares: the field metadata (command line, identity, scope) and error messages.

A settings model is a pydantic model with one field per setting: its type (choices are ``Literal``
types), default, constraints and help text live on the field, once. The command line, pipeline
blocks, their JSON Schema and a feature set's identity are all derived from these fields
(docs/design.md, "Settings").
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal, get_args

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

#: how a field takes part in a feature set's identity (None: it does not)
#: backbone: the same for every set one head reads (weights, preprocessing, precision); rows: what one set holds
Identity = Literal["backbone", "rows"]
#: where a field may be given: anywhere (a command's option and a pipeline block), by the pipeline's structure
#: only (the model of a models[] entry, the cache; still an option of the command), or on the command line only
Scope = Literal["any", "job", "cli"]


@dataclass(frozen=True)
class Cli:
    """How a field appears as a command-line option (everything else is derived from the field).

    ``parse`` turns the option's text (a tuple of texts when ``multiple``) into the field's value;
    ``show`` replaces the default shown by ``--help`` (e.g. "the model's" for a None default).
    """

    short: str | None = None
    flag: str | None = None
    multiple: bool = False
    metavar: str | None = None
    parse: Callable[[Any], Any] | None = None
    show: str | None = None
    argument: bool = False  # positional (nargs=-1 when multiple)


@dataclass(frozen=True)
class Meta:
    """Where a field may be given (`Scope`), whether it is part of a feature set's identity (`Identity`), whether
    it names a file (``path``: in a pipeline file, relative to the pipeline's folder), and whether each model of
    a multi-model extraction has its own value (``per_model``)."""

    identity: Identity | None = None
    scope: Scope = "any"
    path: bool = False
    per_model: bool = False


def _takes_bool(annotation: Any) -> bool:
    """Whether a field's type takes a yes/no anywhere in it (bool, Any, or a union or container holding one)."""
    if annotation is bool or annotation is Any:
        return True
    return any(_takes_bool(a) for a in get_args(annotation) if a is not Ellipsis)


class SettingsError(ValueError):
    """Settings that fail their checks; the message names every field (or option) and the reason."""


class Settings(BaseModel):
    """Base of every settings model: unknown fields are refused, and values are checked when made."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True, arbitrary_types_allowed=True)

    @model_validator(mode="before")
    @classmethod
    def _no_yes_for_a_number(cls, values: Any) -> Any:
        """A yes/no where a number is wanted (YAML's ``iterations: yes``) is refused, not read as 1 (pydantic
        would), as the JSON Schema refuses it."""
        for name, value in (values.items() if isinstance(values, dict) else ()):
            items = value if isinstance(value, (list, tuple)) else [value]
            field = cls.model_fields.get(name)
            if field is not None and any(isinstance(v, bool) for v in items) and not _takes_bool(field.annotation):
                raise ValueError(f"{name}: {value!r} is a yes/no value, and {name} takes no yes/no")
        return values

    @classmethod
    def make(cls, values: dict | None = None, *, where: str = "", names: Callable[[str], str] | None = None,
             **kw: Any):
        """Validate ``values`` (and ``kw``) into settings; errors become one `SettingsError` naming each field as
        ``where`` + its path (``probes[0].C``), or as ``names(field)`` (an option, ``--C``)."""
        try:
            return cls.model_validate({**(values or {}), **kw})
        except ValidationError as e:
            raise SettingsError(describe(e, where, names)) from None

    def given(self) -> dict[str, Any]:
        """The fields set explicitly (not left at their default), by name."""
        return {k: getattr(self, k) for k in self.model_fields_set}


def meta(cls: type[BaseModel], name: str) -> Meta:
    return next((m for m in cls.model_fields[name].metadata if isinstance(m, Meta)), Meta())


def cli(cls: type[BaseModel], name: str) -> Cli:
    return next((m for m in cls.model_fields[name].metadata if isinstance(m, Cli)), Cli())


def fields(cls: type[BaseModel], *, scope: tuple[Scope, ...] = ("any", "job", "cli"),
           identity: tuple[Identity, ...] | None = None) -> list[str]:
    """Field names of ``cls`` in declaration order, filtered by scope and identity."""
    return [n for n in cls.model_fields if meta(cls, n).scope in scope
            and (identity is None or meta(cls, n).identity in identity)]


def _path(loc: tuple, where: str, names: Callable[[str], str] | None) -> str:
    parts = list(loc)
    if not parts:
        return where or "settings"
    if names is not None and isinstance(parts[0], str):
        head, rest = names(parts[0]), parts[1:]
    else:
        head, rest = (f"{where}.{parts[0]}" if where and isinstance(parts[0], str)
                      else f"{where}[{parts[0]}]" if where else str(parts[0])), parts[1:]
    for p in rest:
        head += f"[{p}]" if isinstance(p, int) else f".{p}"
    return head


def describe(e: ValidationError, where: str = "", names: Callable[[str], str] | None = None) -> str:
    """One line per distinct failing field: ``path: reason (got VALUE)``."""
    lines: dict[str, str] = {}
    for err in e.errors(include_url=False):
        path = _path(err["loc"], where, names)
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown field (not a setting of this block)"
        quiet = err["type"] in ("missing", "extra_forbidden") or "input" not in err or not err["loc"]
        got = "" if quiet else f" (got {err['input']!r})"
        lines.setdefault(path, f"{path}: {msg}{got}")
    return "; ".join(lines.values())
