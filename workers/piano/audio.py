"""Hear a rollout: the keys a specialist pressed, played through RoboPianist's synthesizer to a WAV.

A key press becomes a MIDI note-on at the control step where the key goes down and a note-off
where it comes up (as RoboPianist's own ``MidiModule`` does, velocity 127); the sustain pedal,
when given, becomes control changes. The WAV lasts ``n_steps * control_timestep`` seconds plus
the synthesizer's one-second release tail (:data:`TAIL_S`), mono 16-bit at 44.1 kHz.
"""

from __future__ import annotations

import wave
from pathlib import Path

import numpy as np
from configs.files import atomic_write

# RoboPianist's synthesizer appends one second after the last event so that notes ring out.
TAIL_S = 1.0
# RoboPianist's MidiModule presses every key at full velocity (it does not model key speed).
VELOCITY = 127
LOWEST_MIDI_PITCH = 21  # key 0 (A0)


def rollout_events(pressed: np.ndarray, control_timestep: float, sustain: np.ndarray | None = None) -> list:
    """MIDI messages (robopianist ``NoteOn``/``NoteOff``/``SustainOn``/``SustainOff``, absolute
    times in seconds) for a ``bool[T, 88]`` pressed-key array; every key still down and the
    pedal are released at ``T * control_timestep``."""
    from robopianist.music import midi_message as mm

    pressed = np.asarray(pressed, dtype=bool)
    if pressed.ndim != 2 or pressed.shape[1] != 88:
        raise ValueError(f"rollout_events: pressed must be bool[T, 88], got shape {pressed.shape}")
    n_steps = pressed.shape[0]
    padded = np.zeros((n_steps + 2, 88), dtype=bool)
    padded[1:-1] = pressed
    change = padded[1:].astype(np.int8) - padded[:-1].astype(np.int8)  # row t: step t vs t-1
    events = []
    for t, key in zip(*np.nonzero(change)):
        time = float(t * control_timestep)
        note = int(key) + LOWEST_MIDI_PITCH
        events.append(mm.NoteOn(note, VELOCITY, time) if change[t, key] > 0 else mm.NoteOff(note, time))
    if sustain is not None:
        pedal = np.zeros(n_steps + 2, dtype=np.int8)
        pedal[1:-1] = np.asarray(sustain, dtype=bool)
        for t in np.flatnonzero(np.diff(pedal)):
            time = float(t * control_timestep)
            events.append(mm.SustainOn(time) if pedal[t + 1] else mm.SustainOff(time))
    # Stable sort by time, releases first, so a key pressed again in the next step sounds again.
    order = {mm.NoteOff: 0, mm.SustainOff: 1, mm.SustainOn: 2, mm.NoteOn: 3}
    events.sort(key=lambda e: (e.time, order[type(e)]))
    return events


def synthesize(pressed: np.ndarray, control_timestep: float, sustain: np.ndarray | None = None,
               soundfont: str | Path | None = None, sample_rate: int | None = None) -> np.ndarray:
    """Int16 mono waveform of a rollout, ``round((T * control_timestep + TAIL_S) * sample_rate)``
    samples long; all zeros when nothing was pressed (RoboPianist's synthesizer cannot render
    silence: it normalises by the peak)."""
    import robopianist
    from robopianist.music.constants import SAMPLING_RATE
    from robopianist.music.synthesizer import Synthesizer

    sample_rate = sample_rate or SAMPLING_RATE
    n_samples = int(round((len(pressed) * control_timestep + TAIL_S) * sample_rate))
    events = rollout_events(pressed, control_timestep, sustain)
    if not any(type(e).__name__ == "NoteOn" for e in events):
        return np.zeros(n_samples, dtype=np.int16)
    soundfont = Path(soundfont) if soundfont else robopianist.SF2_PATH
    if not soundfont.exists():
        raise FileNotFoundError(f"soundfont {soundfont} does not exist (set dashboard.soundfont)")
    synth = Synthesizer(soundfont_path=soundfont, sample_rate=sample_rate)
    try:
        waveform = synth.get_samples(events)
    finally:
        synth.stop()
    # The synthesizer's length follows the last event; pad or cut to the rollout's exact length.
    out = np.zeros(n_samples, dtype=np.int16)
    out[: min(n_samples, len(waveform))] = waveform[:n_samples]
    return out


def write_wav(path: str | Path, waveform: np.ndarray, sample_rate: int | None = None) -> Path:
    """Write an int16 mono waveform to ``path`` atomically; returns the path."""
    from robopianist.music.constants import SAMPLING_RATE

    path = Path(path)
    with atomic_write(path, "wb") as f, wave.open(f, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sample_rate or SAMPLING_RATE)
        w.writeframes(np.asarray(waveform, dtype="<i2").tobytes())
    return path


def render_rollout_wav(path: str | Path, pressed: np.ndarray, control_timestep: float,
                       sustain: np.ndarray | None = None, soundfont: str | Path | None = None) -> Path:
    """Synthesize a rollout's pressed keys and write them to ``path`` as a WAV file."""
    return write_wav(path, synthesize(pressed, control_timestep, sustain, soundfont))
