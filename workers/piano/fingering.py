"""OT fingering: let the robot find its own fingering (RP1M eq. 1-2).

RoboPianist rewards fingertips for being close to the keys a *human* annotated with a
finger. RP1M drops the annotation: at every control step the keys that should sound are
matched to distinct fingertips by optimal transport (here an exact assignment with
``scipy.optimize.linear_sum_assignment``), and the reward shapes the matched distance.

Fingers are numbered as in RoboPianist's fingering labels: 0-4 right hand thumb..little,
5-9 left hand thumb..little.

The choice of d_OT. RP1M writes the transport problem as
``min_W sum_ij W_ij * c_ij`` (keys i, fingers j, each key to one finger, each finger at most
one key) and sets d_OT to the optimal value: the *total* fingertip-to-key distance of the
matching, ``reduction="sum"`` (the default, ``env.reward.ot_reduction``). With one key this
is RoboPianist's fingering distance; with a chord every finger must be close for the
reward to saturate. ``reduction="mean"`` (distance per key) is offered for comparison: it
does not grow with the size of a chord.

r_OT = 1 for d_OT < threshold (0.01 m), else exp(c * (d_OT - threshold)^2): exactly
dm_control's ``rewards.tolerance(d, bounds=(0, threshold), margin=10 * threshold,
sigmoid="gaussian")`` as RoboPianist's fingering reward uses it (c is fixed by the reward
falling to 0.1 at ``threshold + margin``). With no key to press at a step the term is 0,
as RoboPianist's fingering reward is.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
from dm_control.utils import rewards
from scipy.optimize import linear_sum_assignment

from workers.piano.layout import FINGER_NAMES, N_FINGERS  # noqa: F401

Reduction = Literal["sum", "mean"]

LITTLE_FINGERS: tuple[int, ...] = (4, 9)

# RoboPianist's fingering reward: the Gaussian tolerance reaches 0.1 at 10 thresholds.
_MARGIN_PER_THRESHOLD = 10.0

# Where on a key a fingertip should land, as in RoboPianist's fingering reward: top surface
# (+half height in z), 35% of the half length towards the front of the key (+x).
KEY_SURFACE_OFFSET = np.array([0.35, 0.0, 0.5])


def assign_fingers(fingertips: np.ndarray, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Optimal assignment of keys to distinct fingertips.

    ``fingertips`` is (F, 3) and ``keys`` is (K, 3), positions in metres. Returns
    ``(finger_rows, key_rows, distances)``: row indices into ``fingertips`` and ``keys``
    and the Euclidean distance of each matched pair, ordered by key row. Every key gets a
    distinct finger when K <= F and the total distance is minimal; with more keys than
    fingers every finger gets one key and the matched subset of keys is the one with the
    smallest total distance.
    """
    fingertips = np.asarray(fingertips, dtype=np.float64).reshape(-1, 3)
    keys = np.asarray(keys, dtype=np.float64).reshape(-1, 3)
    if len(keys) == 0 or len(fingertips) == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, np.zeros(0)
    cost = np.sqrt(((keys[:, None, :] - fingertips[None, :, :]) ** 2).sum(-1))  # (K, F)
    key_rows, finger_rows = linear_sum_assignment(cost)
    return finger_rows, key_rows, cost[key_rows, finger_rows]


def ot_distance(distances: np.ndarray, reduction: Reduction = "sum") -> float:
    """d_OT from the matched distances: their total (RP1M eq. 2) or their mean."""
    if len(distances) == 0:
        return 0.0
    if reduction == "sum":
        return float(np.sum(distances))
    if reduction == "mean":
        return float(np.mean(distances))
    raise ValueError(f"unknown OT reduction '{reduction}' (expected 'sum' or 'mean')")


def ot_reward(d_ot: float, threshold: float) -> float:
    """r_OT: 1 below ``threshold``, then a Gaussian decay reaching 0.1 at 11 thresholds."""
    return float(
        rewards.tolerance(
            d_ot, bounds=(0.0, threshold), margin=_MARGIN_PER_THRESHOLD * threshold, sigmoid="gaussian"
        )
    )


class OTFingering:
    """The OT fingering of a RoboPianist piano task's current step, read through dm_control.

    Only fingers listed in ``fingers`` take part in the matching (the four-finger hands leave
    out 4 and 9). ``workers.piano.reward`` turns its d_OT into r_OT.
    """

    def __init__(self, piano, hands: Sequence, reduction: Reduction = "sum",
                 fingers: Sequence[int] = tuple(range(N_FINGERS))) -> None:
        if reduction not in ("sum", "mean"):
            raise ValueError(f"unknown OT reduction '{reduction}' (expected 'sum' or 'mean')")
        self._piano = piano
        self._hands = tuple(hands)  # right, left: fingers 0-4, 5-9
        self.reduction: Reduction = reduction
        self.fingers = np.asarray(sorted(fingers), dtype=np.int64)
        self._site_ids: np.ndarray | None = None

    def bind(self, physics) -> None:
        """Cache MuJoCo ids for a (re)compiled physics; call at every episode start."""
        sites = [site for hand in self._hands for site in hand.fingertip_sites]
        self._site_ids = np.asarray(physics.bind(sites).element_id)[self.fingers]
        key_geoms = [key.geom[0] for key in self._piano.keys]
        self._key_geom_ids = np.asarray(physics.bind(key_geoms).element_id)
        self._key_offsets = physics.model.geom_size[self._key_geom_ids] * KEY_SURFACE_OFFSET

    def fingertip_positions(self, physics) -> np.ndarray:
        """(n_fingers, 3) world positions of the participating fingertips."""
        return physics.data.site_xpos[self._site_ids]

    def key_positions(self, physics, keys: np.ndarray) -> np.ndarray:
        """(len(keys), 3) world positions where a fingertip should press each key."""
        ids = self._key_geom_ids[keys]
        return physics.data.geom_xpos[ids] + self._key_offsets[keys]

    def __call__(self, physics, keys: np.ndarray) -> tuple[list[tuple[int, int]], float]:
        """``ot_match`` of the keys ``keys`` (indices 0..87) in the physics' current state."""
        if self._site_ids is None:
            self.bind(physics)
        return ot_match(self.fingertip_positions(physics), self.key_positions(physics, keys), keys, self.fingers,
                        self.reduction)


def ot_match(fingertips: np.ndarray, key_points: np.ndarray, keys: np.ndarray, fingers: np.ndarray,
             reduction: Reduction = "sum") -> tuple[list[tuple[int, int]], float]:
    """((finger, key) pairs, d_OT) of one step.

    ``fingertips`` (len(fingers), 3) are the participating fingertips, numbered by ``fingers``;
    ``key_points`` (len(keys), 3) where each key in ``keys`` should be pressed. No key: ([], 0).
    """
    if len(keys) == 0:
        return [], 0.0
    rows, key_rows, distances = assign_fingers(fingertips, key_points)
    assignment = [(int(f), int(k)) for f, k in zip(fingers[rows], keys[key_rows])]
    return assignment, ot_distance(distances, reduction)
