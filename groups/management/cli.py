"""Shared pieces of the roster maintenance commands: progress bars, prompts, arguments."""

from __future__ import annotations

import os
import tempfile
from typing import Any
from urllib.parse import unquote, urlsplit

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser
from tqdm import tqdm

from fhirservice.clickhouse import ClickHouseUnavailable, get_clickhouse
from fhirservice.models import StoredResource
from groups.maintenance.common import MSG_NO_GROUP

MSG_POSITIVE = "--{name} must be a positive whole number, not {value}"
MSG_EMBEDDED_IN_USE = (
    "The embedded ClickHouse store {path} is held by another process, most likely the "
    "running service (chdb lets one process open a path): stop the service, run this "
    "command, and start the service again, or run service and commands on a ClickHouse "
    "server (CLICKHOUSE_URL=clickhouse://…), which they can share."
)


class ProgressBar:
    """A tqdm bar on the command's stderr, fed by the services' ``progress`` callbacks.

    ``progress(total=n, desc=…, unit=…)`` starts a bar, ``progress(k, **counts)`` advances
    it by ``k`` and shows the counts; at verbosity 0 nothing is drawn.
    """

    def __init__(self, command: BaseCommand, *, unit: str, verbosity: int) -> None:
        # The wrapped stream, not Django's OutputWrapper: that one appends a newline to
        # every write and would break the bar's in-place redraws.
        self.stream = getattr(command.stderr, "_out", command.stderr)
        self.unit = unit
        self.disable = verbosity == 0
        self.bar: tqdm | None = None

    def __call__(
        self,
        n: int = 0,
        *,
        total: int | None = None,
        desc: str | None = None,
        unit: str | None = None,
        **counts: Any,
    ) -> None:
        """Advance the bar, or (re)start it with a total (and a label and unit)."""
        if total is not None:
            self.close()
            self.bar = tqdm(
                total=total,
                desc=desc,
                unit=unit or self.unit,
                file=self.stream,
                disable=self.disable,
                mininterval=0.5,
                dynamic_ncols=True,
            )
            return
        if self.bar is None:
            return
        if counts:
            self.bar.set_postfix(counts, refresh=False)
        self.bar.update(n)

    def close(self) -> None:
        """Draw the final state and release the line."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def confirm(command: BaseCommand, question: str) -> bool:
    """Ask a yes/no question on the terminal; only "y" or "yes" agrees."""
    answer = input(f"{question} [y/N] ")
    return answer.strip().lower() in ("y", "yes")


def positive(options: dict[str, Any], name: str) -> None:
    """CommandError unless option ``name`` is None or a positive integer."""
    value = options[name.replace("-", "_")]
    if value is not None and value <= 0:
        raise CommandError(MSG_POSITIVE.format(name=name, value=value))


def add_no_input(parser: CommandParser, help_text: str) -> None:
    """``--no-input`` / ``--noinput``: clears ``interactive`` (Django's own spelling)."""
    parser.add_argument(
        "--no-input", "--noinput", action="store_false", dest="interactive", help=help_text
    )


def named_groups(group_ids: list[str] | None) -> list[str] | None:
    """The ``--group`` ids without repeats; CommandError naming the first unknown one."""
    if group_ids is None:
        return None
    group_ids = list(dict.fromkeys(group_ids))
    known = set(
        StoredResource.objects.filter(resource_type="Group", resource_id__in=group_ids).values_list(
            "resource_id", flat=True
        )
    )
    for group_id in group_ids:
        if group_id not in known:
            raise CommandError(MSG_NO_GROUP.format(id=group_id))
    return group_ids


def embedded_clickhouse_or_refuse() -> None:
    """Open the embedded ClickHouse store now; CommandError when another process holds it.

    chdb lets one process open a data path, so beside a running service on the embedded
    default a command cannot reach the member store at all. It refuses up front, in one
    sentence, instead of failing with a traceback halfway. A ClickHouse server is opened
    lazily, and being down is reported by each command as before.
    """
    url = settings.CLICKHOUSE_URL
    if not url.startswith("chdb://"):
        return
    # The embedded engine writes its own "Cannot lock file" line to file descriptor 2 before
    # Python sees the error: held back, and shown only if the store opens after all.
    with tempfile.TemporaryFile() as engine_output:
        saved = os.dup(2)
        os.dup2(engine_output.fileno(), 2)
        try:
            get_clickhouse()
        except ClickHouseUnavailable as exc:
            path = unquote(urlsplit(url).path)
            raise CommandError(MSG_EMBEDDED_IN_USE.format(path=path)) from exc
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        engine_output.seek(0)
        os.write(2, engine_output.read())
