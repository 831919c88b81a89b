"""Hear a rollout: the synthesis lives in :mod:`workers.piano.audio` (videos need it on worker
nodes too); the dashboard imports it from here."""

from workers.piano.audio import (LOWEST_MIDI_PITCH, TAIL_S, VELOCITY, render_rollout_wav, rollout_events,  # noqa: F401
                                 synthesize, write_wav)
