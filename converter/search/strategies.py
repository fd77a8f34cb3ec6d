"""Fallback strategies: how many of the ranked (worst-first) layers to keep in float.

A strategy proposes ``current`` (keep the ``current`` worst layers in float), is told whether that
met the target with ``step(passed)``, and says when it is done; ``result`` is then the smallest count
found to pass. Both start knowing that 0 failed (everything quantized was evaluated first) and assume
``n`` passes (nothing quantized is the float model).

``Bisect`` halves the interval between the largest failing and the smallest passing count:
``ceil(log2 n)`` evaluations at most. ``Gallop`` (the default) tries 1, 2, 4, 8... layers first and
bisects once one passes: when a good ranking puts the few culprits first, it stops after about
``2 log2 k`` evaluations for ``k`` layers (1 evaluation when one layer carries the error), and never
needs more than ``2 ceil(log2 n) + 1``. ``Sequential`` (AMCT) adds one layer at a time, worst first.
"""

from __future__ import annotations


class Bisect:
    name = "bisect"

    def __init__(self, n: int) -> None:
        self.lo, self.hi = 0, n  # lo fails, hi passes

    @property
    def done(self) -> bool:
        return self.hi - self.lo <= 1

    @property
    def current(self) -> int:
        return (self.lo + self.hi) // 2

    def step(self, passed: bool) -> bool:
        if passed:
            self.hi = self.current
        else:
            self.lo = self.current
        return self.done

    @property
    def result(self) -> int:
        return self.hi


class Gallop(Bisect):
    name = "gallop"

    def __init__(self, n: int) -> None:
        super().__init__(n)
        self.galloping = n > 1
        self.probe = 1

    @property
    def current(self) -> int:
        return min(self.probe, self.hi - 1) if self.galloping else (self.lo + self.hi) // 2

    def step(self, passed: bool) -> bool:
        if not self.galloping:
            return super().step(passed)
        k = self.current
        if passed:
            self.hi, self.galloping = k, False
        else:
            self.lo = k
            self.probe = 2 * k
            if self.probe >= self.hi:
                self.galloping = False
        return self.done


class Sequential:
    name = "sequential"

    def __init__(self, n: int) -> None:
        self.n = n
        self.k = 1
        self.passed_at: int | None = None

    @property
    def done(self) -> bool:
        return self.passed_at is not None or self.k > self.n or self.n == 0

    @property
    def current(self) -> int:
        return self.k

    def step(self, passed: bool) -> bool:
        if passed:
            self.passed_at = self.k
        else:
            self.k += 1
        return self.done

    @property
    def result(self) -> int:
        return self.passed_at if self.passed_at is not None else self.n


STRATEGIES = {"gallop": Gallop, "bisect": Bisect, "sequential": Sequential}
