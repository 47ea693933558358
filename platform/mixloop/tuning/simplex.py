"""Mixture weights on the simplex: uniform draws mapped to weights with a floor per corpus (uniform on
the simplex through exponential spacings), the way back, and weights rounded as YAML shows them."""

from __future__ import annotations

import math


def simplex_weights(uniforms: dict[str, float], min_share: float) -> dict[str, float]:
    """Uniform draws mapped to weights that sum to 1, each at least `min_share`."""
    spacings = {c: -math.log(max(1.0 - u, 1e-12)) + 1e-12 for c, u in uniforms.items()}
    total = sum(spacings.values())
    free = 1.0 - min_share * len(spacings)
    return rounded_weights({c: min_share + free * s / total for c, s in spacings.items()})


def simplex_draws(weights: dict[str, float], min_share: float) -> dict[str, float] | None:
    """The uniform draws that `simplex_weights` maps to these weights (spacings scaled to mean 1), or
    None when a weight is below `min_share`."""
    if any(w < min_share - 1e-9 for w in weights.values()):
        return None
    free = 1.0 - min_share * len(weights)
    return {c: 1.0 - math.exp(-len(weights) * max(w - min_share, 0.0) / free) for c, w in weights.items()}


def rounded_weights(weights: dict[str, float]) -> dict[str, float]:
    """Three decimals that still sum to 1 (the largest weight absorbs the rounding)."""
    rounded = {c: round(w, 3) for c, w in weights.items()}
    largest = max(rounded, key=lambda corpus: rounded[corpus])
    rounded[largest] = round(1.0 - sum(w for c, w in rounded.items() if c != largest), 3)
    return rounded
