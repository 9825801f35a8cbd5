"""Reading the node's Prometheus histograms back for the bench: bucket snapshots, the
difference of two, quantiles by bucket bound, batch sizes per bucket."""

from __future__ import annotations

import math

import numpy as np

from rapido.metrics import Metrics


def ms_quantile(values_s: list[float], q: float) -> float | None:
    if not values_s:
        return None
    return round(1000.0 * float(np.quantile(values_s, q)), 2)


def per_bucket(cumulative: dict[float, float]) -> dict[str, int]:
    """Cumulative histogram buckets (le = 1, 2, ...) -> count per batch size."""
    out: dict[str, int] = {}
    prev = 0.0
    for le in sorted(cumulative):
        n = round(cumulative[le] - prev)
        prev = cumulative[le]
        if n:
            out["inf" if math.isinf(le) else str(int(le))] = n
    return out


def hist_snapshot(metrics: Metrics, name: str = "frame_processing_latency_seconds"
                   ) -> dict[float, float]:
    out: dict[float, float] = {}
    for family in metrics.registry.collect():
        if family.name != name:
            continue
        for sample in family.samples:
            if sample.name.endswith("_bucket"):
                le = float(sample.labels["le"])
                out[le] = out.get(le, 0.0) + sample.value
    return out


def hist_totals(metrics: Metrics, name: str) -> tuple[float, float]:
    total = count = 0.0
    for family in metrics.registry.collect():
        if family.name != name:
            continue
        for sample in family.samples:
            if sample.name.endswith("_sum"):
                total += sample.value
            elif sample.name.endswith("_count"):
                count += sample.value
    return total, count


def hist_delta(a: dict[float, float], b: dict[float, float]) -> dict[float, float]:
    return {k: b[k] - a.get(k, 0.0) for k in b}


def quantile(cumulative: dict[float, float], q: float) -> float:
    """Upper bound of the bucket holding quantile q (Prometheus-style, conservative)."""
    if not cumulative:
        return 0.0
    bounds = sorted(cumulative)
    total = cumulative[bounds[-1]]
    if total <= 0:
        return 0.0
    for le in bounds:
        if cumulative[le] >= q * total:
            return le if le != float("inf") else bounds[-2]
    return bounds[-2]
