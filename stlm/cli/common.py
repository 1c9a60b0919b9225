"""What every ``stlm`` command shares: the error line, ``-v/-q`` (before or after the command name;
what they silence is in :mod:`stlm.cli.output`), ``STLM_<COMMAND>_<OPTION>`` environment variables
and ``--dtype``.

Library errors name Python fields (``top_p=1.5``); the CLI rewrites them to the command's flags
(``--top-p 1.5``) when it prints ``error: …``, so a user reads the spelling they typed.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Callable
from typing import Any, Final, TypeVar

import click

from stlm.cli.output import verbosity
from stlm.errors import StlmError
from stlm.package.dtypes import DTYPES, NUMPY_NAME, parse_dtype

ENV_PREFIX: Final = "STLM"
#: Environment variables that silence other libraries' progress bars under ``-q``.
QUIET_ENV: Final = {"TQDM_DISABLE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
_RESTORE: Final = "stlm.restore"

F = TypeVar("F", bound=Callable[..., Any])


class StlmFailure(click.ClickException):
    """An :class:`~stlm.errors.StlmError` as the CLI shows it: ``error: …`` on stderr, exit status 2."""

    exit_code = 2

    def show(self, file: Any = None) -> None:
        click.echo(f"error: {self.format_message()}", err=True)


def option_flags(command: click.Command) -> dict[str, str]:
    """Python name of each of ``command``'s options → its long flag (``top_p`` → ``--top-p``)."""
    flags = {}
    for param in command.params:
        longs = [o for o in param.opts if o.startswith("--")] if isinstance(param, click.Option) else []
        if param.name and longs:
            flags[param.name] = longs[0]
    return flags


def with_flags(message: str, flags: dict[str, str]) -> str:
    """``message`` with each ``name=value`` of a Python field that is an option spelled ``--flag value``."""
    for name, flag in flags.items():
        message = re.sub(rf"(?<![\w.-]){re.escape(name)}=", f"{flag} ", message)
    return message


class StlmGroup(click.Group):
    """The ``stlm`` group: turns a command's StlmError into :class:`StlmFailure`, naming its flags."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except StlmError as exc:
            command = self.get_command(ctx, ctx.invoked_subcommand) if ctx.invoked_subcommand else None
            flags = option_flags(command) if command is not None else {}
            raise StlmFailure(with_flags(str(exc), flags)) from None


def _verbosity(ctx: click.Context) -> dict[str, bool]:
    root = ctx.find_root()
    if _RESTORE not in root.meta:
        root.meta[_RESTORE] = True
        # in-process callers (tests, embedding) get their logging level and environment back
        level, saved = logging.getLogger().level, {k: os.environ.get(k) for k in QUIET_ENV}
        root.call_on_close(lambda: _restore(level, saved))
    return verbosity(ctx)


def _restore(level: int, saved: dict[str, str | None]) -> None:
    logging.getLogger().setLevel(level)
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def configure_logging(ctx: click.Context) -> None:
    """Log to stderr at the level ``-v``/``-q`` ask for (WARNING without either; ``-q`` wins)."""
    state = _verbosity(ctx)
    logging.basicConfig(stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger().setLevel(
        logging.ERROR if state["quiet"] else logging.INFO if state["verbose"] else logging.WARNING
    )
    if state["quiet"]:
        os.environ.update(QUIET_ENV)


def _set_verbosity(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    """Callback of ``-v``/``-q`` (on the group and on every command)."""
    if value and not ctx.resilient_parsing:
        _verbosity(ctx)[str(param.name)] = True
        configure_logging(ctx)


def verbosity_params(*, envvar: bool) -> list[click.Option]:
    """``-v/--verbose`` and ``-q/--quiet`` (``envvar``: also read ``STLM_VERBOSE``/``STLM_QUIET``)."""
    return [
        click.Option(
            flags,
            is_flag=True,
            expose_value=False,
            is_eager=True,
            callback=_set_verbosity,
            envvar=f"{ENV_PREFIX}_{flags[1][2:].upper()}" if envvar else None,
            show_envvar=envvar,
            help=help_text,
        )
        for flags, help_text in (
            (["-v", "--verbose"], "Log progress details to stderr."),
            (["-q", "--quiet"], "Only errors and the result: no progress, notes or logs below ERROR (wins over -v)."),
        )
    ]


def add_verbosity_and_envvars(group: click.Group) -> None:
    """Give ``group`` and each of its commands ``-v/-q``, and name each option's environment variable
    ``STLM_<COMMAND>_<FLAG>`` (``STLM_GENERATE_TOP_P``; an option with its own, e.g. ``STLM_API_KEY``,
    keeps it). Scoped by command because ``--top-k``, ``--batch`` or ``--output`` mean different
    things in different commands. Call once, after the last command is added."""
    group.params.extend(verbosity_params(envvar=True))
    for name, command in group.commands.items():
        prefix = f"{ENV_PREFIX}_{name}".upper().replace("-", "_")
        for param in command.params:
            if isinstance(param, click.Option) and param.envvar is None:
                flag = next((o for o in param.opts if o.startswith("--")), param.opts[0]).lstrip("-")
                param.envvar = f"{prefix}_{flag.upper().replace('-', '_')}"
                param.show_envvar = True
        command.params.extend(verbosity_params(envvar=False))


def dtype_option(help_text: str) -> Callable[[F], F]:
    """``--dtype``: ``fp32|fp16|bf16`` or numpy's ``float32|float16|bfloat16``, passed on as the short
    name (:func:`stlm.package.dtypes.parse_dtype`; an unknown name is an ``error:`` naming both spellings)."""
    return click.option(
        "--dtype",
        default="fp32",
        show_default=True,
        metavar="|".join([*DTYPES, *NUMPY_NAME.values()]),
        callback=lambda ctx, param, value: parse_dtype(value),
        help=help_text,
    )
