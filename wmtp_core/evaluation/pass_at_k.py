"""The unbiased pass@k estimator of Chen et al. 2021 ("Evaluating Large Language Models Trained on Code").

From n samples of a problem of which c pass, pass@k = 1 - C(n-c, k) / C(n, k): the chance that at least one of k
samples drawn without replacement passes. Averaged over problems it is the benchmark's pass@k.
"""

from __future__ import annotations

import math
from collections.abc import Iterable


def pass_at_k(n: int, c: int, k: int) -> float:
    """pass@k for one problem with n samples of which c passed; needs n >= k."""
    if k < 1:
        raise ValueError(f"k must be at least 1, got k={k}")
    if not 0 <= c <= n:
        raise ValueError(f"the number of passing samples must be between 0 and n={n}, got c={c}")
    if n < k:
        raise ValueError(f"pass@{k} needs at least {k} samples per problem, got n={n}: sample more, or drop k={k}")
    if n - c < k:
        return 1.0  # every draw of k samples holds a passing one
    # C(n-c, k) / C(n, k) as a product of factors in [0, 1] (Chen et al.'s form): no huge binomials to divide.
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def mean_pass_at_k(counts: Iterable[tuple[int, int]], k: int) -> float:
    """The benchmark's pass@k: the mean of pass_at_k over problems given as (n, c) pairs."""
    values = [pass_at_k(n, c, k) for n, c in counts]
    if not values:
        raise ValueError(f"pass@{k} of no problems is undefined: score at least one problem")
    return sum(values) / len(values)
