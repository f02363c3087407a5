"""Value normalisation shared by index extraction and query parsing."""

from __future__ import annotations

import calendar
import re
import unicodedata
from datetime import UTC, datetime, timedelta

MAX_VALUE = 255

DATE_RE = re.compile(
    r"(?P<y>\d{4})(-(?P<m>\d{2})(-(?P<d>\d{2})"
    r"(T(?P<H>\d{2}):(?P<M>\d{2})(:(?P<S>\d{2})(?P<f>\.\d+)?)?"
    r"(?P<tz>Z|[+-]\d{2}:\d{2})?)?)?)?"
)


def normalize_string(text: str) -> str:
    """Lower-case, accent-free form used for FHIR string search."""
    if text.isascii():
        # What the general path gives for ASCII (NFKD and case folding leave it ASCII, with
        # nothing to strip), without a call per character: most index values are ASCII.
        return text.lower().strip()[:MAX_VALUE]
    decomposed = unicodedata.normalize("NFKD", text)
    stripped = "".join(c for c in decomposed if not unicodedata.combining(c))
    return stripped.casefold().strip()[:MAX_VALUE]


def date_range(text: str) -> tuple[datetime, datetime] | None:
    """The instant range ``[low, high)`` a FHIR date/dateTime/instant covers, or None."""
    match = DATE_RE.fullmatch(text.strip())
    if not match:
        return None
    g = match.groupdict()
    try:
        year = int(g["y"])
        if g["m"] is None:
            low = datetime(year, 1, 1, tzinfo=UTC)
            return low, datetime(
                year + 1, 1, 1, tzinfo=UTC
            ) if year < 9999 else datetime.max.replace(tzinfo=UTC)
        month = int(g["m"])
        if g["d"] is None:
            low = datetime(year, month, 1, tzinfo=UTC)
            days = calendar.monthrange(year, month)[1]
            return low, low + timedelta(days=days)
        day = int(g["d"])
        if g["H"] is None:
            low = datetime(year, month, day, tzinfo=UTC)
            return low, low + timedelta(days=1)
        tz = UTC
        if g["tz"] and g["tz"] != "Z":
            sign = 1 if g["tz"][0] == "+" else -1
            hours, minutes = int(g["tz"][1:3]), int(g["tz"][4:6])
            from datetime import timezone

            tz = timezone(sign * timedelta(hours=hours, minutes=minutes))
        if g["S"] is None:
            low = datetime(year, month, day, int(g["H"]), int(g["M"]), tzinfo=tz)
            return low.astimezone(UTC), (low + timedelta(minutes=1)).astimezone(UTC)
        fraction = g["f"] or ""
        micro = int((fraction[1:] + "000000")[:6]) if fraction else 0
        low = datetime(year, month, day, int(g["H"]), int(g["M"]), int(g["S"]), micro, tzinfo=tz)
        step = (
            timedelta(microseconds=10 ** (6 - min(len(fraction) - 1, 6)))
            if fraction
            else timedelta(seconds=1)
        )
        return low.astimezone(UTC), (low + step).astimezone(UTC)
    except ValueError:
        return None
