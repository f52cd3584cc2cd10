"""Statistics of the reports: means over runs with 95% confidence intervals."""

from __future__ import annotations

import numpy as np

from moraljax import validation

Z_95 = 1.96


def mean_and_ci95(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean over runs and the half-width of its 95% confidence interval.

        mean = sum_r x_r / runs,   ci = 1.96 * sd(x, ddof=1) / sqrt(runs)

    as in the paper's plots and tables (SPEC.md section 8); ci = 0 where only
    one run has a value. NaN entries (a run without that episode) are left
    out of both, so `runs` counts those present.

    Args:
        values: float [runs, ...].

    Returns:
        (mean, ci), each float [...]; NaN where no run has a value.

    Raises:
        ValueError: for values without a run.
    """
    values = np.asarray(values, dtype=np.float64)
    if values.ndim < 1 or values.shape[0] == 0:
        validation.fail("values.shape", values.shape, "at least one run on axis 0")
    present = ~np.isnan(values)
    runs = present.sum(axis=0)
    total = np.where(present, values, 0.0).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(runs > 0, total / np.maximum(runs, 1), np.nan)
        squares = np.where(present, (values - mean) ** 2, 0.0).sum(axis=0)
        sd = np.sqrt(squares / np.maximum(runs - 1, 1))
        ci = np.where(runs > 1, Z_95 * sd / np.sqrt(np.maximum(runs, 1)),
                      np.where(runs == 1, 0.0, np.nan))
    return mean, ci
