"""Benchmarks behind `moeforge bench`; each times its baseline in the same run and reports the ratio."""

import statistics


def spread(values: list[float]) -> dict[str, float]:
    """Median, min and max of a figure over repeats (runs, seeds)."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}
