"""Names for the piano's 88 keys and the hands' 10 fingers, in RoboPianist's numbering."""

from robopianist.music import constants as _music

# Key 0 is A0, key 87 is C8 (RoboPianist's key numbers, the lake's `pressed`/`target` columns).
KEY_NAMES: tuple[str, ...] = tuple(_music.KEY_NUMBER_TO_NOTE_NAME[k] for k in range(_music.NUM_KEYS))

# RoboPianist's fingering numbers: 0-4 right hand thumb..little, 5-9 left hand thumb..little.
FINGER_NAMES: tuple[str, ...] = tuple(
    f"{hand} {finger}" for hand in ("right", "left") for finger in ("thumb", "index", "middle", "ring", "little")
)
