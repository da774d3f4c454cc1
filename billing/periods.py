"""Calendar periods in the company's own time zone (``billing.timezone``, default UTC).

The ledger keeps UTC instants; a department in Beijing bills by Beijing days. This module
turns a zone name into a ZoneInfo (checked at start-up and on every CLI / API override),
a report bound ('2026-12-01' or an ISO timestamp) into the UTC minute key the ledger's
rollups use, and a UTC bucket back into its local day. Reports group in SQL by UTC day
when the zone is UTC, by UTC hour when every offset the zone uses in the range is a whole
number of hours (then an hour never straddles a local midnight), else by UTC minute.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import functools
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

__all__ = [
    "BUDGET_PERIODS",
    "DEFAULT_TIMEZONE",
    "CalendarPeriod",
    "bucket_chars",
    "bucket_local_day",
    "calendar_period",
    "load_zone",
    "utc_minute_key",
]

DEFAULT_TIMEZONE = "UTC"
BUDGET_PERIODS = ("day", "week", "month")
_UTC = _dt.timezone.utc


@functools.cache
def load_zone(name: str | None) -> ZoneInfo:
    """The IANA zone ``name`` (None or '': UTC); ValueError naming it when unknown."""
    name = (name or DEFAULT_TIMEZONE).strip()
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ValueError(
            f"unknown time zone {name!r}: use an IANA name such as UTC or Asia/Shanghai"
        ) from exc


def utc_minute_key(text: str, zone: ZoneInfo, *, end: bool = False) -> str:
    """'YYYY-MM-DDTHH:MM' (UTC) of a bound read in ``zone``.

    A bare date is that day's local midnight (as ``end``: the next day's, so the day is
    included); a timestamp with an offset keeps its instant; one without is local time.
    Raises ValueError for anything that is not an ISO-8601 date or timestamp.
    """
    text = str(text).strip()
    try:
        if len(text) == 10:
            day = _dt.date.fromisoformat(text) + _dt.timedelta(days=1 if end else 0)
            moment = _dt.datetime.combine(day, _dt.time(), tzinfo=zone)
        else:
            moment = _dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
            if moment.tzinfo is None:
                moment = moment.replace(tzinfo=zone)
    except ValueError as exc:
        raise ValueError(f"bad date/time {text!r}: use YYYY-MM-DD or ISO-8601") from exc
    return moment.astimezone(_UTC).strftime("%Y-%m-%dT%H:%M")


def bucket_chars(zone: ZoneInfo, lo: str, hi: str) -> int:
    """How many leading characters of a UTC ISO timestamp make a bucket that lies within
    one local day of ``zone`` over [lo, hi): 10 (day), 13 (hour) or 16 (minute)."""
    if zone.key == "UTC":
        return 10
    start = _dt.datetime.fromisoformat(lo).replace(tzinfo=_UTC)
    stop = _dt.datetime.fromisoformat(hi).replace(tzinfo=_UTC)
    step = _dt.timedelta(hours=6)  # finer than any zone changes its offset
    moment = start
    while moment <= stop + step:
        offset = moment.astimezone(zone).utcoffset() or _dt.timedelta()
        if offset.total_seconds() % 3600:
            return 16
        moment += step
    return 13


def bucket_local_day(bucket: str, zone: ZoneInfo) -> _dt.date:
    """The local day of ``zone`` that the UTC bucket ('YYYY-MM-DD[THH[:MM]]') lies in."""
    if len(bucket) == 10:
        moment = _dt.datetime.fromisoformat(bucket)
    elif len(bucket) == 13:
        moment = _dt.datetime.fromisoformat(bucket + ":00")
    else:
        moment = _dt.datetime.fromisoformat(bucket[:16])
    return moment.replace(tzinfo=_UTC).astimezone(zone).date()


@dataclasses.dataclass(frozen=True)
class CalendarPeriod:
    """One day, week (Monday to Monday) or month of a zone: local bounds and UTC bounds."""

    name: str  # day | week | month
    local_start: _dt.datetime
    local_end: _dt.datetime

    @property
    def utc_start(self) -> _dt.datetime:
        return self.local_start.astimezone(_UTC)

    @property
    def utc_end(self) -> _dt.datetime:
        return self.local_end.astimezone(_UTC)

    def describe_reset(self) -> str:
        """'2027-01-01 00:00 Asia/Shanghai': when the next period starts, in local time."""
        return f"{self.local_end:%Y-%m-%d %H:%M} {self.local_end.tzinfo}"

    def label(self) -> str:
        """'today', 'this week', 'this month': how a message names the period."""
        return "today" if self.name == "day" else f"this {self.name}"


def calendar_period(name: str, zone: ZoneInfo, moment: _dt.datetime) -> CalendarPeriod:
    """The ``name`` period (day | week | month) of ``zone`` that holds ``moment`` (aware).

    Bounds are local midnights (Monday for a week, the 1st for a month), so a Beijing
    "day" is 16:00 to 16:00 UTC; raises ValueError for another period name.
    """
    local = moment.astimezone(zone)
    day = local.date()
    if name == "day":
        first, after = day, day + _dt.timedelta(days=1)
    elif name == "week":
        first = day - _dt.timedelta(days=day.weekday())
        after = first + _dt.timedelta(days=7)
    elif name == "month":
        first = day.replace(day=1)
        after = (first + _dt.timedelta(days=32)).replace(day=1)
    else:
        raise ValueError(f"unknown budget period {name!r}; use one of {', '.join(BUDGET_PERIODS)}")
    return CalendarPeriod(
        name,
        _dt.datetime.combine(first, _dt.time(), tzinfo=zone),
        _dt.datetime.combine(after, _dt.time(), tzinfo=zone),
    )
