"""The in-step guard: reject non-finite steps before the optimizer, score loss spikes.

The spike score is robust: (x - median) / scale over a rolling window of recent
healthy values, scale = max(1.4826 * MAD, rel_floor * |median|, abs_floor). The
floor keeps a very flat loss curve from turning noise into huge scores.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from statistics import median
from typing import Any

from trainguard.workers.contract import AnomalyKind

__all__ = ["SpikeScorer", "Guard", "GuardVerdict"]


@dataclass
class SpikeScorer:
    window: int = 50
    warmup: int = 10  # no score until this many healthy values were seen
    threshold: float = 6.0
    rel_floor: float = 0.02
    abs_floor: float = 1e-3
    values: deque = field(default_factory=deque)
    consecutive_spikes: int = 0

    def score(self, x: float) -> float:
        if len(self.values) < self.warmup:
            return 0.0
        vals = list(self.values)
        med = median(vals)
        mad = median(abs(v - med) for v in vals)
        scale = max(1.4826 * mad, self.rel_floor * abs(med), self.abs_floor)
        return (x - med) / scale

    def update(self, x: float) -> tuple[float, bool]:
        """Score `x`, then add it to the window unless it is a spike. A level shift that
        lasts half a window is accepted as the new normal instead of alarming forever."""
        s = self.score(x)
        spike = s > self.threshold
        self.consecutive_spikes = self.consecutive_spikes + 1 if spike else 0
        if not spike or self.consecutive_spikes > self.window // 2:
            self.values.append(x)
            while len(self.values) > self.window:
                self.values.popleft()
        return s, spike

    def state(self) -> dict[str, Any]:
        return {"values": list(self.values), "consecutive_spikes": self.consecutive_spikes}

    def load_state(self, st: dict[str, Any]) -> None:
        self.values = deque(float(v) for v in st.get("values", []))
        self.consecutive_spikes = int(st.get("consecutive_spikes", 0))


@dataclass(frozen=True)
class GuardVerdict:
    apply_update: bool
    anomaly: AnomalyKind | None
    spike_score: float


class Guard:
    """Decides, per step, whether the optimizer may run and which anomaly (if any) to count.

    Non-finite loss or gradient: skip the update (and zero the grads). A loss spike is
    counted but the update still runs: the supervisor decides what to roll back."""

    def __init__(self, *, window: int = 50, threshold: float = 6.0, grad_threshold: float = 12.0) -> None:
        self.loss = SpikeScorer(window=window, threshold=threshold)
        # grad norms are noisier than the loss: scored in log space with a higher bar
        # (floor 0.25 in log units x threshold 12: about a 20x jump over the median)
        self.grad = SpikeScorer(window=window, threshold=grad_threshold, rel_floor=0.0, abs_floor=0.25)

    def check(self, loss: float, grad_norm: float, any_rank_nonfinite: bool = False) -> GuardVerdict:
        if not math.isfinite(loss) or any_rank_nonfinite:
            return GuardVerdict(False, AnomalyKind.NONFINITE_LOSS, self.loss.score(loss) if math.isfinite(loss) else 0.0)
        if not math.isfinite(grad_norm):
            return GuardVerdict(False, AnomalyKind.NONFINITE_GRAD, self.loss.score(loss))
        score, loss_spike = self.loss.update(loss)
        _, grad_spike = self.grad.update(math.log(max(grad_norm, 1e-12)))
        if loss_spike:
            return GuardVerdict(True, AnomalyKind.LOSS_SPIKE, score)
        if grad_spike:
            return GuardVerdict(True, AnomalyKind.GRAD_SPIKE, score)
        return GuardVerdict(True, None, score)

    def state(self) -> dict[str, Any]:
        return {"loss": self.loss.state(), "grad": self.grad.state()}

    def load_state(self, st: dict[str, Any]) -> None:
        self.loss.load_state(st.get("loss", {}))
        self.grad.load_state(st.get("grad", {}))
