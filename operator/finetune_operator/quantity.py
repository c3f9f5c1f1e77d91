"""Kubernetes quantities: just enough arithmetic to size quotas (multiply by a pod count)."""

from __future__ import annotations

import re
from decimal import Decimal

_QUANTITY = re.compile(r"^(?P<number>([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(?P<suffix>([KMGTPE]i)|[numkMGTPE]|([eE][+-]?[0-9.]+))?$")


def split(quantity: str | int) -> tuple[Decimal, str]:
    match = _QUANTITY.match(str(quantity))
    if not match:
        raise ValueError(f"not a Kubernetes quantity: {quantity!r}")
    return Decimal(match["number"]), match["suffix"] or ""


_SCALE = {"": 1, "n": Decimal("1e-9"), "u": Decimal("1e-6"), "m": Decimal("1e-3"), "k": Decimal(10) ** 3,
          "M": Decimal(10) ** 6, "G": Decimal(10) ** 9, "T": Decimal(10) ** 12, "P": Decimal(10) ** 15,
          "E": Decimal(10) ** 18, "Ki": Decimal(2) ** 10, "Mi": Decimal(2) ** 20, "Gi": Decimal(2) ** 30,
          "Ti": Decimal(2) ** 40, "Pi": Decimal(2) ** 50, "Ei": Decimal(2) ** 60}


def value(quantity: str | int) -> Decimal:
    """The quantity in base units (cores, bytes): `value("500m") == Decimal("0.5")`, `value("1Ki") == 1024`."""
    number, suffix = split(quantity)
    if suffix[:1] in ("e", "E"):
        return number * Decimal(10) ** Decimal(suffix[1:])
    return number * _SCALE[suffix]


def multiply(quantity: str | int, factor: int) -> str:
    """`multiply("64Gi", 2) == "128Gi"`, `multiply("500m", 3) == "1500m"`, keeping the suffix."""
    number, suffix = split(quantity)
    product = number * factor
    text = format(product.normalize(), "f") if product != product.to_integral() else str(int(product))
    return f"{text}{suffix}"
