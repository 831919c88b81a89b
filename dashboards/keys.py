"""Names for the piano's 88 keys and the hands' 10 fingers, in RoboPianist's numbering."""

from robopianist.music import constants as _music

from workers.piano import layout as _layout

# Key 0 is A0, key 87 is C8 (RoboPianist's key numbers, the lake's `pressed`/`target` columns).
KEY_NAMES: tuple[str, ...] = tuple(_music.KEY_NUMBER_TO_NOTE_NAME[k] for k in range(_music.NUM_KEYS))

# RoboPianist's fingering numbers (workers.piano.layout), as a person reads them.
FINGER_NAMES: tuple[str, ...] = tuple(name.replace("_", " ") for name in _layout.FINGER_NAMES)
