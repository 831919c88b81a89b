"""Short songs and drivers for the piano environment tests (no pytest fixtures here)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import robopianist
from note_seq import sequences_lib
from note_seq.protobuf import music_pb2
from robopianist.music.midi_file import MidiFile

import configs

TWINKLE = Path(robopianist.__file__).parent / "music" / "data" / "rousseau" / "twinkle-twinkle-trimmed.mid"

# (start s, end s, MIDI pitches): single notes, a rest, a triad, and a 12-note cluster
# (more keys than ten fingers), with the pedal down over the second half.
_PHRASES = [
    (0.0, 0.4, [60]),
    (0.4, 0.8, [64]),
    (0.8, 1.2, [67]),
    # 1.2-1.6: rest
    (1.6, 2.2, [48, 52, 55]),
    (2.2, 2.8, list(range(60, 72))),
    (2.8, 3.2, [72]),
]
_SUSTAIN = [(1.6, 127), (2.8, 0)]


def chord_song(stretch: float = 1.25) -> MidiFile:
    """A 4 s song with rests, single notes, a triad, a 12-note cluster and the pedal."""
    seq = music_pb2.NoteSequence()
    seq.ticks_per_quarter = 220
    seq.tempos.add(qpm=120)
    for start, end, pitches in _PHRASES:
        for pitch in pitches:
            seq.notes.add(pitch=pitch, velocity=80, start_time=start, end_time=end)
    for time, value in _SUSTAIN:
        seq.control_changes.add(time=time, control_number=64, control_value=value)
    seq.total_time = max(n.end_time for n in seq.notes)
    return MidiFile(seq=seq).stretch(stretch)


def twinkle(seconds: float = 3.0, stretch: float = 1.25) -> MidiFile:
    """The first ``seconds`` of music (after stretching) of RoboPianist's Twinkle Twinkle."""
    midi = MidiFile.from_file(TWINKLE).stretch(stretch)
    first = min(note.start_time for note in midi.seq.notes)
    return MidiFile(seq=sequences_lib.extract_subsequence(midi.seq, first, first + seconds))


def env_config(*overrides: str) -> configs.EnvConfig:
    return configs.load(profile="local", overrides=list(overrides)).env


class KeyPresser:
    """Pushes chosen piano keys down with an external force during the next step.

    Lets a test play "some right, some wrong" keys without a trained policy.
    """

    def __init__(self, environment) -> None:
        self._environment = environment
        task = environment.task
        self._body_ids = np.asarray(environment.physics.bind(task.piano.keys).element_id)

    def press(self, keys) -> None:
        xfrc = self._environment.physics.data.xfrc_applied
        xfrc[:] = 0.0
        xfrc[self._body_ids[np.asarray(keys, dtype=np.int64)], 2] = -10.0  # N, enough for a full press


def oracle_ish_keys(obs_goal_now: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Most keys that should sound at the next step, sometimes plus one wrong key."""
    right = np.flatnonzero(obs_goal_now > 0.5)
    keys = right[rng.random(right.size) < 0.7]
    if rng.random() < 0.3:
        keys = np.append(keys, rng.integers(0, 88))
    return keys


# A 47-byte type-0 MIDI: tempo, program, one note-on, then one delta of 268,435,455 ticks (the
# largest a MIDI variable-length number holds) before its note-off. Expanding it per tick costs
# minutes and gigabytes; it must be refused from its raw messages.
CRAFTED_MIDI = (b"MThd\x00\x00\x00\x06\x00\x00\x00\x01\x00\x60"
                b"MTrk\x00\x00\x00\x19"
                b"\x00\xff\x51\x03\x07\xa1\x20"  # tempo 120 bpm
                b"\x00\xc0\x00"                  # program 0
                b"\x00\x90\x3c\x40"              # note on C4
                b"\xff\xff\xff\x7f\x80\x3c\x40"  # 268,435,455 ticks later: note off
                b"\x00\xff\x2f\x00")             # end of track


def write_crafted_midi(path: Path) -> Path:
    path.write_bytes(CRAFTED_MIDI)
    return path


def random_song(seed: int, seconds: float = 3.0, stretch: float = 1.25) -> MidiFile:
    """A generated song: random one- to four-note chords of random lengths, rests, pedal changes."""
    rng = np.random.default_rng(seed)
    seq = music_pb2.NoteSequence()
    seq.ticks_per_quarter = 220
    seq.tempos.add(qpm=120)
    time = 0.0
    while time < seconds:
        length = float(rng.uniform(0.1, 0.5))
        if rng.random() < 0.8:
            for pitch in rng.choice(np.arange(36, 96), size=rng.integers(1, 5), replace=False):
                seq.notes.add(pitch=int(pitch), velocity=80, start_time=time, end_time=time + length)
        if rng.random() < 0.3:
            seq.control_changes.add(time=time, control_number=64, control_value=int(rng.choice([0, 127])))
        time += length
    seq.total_time = max(n.end_time for n in seq.notes)
    return MidiFile(seq=seq).stretch(stretch)


def write_long_piece(path: Path, minutes: float = 14.0, ticks_per_beat: int = 10_080, seed: int = 0) -> Path:
    """A valid string-quartet-like piece as notation programs write it: four tracks, fine resolution.

    Track 0 holds the tempo map (a slow introduction at 60 bpm, then 96 bpm, ritardando at the
    end); each voice plays notes of a quarter to a half beat, with the pedal every bar on the
    first. At 10,080 ticks per beat its 14 minutes are over 12 million ticks.
    """
    import mido

    rng = np.random.default_rng(seed)
    beats = int(minutes * 90)  # about 90 beats a minute on average
    mid = mido.MidiFile(type=1, ticks_per_beat=ticks_per_beat)
    tempo = mido.MidiTrack([mido.MetaMessage("set_tempo", tempo=1_000_000, time=0),
                            mido.MetaMessage("set_tempo", tempo=625_000, time=16 * ticks_per_beat),
                            mido.MetaMessage("set_tempo", tempo=1_200_000, time=(beats - 24) * ticks_per_beat)])
    mid.tracks.append(tempo)
    for voice, (low, high) in enumerate([(67, 96), (55, 84), (48, 72), (36, 60)]):
        track, tick, last = mido.MidiTrack(), 0, 0
        track.append(mido.Message("program_change", channel=voice, program=40 + voice // 2, time=0))
        while tick < beats * ticks_per_beat:
            length = int(rng.choice([0.25, 0.5]) * ticks_per_beat)
            note = int(rng.integers(low, high))
            if voice == 0 and tick % (4 * ticks_per_beat) == 0:
                track.append(mido.Message("control_change", channel=voice, control=64, value=127, time=tick - last))
                last = tick
            track.append(mido.Message("note_on", channel=voice, note=note, velocity=70, time=tick - last))
            track.append(mido.Message("note_off", channel=voice, note=note, velocity=0, time=length))
            tick, last = tick + length, tick + length
        mid.tracks.append(track)
    mid.save(str(path))
    return path


def crafted_midi(path: Path, n: int, event: bytes) -> Path:
    """A one-track file of one note then ``event`` (delta time and message bytes) ``n`` times, written as bytes."""
    body = b"\x00\xc0\x00" + NOTE_EVENT + event * n + b"\x00\xff\x2f\x00"
    path.write_bytes(b"MThd\x00\x00\x00\x06\x00\x00\x00\x01\x01\xe0"  # type 0, one track, 480 ticks per beat
                     + b"MTrk" + len(body).to_bytes(4, "big") + body)
    return path


NOTE_EVENT = b"\x00\x90\x3c\x40\x01\x80\x3c\x40"  # a note of one tick: note on, note off a tick later
PEDAL_EVENT = b"\x00\xb0\x40\x7f"  # sustain pedal down, again and again
