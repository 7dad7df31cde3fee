"""Means of per-example scores, overall and per category (question type, domain, ...)."""
from __future__ import annotations

import collections
from typing import Iterable, Mapping


def breakdown(scores: Iterable[tuple[float, Mapping[str, object]]]) -> dict:
    """`scores`: (score in [0, 1], {category name: value}) per example -> {"overall": percent,
    "count": n, "by_<name>": {value: {"score": percent, "count": n}}}."""
    total, count = 0.0, 0
    groups: dict[str, dict[str, list[float]]] = collections.defaultdict(lambda: collections.defaultdict(list))
    for score, categories in scores:
        total, count = total + score, count + 1
        for name, value in categories.items():
            if value is not None:
                groups[name][str(value)].append(score)
    result = {"overall": 100 * total / count if count else 0.0, "count": count}
    for name, by_value in groups.items():
        result[f"by_{name}"] = {v: {"score": 100 * sum(s) / len(s), "count": len(s)} for v, s in sorted(by_value.items())}
    return result
