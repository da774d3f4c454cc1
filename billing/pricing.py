"""Price table (config/pricing.yaml) and the rating of one usage record.

Rules (documented here because bills depend on them):
  * All arithmetic is Decimal; YAML prices should be quoted strings (an unquoted YAML
    float is read through its shortest repr, e.g. 0.02 -> Decimal("0.02")).
  * Cost of a record = sum of its components (per_1k_input_tokens x input_tokens/1000,
    per_1k_output_tokens x output_tokens/1000, per_1k_characters x characters/1000,
    per_image x images, per_page x pages, per_request), rounded to 6 decimal places ROUND_HALF_UP.
    Bills and reports round totals (sums of the 6-decimal record costs) to 0.01
    ROUND_HALF_UP; see :data:`BILL_QUANTUM`.
  * The price in force is the model's entry with the latest ``effective_from`` <= the
    record's ``ts`` (both UTC; a bare date means 00:00 UTC). A model without an entry
    falls back to the ``"*"`` model; none at all -> price_id None, cost "0.000000".
  * A failed request (status != "ok") costs 0 unless ``charge_failed_requests: true``
    (top level, or per entry).
"""

from __future__ import annotations

import bisect
import dataclasses
import datetime as _dt
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from typing import Any

import yaml

from exporters.ledger.schema import normalize_ts
from exporters.usage_record import UsageRecord

__all__ = ["BILL_QUANTUM", "COST_QUANTUM", "Price", "PriceBook", "round_bill"]

COST_QUANTUM = Decimal("0.000001")
BILL_QUANTUM = Decimal("0.01")
UNITS: dict[str, tuple[str, int]] = {
    # rate key -> (usage record field, units per price)
    "per_1k_input_tokens": ("input_tokens", 1000),
    "per_1k_output_tokens": ("output_tokens", 1000),
    "per_1k_characters": ("characters", 1000),
    "per_image": ("images", 1),
    "per_page": ("pages", 1),
}
_ENTRY_KEYS = {"price_id", "effective_from", "currency", "charge_failed_requests",
               "per_request", *UNITS}
_TOP_KEYS = {"currency", "charge_failed_requests", "models"}


def round_bill(amount: Decimal) -> Decimal:
    """Round a bill total to 0.01, ROUND_HALF_UP."""
    return amount.quantize(BILL_QUANTUM, rounding=ROUND_HALF_UP)


@dataclasses.dataclass(frozen=True)
class Price:
    """One price entry of one model, in force from ``effective_from`` (canonical UTC text)."""

    price_id: str
    model: str
    effective_from: str
    currency: str
    rates: dict[str, Decimal]
    per_request: Decimal
    charge_failed: bool

    def cost(self, record: UsageRecord) -> Decimal:
        if record.status != "ok" and not self.charge_failed:
            return Decimal(0).quantize(COST_QUANTUM)
        total = self.per_request
        for key, rate in self.rates.items():
            field, per = UNITS[key]
            total += rate * Decimal(int(getattr(record, field) or 0)) / per
        return total.quantize(COST_QUANTUM, rounding=ROUND_HALF_UP)


class PriceBook:
    """All price entries, looked up by model and timestamp."""

    def __init__(self, prices: list[Price], currency: str = "CNY") -> None:
        self.currency = currency
        self._by_model: dict[str, list[Price]] = {}
        for p in sorted(prices, key=lambda p: (p.model, p.effective_from)):
            self._by_model.setdefault(p.model, []).append(p)
        self._starts = {m: [p.effective_from for p in ps] for m, ps in self._by_model.items()}
        ids = [p.price_id for p in prices]
        dup = {i for i in ids if ids.count(i) > 1}
        if dup:
            raise ValueError(f"duplicate price_id(s) in price table: {sorted(dup)}")

    @classmethod
    def load(cls, path: str) -> PriceBook:
        """Read and validate a pricing YAML file. Raises ValueError / OSError."""
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
        try:
            return cls.from_dict(data)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from exc

    @classmethod
    def from_dict(cls, data: Any) -> PriceBook:
        if not isinstance(data, dict) or not isinstance(data.get("models"), dict):
            raise ValueError("price table needs a 'models' mapping")
        unknown = set(data) - _TOP_KEYS
        if unknown:
            raise ValueError(f"unknown top-level key(s) {sorted(unknown)}")
        currency = str(data.get("currency", "CNY"))
        charge_failed = bool(data.get("charge_failed_requests", False))
        prices = []
        for model, entries in data["models"].items():
            if not isinstance(entries, list) or not entries:
                raise ValueError(f"model {model!r}: expected a list of price entries")
            for entry in entries:
                prices.append(_parse_entry(str(model), entry, currency, charge_failed))
        return cls(prices, currency)

    def price_for(self, model: str, ts: str) -> Price | None:
        """The entry in force for ``model`` at ``ts`` (ISO-8601), or None."""
        when = normalize_ts(ts)
        for key in (model, "*"):
            starts = self._starts.get(key)
            if starts:
                i = bisect.bisect_right(starts, when)
                return self._by_model[key][i - 1] if i else None
        return None

    def price(self, record: UsageRecord) -> tuple[str | None, str]:
        """(price_id, cost as a 6-decimal string) for ``record`` at its own timestamp."""
        entry = self.price_for(record.model, record.ts)
        if entry is None:
            return None, str(Decimal(0).quantize(COST_QUANTUM))
        return entry.price_id, str(entry.cost(record))


def _decimal(value: Any, where: str) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError(f"{where}: price must be a decimal string, got {value!r}")
    try:
        d = Decimal(str(value))
    except InvalidOperation as exc:
        raise ValueError(f"{where}: not a decimal: {value!r}") from exc
    if not d.is_finite() or d < 0:
        raise ValueError(f"{where}: price must be finite and >= 0, got {value!r}")
    return d


def _parse_entry(model: str, entry: Any, currency: str, charge_failed: bool) -> Price:
    if not isinstance(entry, dict):
        raise ValueError(f"model {model!r}: price entry must be a mapping")
    unknown = set(entry) - _ENTRY_KEYS
    if unknown:
        raise ValueError(f"model {model!r}: unknown key(s) {sorted(unknown)}; "
                         f"allowed: {sorted(_ENTRY_KEYS)}")
    for required in ("price_id", "effective_from"):
        if required not in entry:
            raise ValueError(f"model {model!r}: price entry without {required!r}")
    start = entry["effective_from"]
    if isinstance(start, _dt.date) and not isinstance(start, _dt.datetime):
        start = _dt.datetime(start.year, start.month, start.day)
    try:
        start_text = normalize_ts(start if isinstance(start, _dt.datetime) else str(start))
    except ValueError as exc:
        raise ValueError(f"model {model!r}: bad effective_from {entry['effective_from']!r}"
                         ) from exc
    pid = str(entry["price_id"])
    return Price(
        price_id=pid,
        model=model,
        effective_from=start_text,
        currency=str(entry.get("currency", currency)),
        rates={k: _decimal(entry[k], f"{pid}.{k}") for k in UNITS if k in entry},
        per_request=_decimal(entry.get("per_request", "0"), f"{pid}.per_request"),
        charge_failed=bool(entry.get("charge_failed_requests", charge_failed)),
    )
