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


def multiply(quantity: str | int, factor: int) -> str:
    """`multiply("64Gi", 2) == "128Gi"`, `multiply("500m", 3) == "1500m"`, keeping the suffix."""
    number, suffix = split(quantity)
    product = number * factor
    text = format(product.normalize(), "f") if product != product.to_integral() else str(int(product))
    return f"{text}{suffix}"
