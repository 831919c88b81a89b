"""The one definition of the RP1M observation and action layout, and of the goal encoding.

Everything that reads or writes an observation (the environment, the replay buffer, the lake,
the imitation policies, the dashboard) imports these names; nothing else writes 979 or 1144.
Numpy (and the config models) only, so the lake and the dashboard can import it without MuJoCo.

Observation (1144 float32, RP1M order)::

    piano_goal     [0, 968)     11 lookahead steps x 88 keys, 1 = should sound (binary)
    sustain_goal   [968, 979)   11 steps, 1 = pedal down (binary)
    key_joints     [979, 1067)  88 key joint positions / their range (0 up .. 1 down)
    sustain_state  [1067, 1068) pedal position / its range
    fingertips     [1068, 1098) right hand thumb..little xyz, then left hand (world, m)
    hand_joints    [1098, 1144) 23 right hand joint positions, then 23 left hand

The first ``GOAL_BITS`` entries are exactly 0 or 1; :func:`pack_goal` stores them as
``GOAL_BYTES`` bytes (MSB first, ``numpy.packbits(bitorder='big')``) and :func:`unpack_goal`
gives them back.
"""

from __future__ import annotations

import numpy as np

from configs import LAYOUT_CONTROL_TIMESTEP, LAYOUT_LOOKAHEAD

N_KEYS = 88
LOOKAHEAD = LAYOUT_LOOKAHEAD  # goal steps beyond the current one (RP1M); env.n_steps_lookahead takes only this
GOAL_STEPS = LOOKAHEAD + 1
FPS = round(1 / LAYOUT_CONTROL_TIMESTEP)  # control steps per second; env.control_timestep takes only 0.05 s

OBS_SLICES: dict[str, slice] = {
    "piano_goal": slice(0, GOAL_STEPS * N_KEYS),
    "sustain_goal": slice(968, 979),
    "key_joints": slice(979, 1067),
    "sustain_state": slice(1067, 1068),
    "fingertips": slice(1068, 1098),
    "hand_joints": slice(1098, 1144),
}
PIANO_GOAL = OBS_SLICES["piano_goal"]
SUSTAIN_GOAL = OBS_SLICES["sustain_goal"]
KEY_JOINTS = OBS_SLICES["key_joints"]
SUSTAIN_STATE = OBS_SLICES["sustain_state"]
FINGERTIPS = OBS_SLICES["fingertips"]
HAND_JOINTS = OBS_SLICES["hand_joints"]

OBS_DIM = HAND_JOINTS.stop  # 1144
ACTION_DIM = 39  # 19 right hand (17 joints + forearm x, y), 19 left hand, sustain pedal
GOAL_BITS = SUSTAIN_GOAL.stop  # 979: the binary part of the observation
GOAL_BYTES = (GOAL_BITS + 7) // 8  # 123

# RoboPianist's fingering numbers: 0-4 right hand thumb..little, 5-9 left hand thumb..little.
FINGER_NAMES: tuple[str, ...] = tuple(
    f"{hand}_{finger}" for hand in ("right", "left") for finger in ("thumb", "index", "middle", "ring", "little")
)
N_FINGERS = len(FINGER_NAMES)

# Names of every observation and action entry (dataset exports, plots).
OBS_NAMES: tuple[str, ...] = (
    tuple(f"piano_goal.t{t}.key{k}" for t in range(GOAL_STEPS) for k in range(N_KEYS))
    + tuple(f"sustain_goal.t{t}" for t in range(GOAL_STEPS))
    + tuple(f"key_joint.{k}" for k in range(N_KEYS))
    + ("sustain_state",)
    + tuple(f"fingertip.{f}.{axis}" for f in FINGER_NAMES for axis in "xyz")
    + tuple(f"hand_joint.{hand}.{j}" for hand in ("right", "left") for j in range(23))
)
assert len(OBS_NAMES) == OBS_DIM

# RoboPianist's reduced action space, per hand: wrist, thumb and four fingers' actuators (A_ = the
# Shadow hand's actuator names), then the forearm's x/y slide; both hands, then the sustain pedal.
HAND_ACTUATORS: tuple[str, ...] = (
    "A_WRJ2", "A_WRJ1", "A_THJ4", "A_THJ3", "A_THJ2", "A_FFJ4", "A_FFJ3", "A_FFJ0", "A_MFJ4", "A_MFJ3", "A_MFJ0",
    "A_RFJ4", "A_RFJ3", "A_RFJ0", "A_LFJ4", "A_LFJ3", "A_LFJ0", "forearm_tx", "forearm_ty",
)
ACTION_NAMES: tuple[str, ...] = (
    tuple(f"{hand}_hand.{a}" for hand in ("right", "left") for a in HAND_ACTUATORS) + ("sustain",)
)
assert len(ACTION_NAMES) == ACTION_DIM


def pack_bits(values: np.ndarray) -> np.ndarray:
    """uint8 [..., ceil(n / 8)]: the 0/1 entries of ``values`` [..., n] packed MSB first."""
    return np.packbits(np.asarray(values) != 0, axis=-1, bitorder="big")


def unpack_bits(packed: np.ndarray, count: int, dtype=np.float32) -> np.ndarray:
    """[..., count] 0/1 values of ``dtype`` from :func:`pack_bits`'s bytes."""
    return np.unpackbits(np.asarray(packed, np.uint8), axis=-1, count=count, bitorder="big").astype(dtype, copy=False)


def pack_goal(obs: np.ndarray) -> np.ndarray:
    """uint8 [..., GOAL_BYTES]: the goal part ``obs[..., :GOAL_BITS]`` as bits."""
    return pack_bits(np.asarray(obs)[..., :GOAL_BITS])


def unpack_goal(packed: np.ndarray, dtype=np.float32) -> np.ndarray:
    """[..., GOAL_BITS] 0/1 goal values of ``dtype`` from :func:`pack_goal`'s bytes."""
    return unpack_bits(packed, GOAL_BITS, dtype)


# OT fingering of a step as the lake stores it: per finger (FINGER_NAMES order), the key index
# (0..87) the environment's OT matching gave it, NO_KEY for a finger with no key.
NO_KEY = -1


def fingering_row(assignment) -> np.ndarray:
    """int8 [N_FINGERS]: the (finger, key) pairs of ``info["ot_assignment"]`` as each finger's key."""
    row = np.full(N_FINGERS, NO_KEY, dtype=np.int8)
    for finger, key in assignment:
        row[finger] = key
    return row


def fingering_pairs(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(step, finger, key) index arrays of the matched pairs in :func:`fingering_row` rows [T, N_FINGERS]."""
    rows = np.asarray(rows)
    steps, fingers = np.nonzero(rows != NO_KEY)
    return steps, fingers, rows[steps, fingers].astype(np.int64)
