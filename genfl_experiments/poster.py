"""The poster's reference numbers: weighted client accuracy (%) at classifier round 10, mean ± std
over 5 runs, as (pre-trained, baseline). Keys are ``Distribution.name``.

The poster evaluated each client on data that overlapped 8/9 of its own training data, so these
numbers are not directly comparable with GenFL's disjoint held-out evaluation (see table.md).
"""

from __future__ import annotations

Stat = tuple[float, float]  # (mean, std) in percent

POSTER: dict[str, dict[str, tuple[Stat, Stat]]] = {
    "mnist": {
        "iid": ((93.92, 0.28), (87.08, 1.03)),
        "alpha-100": ((93.80, 0.33), (83.78, 5.32)),
        "alpha-10": ((93.85, 0.16), (81.70, 8.91)),
        "alpha-1": ((93.59, 0.26), (85.87, 2.87)),
        "alpha-0.1": ((88.24, 2.43), (41.35, 15.28)),
        "alpha-0.01": ((57.45, 6.67), (22.52, 5.24)),
    },
    "fmnist": {
        "iid": ((78.21, 0.24), (71.35, 1.02)),
        "alpha-100": ((78.32, 0.13), (70.26, 1.93)),
        "alpha-10": ((78.00, 0.21), (70.23, 2.55)),
        "alpha-1": ((77.70, 0.21), (69.48, 2.64)),
        "alpha-0.1": ((68.96, 3.42), (56.94, 4.32)),
        "alpha-0.01": ((48.85, 8.39), (30.90, 4.90)),
    },
}
POSTER_ROUND = 10
POSTER_RUNS = 5
