"""Give back what is not needed: re-quantize float layers the target does not need in float.

The strategies find the *smallest prefix* of the ranking that meets the target; a prefix can hold
layers that only sat between two culprits in the ranking. Give-back tests the float set by group
testing: try re-quantizing a half of it at once (one evaluation); if the target still holds, that
whole half is quantized again; if not, split it and try each part, down to single layers. With
``c`` layers that really need float among ``m``, that costs about ``2 c log2(m / c)`` evaluations,
and nothing when the prefix was exact (each single layer is tried once at most).

Order (:func:`converter.search.fallback.give_back_order`): the layers that are cheapest to quantize back, i.e.
the least damage per unit of cost gained, are tried first, so the halves tried together are the likeliest to pass
and the expensive layers come back to INT8 before the cheap ones. The cost is what the search minimises: on target
ort-cpu the milliseconds ONNX Runtime CPU measurably spends more with the layer in float
(:func:`converter.search.cost.runtime_costs`; an early high-resolution Conv costs far more than its MACs say, a
LayerNorm or GELU block nothing), elsewhere MACs.
"""

from __future__ import annotations

from typing import Callable, Sequence, TypeVar

T = TypeVar("T")


def give_back(float_set: Sequence[T], passes: Callable[[list[T]], bool], max_tries: int | None = None) -> list[T]:
    """The float layers left after re-quantizing every group of ``float_set`` the target allows.

    ``float_set`` is in give-back order (first = cheapest to quantize back); ``passes(layers)`` evaluates
    the model with exactly ``layers`` in float. ``max_tries`` bounds the evaluations.
    """
    keep = list(float_set)
    tries = 0

    def attempt(part: list[T]) -> None:
        nonlocal keep, tries
        if not part or (max_tries is not None and tries >= max_tries):
            return
        rest = [x for x in keep if x not in part]
        if len(part) < len(keep):  # quantizing all of them is the model that already failed
            tries += 1
            if passes(rest):
                keep = rest
                return
        if len(part) == 1:
            return
        half = (len(part) + 1) // 2
        attempt(part[:half])
        attempt([x for x in part[half:] if x in keep])

    attempt(list(keep))
    return keep
