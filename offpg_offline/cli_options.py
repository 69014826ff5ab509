"""Typer options generated from config dataclasses, and the CLI's one-line error handler.

`config_options(cls, into=...)` gives a command one option per field of a config dataclass:
`--field-name` (or the field's `flag` metadata), the field's `help` metadata as help text, its
default shown, text read by `config.parse_value` (optional fields accept `none`). Values are
range-checked by `config.validate` when the command builds the config, so the CLI, TOML files
and the Python API share one parser and one validation layer.

`OneLineErrors` is the group class of the `offpg` app: click usage errors and known user errors
(`ConfigError`, `DataError`, missing or unreadable files) become one `error:` line, exit 2.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import sys
from collections.abc import Callable
from enum import Enum
from typing import Annotated, Any, TypeVar

import typer
from typer._click import exceptions as click_errors  # typer vendors click
from typer.core import TyperGroup

from offpg_offline.config import ConfigError, field_types, flag_of, parse_value


def one_line(message: str) -> str:
    """`message` on one line: newlines and other control characters escaped (`\\n`)."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(message))


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean bad input, not a bug: config and data errors, missing files."""
    errors: list[type[BaseException]] = [ConfigError, FileNotFoundError, NotADirectoryError,
                                         IsADirectoryError, PermissionError]
    schema = sys.modules.get("offpg_offline.data.schema")  # loaded iff data was touched
    if schema is not None:
        errors.append(schema.DataError)
    return tuple(errors)


class OneLineErrors(TyperGroup):
    """The top-level handler: usage errors and known user errors become one `error:` line
    (exit 2) instead of click's usage panel or a traceback."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except click_errors.NoArgsIsHelpError:
            raise
        except click_errors.ClickException as err:
            context = getattr(err, "ctx", None)  # usage errors carry the command's context
            where = f" (see `{context.command_path} --help`)" if context else ""
            print_error(err.format_message() + where)
            raise typer.Exit(code=2) from None
        except _user_errors() as err:
            print_error(str(err))
            raise typer.Exit(code=2) from None


def print_error(message: str) -> None:
    """Print `message` as one `error:` line on stderr."""
    typer.secho(f"error: {one_line(message)}", err=True, fg="red")


def _metavar(cls: type, key: str) -> str:
    """`INTEGER`, `FLOAT`, `SIZES`, `[a|b]` for enums and choices; `|none` when optional (or the
    field's own word for None, e.g. `|auto`)."""
    base, optional, is_tuple = field_types(cls)[key]
    metadata = cls.__dataclass_fields__[key].metadata  # type: ignore[attr-defined]
    choices = metadata.get("choices")
    if isinstance(base, type) and issubclass(base, Enum):
        choices = tuple(str(member.value) for member in base)
    if is_tuple:
        return "SIZES" if base is int else ",".join(choices) if choices else "A,B,..."
    name = ("[" + "|".join(choices) + "]" if choices
            else {int: "INTEGER", float: "FLOAT"}.get(base, "TEXT"))
    return name + ("|" + metadata.get("none", "none") if optional else "")


_NONE = object()  # what an option given as `none` parses to, until `config_options` hands it on


def _parser(cls: type, key: str) -> Callable[[str], Any]:
    """The option's text parser: `config.parse_value`, the one parser of options, `--grid` and
    TOML text (ranges are checked when the config is built)."""

    def parse(text: str) -> Any:
        if not isinstance(text, str):
            return text
        try:
            value = parse_value(cls, key, text)
        except ConfigError as err:
            raise typer.BadParameter(err.problem) from None
        return _NONE if value is None else value  # given as `none`, unlike an absent option

    return parse


def _shown_default(value: Any, word: str | None = None) -> str:
    if value is None:
        return word or "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    return str(value.value if isinstance(value, Enum) else value)


def _option(cls: type, f: dataclasses.Field[Any], panel: str | None) -> Any:
    """The `Annotated` type of the option of field `f`: help from the field, default shown."""
    base, optional, _ = field_types(cls)[f.name]
    flag = flag_of(cls, f.name)
    info: dict[str, Any] = {"help": f.metadata.get("help"),
                            "show_default": _shown_default(f.default, f.metadata.get("none")),
            "rich_help_panel": panel}
    if base is bool and not optional:
        return Annotated[bool | None, typer.Option(f"{flag}/--no-{flag[2:]}", **info)]
    return Annotated[Any, typer.Option(flag, parser=_parser(cls, f.name),
                                       metavar=_metavar(cls, f.name), **info)]


F = TypeVar("F", bound=Callable[..., Any])


def config_options(cls: type, *, into: str, panel: str | None = None,
                   exclude: frozenset[str] = frozenset()) -> Callable[[F], F]:
    """Give a Typer command one option per field of config dataclass `cls` (bar `exclude`).

    Each option is `--field-name` (or the field's `flag`), with the field's help text and
    default; optional fields accept `none`. The command receives the options given on the
    command line as the keyword `into`: {field: value} (options left out are absent, so a TOML
    file or the config's defaults decide them). Stack it under `@app.command()`.
    """
    fields = [f for f in dataclasses.fields(cls) if f.name not in exclude]

    def decorate(func: F) -> F:
        signature = inspect.signature(func, eval_str=True)
        params = [p for p in signature.parameters.values() if p.name != into]
        clash = {p.name for p in params} & {f.name for f in fields}
        if clash:
            raise TypeError(f"{func.__name__} already has parameter(s) {sorted(clash)}")
        params += [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=None,
                                     annotation=_option(cls, f, panel)) for f in fields]

        @functools.wraps(func)
        def command(**kwargs: Any) -> Any:
            values = {f.name: kwargs.pop(f.name, None) for f in fields}
            given = {key: None if value is _NONE else value
                     for key, value in values.items() if value is not None}
            return func(**kwargs, **{into: given})

        command.__signature__ = signature.replace(parameters=params)  # type: ignore[attr-defined]
        command.__annotations__ = {p.name: p.annotation for p in params}
        return command  # type: ignore[return-value]

    return decorate
