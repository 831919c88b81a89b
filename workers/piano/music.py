"""Songs from MIDI files, and their cut into chunks: the units of work.

A :class:`Song` is the notes of a MIDI file (read with mido, notes paired and timed as
pretty_midi does), cleaned into a note list the RoboPianist piano can play; ``Song.to_midi_file()`` turns it into the RoboPianist
``MidiFile`` (a note_seq ``NoteSequence``) the environment consumes. For a clean file the
result plays exactly like ``MidiFile.from_file(path)``: same notes and sustain per control
step.

What loading does with messy files (each fix is listed in ``Song.problems``):

- several tracks / instruments: merged into one note list (one piano, two hands);
- tempo changes on tracks other than the first: applied to the whole song (pretty_midi would
  ignore them), so note times follow every tempo change;
- sustain pedal (CC64) of every non-drum channel: kept as the song's sustain; other controls
  are dropped;
- drum tracks (channel 10): dropped;
- notes outside the piano's 88 keys (MIDI 21..108): dropped and counted (not octave-folded:
  folding changes the music, and RoboPianist itself refuses such notes);
- overlapping notes of the same pitch: the earlier note is cut where the later begins; two
  notes with the same pitch and onset keep only the longer one;
- notes without duration (note-off at the note-on tick, or never released): dropped;
- nothing playable left, an empty file, a missing or unreadable file: :class:`SongError`;
- a file past the :class:`SongLimits` (bytes, events of every kind, notes, duration in
  seconds): :class:`SongError`, found by :func:`scan_midi`, which walks the file's bytes and
  builds nothing, before mido reads a message. Nothing is allocated per tick (pretty_midi
  would, and note_seq switches its tick guard off), so any tick resolution loads.

Chunks (``plan_chunks``): the song is stretched by ``env.stretch_factor``; with
``env.trim_silence`` the whole song's silence is trimmed as RoboPianist's
``MidiFile.trim_silence`` does (the first onset becomes time 0, the pedal state at that
moment is kept, pedal events after the last release are dropped), except that the song ends
at its last release rather than at the release of the last note in file order. Trimming
comes first, then the cut, as in RP1M; without ``trim_silence`` the leading silence stays
and the chunks that hold only silence are skipped. The stretched song is cut every
``env.chunk_steps`` control steps: chunk k covers control steps
[k * chunk_steps, (k + 1) * chunk_steps) and its ``MidiFile`` starts at time 0. A note that
sounds across a boundary is clipped into both chunks (held at the end of one, already down
at the start of the next); the pedal state at a boundary is carried into the next chunk.
Event times are placed so that chunk k, played on its own, gives steps
[k * chunk_steps, ...) of the whole song's note trajectory, with one exception: RoboPianist
hides a key re-struck while still sounding for one step (its release); at a chunk's first
step there is no earlier press to release, so the chunk shows the key from step 0. Chunks
without notes are skipped (``ChunkPlan.skipped``). A chunk ``MidiFile`` is already stretched
and trimmed, and ``n_steps`` long: play it as-is, without trimming it again.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import struct
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import mido
import numpy as np
from mido.messages.specs import SPEC_BY_STATUS
from note_seq import music_pb2
from robopianist.music import constants as consts
from robopianist.music.midi_file import MidiFile

LOWEST_KEY = consts.MIN_MIDI_PITCH_PIANO  # A0, MIDI 21
HIGHEST_KEY = consts.MAX_MIDI_PITCH_PIANO  # C8, MIDI 108
SUSTAIN_CC = consts.SUSTAIN_PEDAL_CC_NUMBER  # 64


class SongError(ValueError):
    """A MIDI file cannot become a song; the message names the file and the problem."""


@dataclass(frozen=True)
class SongLimits:
    """Bounds on what reading a MIDI file may cost (``manifest.*`` in the config).

    Each bounds memory or time: the file's bytes, its MIDI events of every kind (notes,
    pedal and other controllers, meta), its notes, and its length in seconds following the
    tempo map. The tick resolution is not bounded: no step of loading allocates per tick.
    """

    max_midi_bytes: int
    max_midi_events: int
    max_song_notes: int
    max_song_duration_s: float


@dataclass(frozen=True, eq=False)
class Song:
    """A cleaned note list read from one MIDI file; times in seconds as written in the file.

    Notes are sorted by onset; the sustain pedal is a time-sorted list of CC64 values.
    """

    path: Path
    content_hash: str  # sha256 of the file's bytes: the song's identity
    name: str
    pitch: np.ndarray  # int16 [n], MIDI pitch in 21..108
    velocity: np.ndarray  # int16 [n], 1..127
    start: np.ndarray  # float64 [n], s
    end: np.ndarray  # float64 [n], s, > start
    sustain_time: np.ndarray  # float64 [m], s
    sustain_value: np.ndarray  # int16 [m], CC64 value 0..127 (>= 64 is down)
    problems: list[str] = field(default_factory=list)  # non-fatal fixes made while loading

    @property
    def duration(self) -> float:
        """Seconds from the file's time 0 to the last release (unstretched)."""
        return float(self.end.max())

    @property
    def n_notes(self) -> int:
        return len(self.pitch)

    def to_midi_file(self) -> MidiFile:
        """The whole song as a RoboPianist ``MidiFile``, unstretched and untrimmed."""
        return MidiFile(seq=_note_sequence(self.pitch, self.velocity, self.start, self.end,
                                           self.sustain_time, self.sustain_value, self.duration))


def song_limits(manifest_cfg=None) -> SongLimits:
    """The limits of a :class:`configs.ManifestConfig` (``manifest.*``; default: ``configs/default.yaml``'s)."""
    if manifest_cfg is None:
        import configs  # only for the defaults

        manifest_cfg = configs.from_dict({}, source="configs/default.yaml").manifest
    return SongLimits(max_midi_bytes=manifest_cfg.max_midi_bytes, max_midi_events=manifest_cfg.max_midi_events,
                      max_song_notes=manifest_cfg.max_song_notes,
                      max_song_duration_s=manifest_cfg.max_song_duration_s)


def load_song(path: str | Path, name: str | None = None, limits: SongLimits | None = None) -> Song:
    """Read a MIDI file into a :class:`Song` (named ``name`` or the file's stem).

    Raises :class:`SongError` naming the file when it is missing, unreadable, past ``limits``
    (default: :func:`song_limits`), or has no playable notes. Fixes that still leave a
    playable song go to ``Song.problems``.
    """
    path = Path(path)
    limits = limits or song_limits()
    try:
        with path.open("rb") as f:
            size = os.fstat(f.fileno()).st_size
            # Not read(limit): that allocates the whole limit first. One byte more notices a file still growing.
            data = f.read(min(size, limits.max_midi_bytes) + 1) if size <= limits.max_midi_bytes else b""
    except FileNotFoundError:
        raise SongError(f"{path}: no such file") from None
    except (OSError, ValueError) as e:  # ValueError: a NUL in the path
        raise SongError(f"{path}: cannot read the file ({getattr(e, 'strerror', None) or e})") from None
    if max(size, len(data)) > limits.max_midi_bytes:
        raise SongError(f"{path}: {max(size, len(data)):,} bytes, over the limit of {limits.max_midi_bytes:,} "
                        "(manifest.max_midi_bytes)")
    if not data:
        raise SongError(f"{path}: empty file, no playable notes")
    scan = scan_midi(data, path, limits)
    try:
        midi = mido.MidiFile(file=io.BytesIO(data))
    except Exception as e:  # mido raises many types for damaged files
        raise SongError(f"{path}: not a readable MIDI file ({type(e).__name__}: {e})") from None

    problems = []
    if scan.tempo_tracks:
        problems.append(f"tempo changes on track {', '.join(map(str, scan.tempo_tracks))} applied to the whole song")
    notes, pedal, n_drums, n_unclosed = _notes_and_pedal(midi)
    if n_drums:
        problems.append(f"dropped {n_drums} drum-track notes")
    notes = np.array(notes, dtype=np.int64).reshape(-1, 4)
    pedal = np.array(pedal, dtype=np.int64).reshape(-1, 2)
    pitch, velocity = notes[:, 0].astype(np.int16), notes[:, 1].astype(np.int16)
    start, end = (ticks_to_seconds(notes[:, k], midi.ticks_per_beat, scan.tempos) for k in (2, 3))

    audible = end > start  # a tick can be shorter than a float's resolution
    n_silent = n_unclosed + int((~audible).sum())
    if n_silent:
        problems.append(f"dropped {n_silent} notes without duration (released at their onset or never released)")
    on_piano = (pitch >= LOWEST_KEY) & (pitch <= HIGHEST_KEY)
    if not on_piano[audible].all():
        off = pitch[audible & ~on_piano]
        problems.append(f"dropped {len(off)} notes outside the piano's 88 keys (MIDI {LOWEST_KEY}..{HIGHEST_KEY}; "
                        f"found pitches {int(off.min())}..{int(off.max())})")
    keep = audible & on_piano
    pitch, velocity, start, end = pitch[keep], velocity[keep], start[keep], end[keep]
    pitch, velocity, start, end, overlap_problems = _resolve_overlaps(pitch, velocity, start, end)
    problems += overlap_problems
    if len(pitch) == 0:
        detail = f" ({'; '.join(problems)})" if problems else ""
        raise SongError(f"{path}: no playable notes{detail}")

    order = np.lexsort((pitch, start))
    by_tick = np.argsort(pedal[:, 0], kind="stable")  # one pedal: merge the tracks' events in time
    return Song(path=path, content_hash=hashlib.sha256(data).hexdigest(), name=name or path.stem,
                pitch=pitch[order], velocity=velocity[order], start=start[order], end=end[order],
                sustain_time=ticks_to_seconds(pedal[by_tick, 0], midi.ticks_per_beat, scan.tempos),
                sustain_value=pedal[by_tick, 1].astype(np.int16), problems=problems)


@dataclass(frozen=True)
class MidiScan:
    """What a MIDI file holds, counted from its bytes without building a message."""

    ticks_per_beat: int  # negative: SMPTE time division, as mido reads it
    n_events: int
    n_notes: int  # note-on messages with a velocity
    last_tick: int  # the end of the longest track
    tempos: list[tuple[int, int]]  # (tick, microseconds per beat) of every track, stably sorted by tick
    tempo_tracks: list[int]  # tracks after the first that hold tempo changes

    @property
    def duration(self) -> float:
        """Seconds from time 0 to the end of the longest track, following the tempo map."""
        return float(ticks_to_seconds(np.array([self.last_tick]), self.ticks_per_beat, self.tempos)[0])


# Data bytes after a system common or real-time status byte (mido's table); sysex and meta carry a length.
_SYSTEM_DATA_BYTES = {status: spec["length"] - 1 for status, spec in SPEC_BY_STATUS.items() if 0xF0 < status < 0xFF}


def scan_midi(data: bytes, path: str | Path, limits: SongLimits) -> MidiScan:
    """Walk the file's chunks and events as mido will read them, counting, and stop at the first limit passed.

    Nothing is built per event, so a crafted file is refused after reading at most
    ``limits.max_midi_events`` events (the caller bounds ``data`` by ``limits.max_midi_bytes``).
    Raises :class:`SongError` naming the file and the limit (``manifest.*``), or what is
    malformed: a structure mido could misread at length (a track running past its chunk, a
    variable-length number over 4 bytes) is refused here.
    """
    def unreadable(why: str) -> SongError:
        return SongError(f"{path}: not a readable MIDI file ({why})")

    if len(data) < 14 or data[:4] != b"MThd" or int.from_bytes(data[4:8], "big") < 6:
        raise unreadable("no MThd header")
    _, n_tracks, division = struct.unpack(">hhh", data[14 - 6:14])  # signed, as mido reads them
    header_end = 8 + int.from_bytes(data[4:8], "big")
    max_events, max_notes = limits.max_midi_events, limits.max_song_notes
    n_events = n_notes = last_tick = 0
    tempos, tempo_tracks = [], []
    pos = header_end
    for track in range(max(n_tracks, 0)):
        if data[pos:pos + 4] != b"MTrk" or pos + 8 > len(data):
            raise unreadable(f"track {track}: no MTrk chunk at byte {pos}")
        i, end = pos + 8, pos + 8 + int.from_bytes(data[pos + 4:pos + 8], "big")
        if end > len(data):
            raise unreadable(f"track {track}: its chunk runs {end - len(data):,} bytes past the end of the file")
        tick, running, n_tempos = 0, None, len(tempos)
        try:
            while i < end:
                delta = data[i]  # delta time: a variable-length number of up to 4 bytes
                i += 1
                if delta & 0x80:
                    delta, i = _variable_int(data, i, delta & 0x7F, path, track)
                tick += delta
                status = data[i]
                peeked = status < 0x80  # running status: this is the first data byte
                if not peeked:
                    i += 1
                    if status != 0xFF:  # meta messages leave the running status as it is
                        running = status
                elif running is None:
                    raise unreadable(f"track {track}: running status without a status byte at byte {i}")
                else:
                    status = running
                if status < 0xF0:  # a channel message: two data bytes, one for program change and aftertouch
                    if 0x90 <= status < 0xA0:
                        if data[i + 1]:
                            n_notes += 1
                            if n_notes > max_notes:
                                raise SongError(f"{path}: more than {max_notes:,} notes, the limit "
                                                "(manifest.max_song_notes)")
                        i += 2
                    else:
                        i += 1 if 0xC0 <= status < 0xE0 else 2
                elif status == 0xFF or status == 0xF0 or status == 0xF7:  # meta, sysex: a length, then data
                    meta_type = -1
                    if status == 0xFF:
                        meta_type = data[i]
                        i += 1
                    elif peeked:
                        i += 1  # mido reads this data byte as the status and drops it
                    length = data[i]
                    i += 1
                    if length & 0x80:
                        length, i = _variable_int(data, i, length & 0x7F, path, track)
                    if meta_type == 0x51 and length >= 3:  # mido reads a tempo from the first 3 bytes
                        tempos.append((tick, int.from_bytes(data[i:i + 3], "big")))
                    i += length
                else:
                    n_data = _SYSTEM_DATA_BYTES.get(status)
                    if n_data is None:
                        raise unreadable(f"track {track}: undefined status byte 0x{status:02x} at byte {i - 1}")
                    i += n_data or peeked  # a running-status byte is read even where no data byte is due
                n_events += 1
                if n_events > max_events:
                    raise SongError(f"{path}: more than {max_events:,} MIDI events (notes, pedal, other controllers "
                                    "and meta messages), the limit (manifest.max_midi_events)")
        except IndexError:
            raise unreadable(f"track {track}: the file ends inside an event") from None
        if i != end:
            raise unreadable(f"track {track}: an event runs {i - end:,} bytes past the end of its chunk")
        if track and len(tempos) > n_tempos:
            tempo_tracks.append(track)
        last_tick, pos = max(last_tick, tick), end
    if any(tempo == 0 for _, tempo in tempos):
        raise unreadable("a tempo of 0 microseconds per beat")
    if division == 0 or (division < 0 and not division & 0xFF):
        raise unreadable(f"time division 0x{division & 0xFFFF:04x} has no ticks")
    scan = MidiScan(ticks_per_beat=division, n_events=n_events, n_notes=n_notes, last_tick=last_tick,
                    tempos=sorted(tempos, key=lambda t: t[0]), tempo_tracks=tempo_tracks)
    seconds = scan.duration
    if seconds > limits.max_song_duration_s:
        raise SongError(f"{path}: {seconds:,.0f} s long, over the limit of {limits.max_song_duration_s:,.0f} s "
                        "(manifest.max_song_duration_s)")
    return scan


def _variable_int(data: bytes, i: int, value: int, path: str | Path, track: int) -> tuple[int, int]:
    """Finish a variable-length number whose first byte (``value``, 7 bits) is read; at most 4 bytes."""
    for _ in range(3):
        byte = data[i]
        i += 1
        value = (value << 7) | (byte & 0x7F)
        if not byte & 0x80:
            return value, i
    raise SongError(f"{path}: not a readable MIDI file (track {track}: a variable-length number longer than 4 bytes "
                    f"before byte {i})")


def ticks_to_seconds(ticks: np.ndarray, ticks_per_beat: int, tempos: list[tuple[int, int]]) -> np.ndarray:
    """The time of each tick, following the tempo map, computed as pretty_midi does but without a per-tick table.

    ``tempos`` are (tick, microseconds per beat), sorted by tick. With SMPTE time division
    (``ticks_per_beat`` < 0, frames per second and ticks per frame) tempo changes do not apply.
    """
    ticks = np.asarray(ticks, dtype=np.int64)
    if ticks_per_beat < 0:
        fps = -(ticks_per_beat >> 8)
        seconds_per_tick = 1.0 / ((30000 / 1001 if fps == 29 else fps) * (ticks_per_beat & 0xFF))
        return seconds_per_tick * ticks
    scales = [(0, 60.0 / (120.0 * ticks_per_beat))]  # MIDI's default tempo, 120 bpm
    for tick, tempo in tempos:
        scale = 60.0 / ((6e7 / tempo) * ticks_per_beat)
        if tick == 0:
            scales = [(0, scale)]
        elif scale != scales[-1][1]:
            scales.append((tick, scale))
    first = np.array([t for t, _ in scales], dtype=np.int64)
    scale = np.array([s for _, s in scales])
    base = np.zeros(len(scales))  # the time at which each tempo begins
    for k in range(1, len(scales)):
        base[k] = base[k - 1] + scale[k - 1] * (first[k] - first[k - 1])
    k = np.searchsorted(first, ticks, side="right") - 1
    return base[k] + scale[k] * (ticks - first[k])


def _notes_and_pedal(midi: mido.MidiFile) -> tuple[list, list, int, int]:
    """Notes (pitch, velocity, on tick, off tick) and sustain pedal (tick, value) of every track, as pretty_midi pairs them.

    A note-off (or note-on without velocity) closes every open note of its channel and pitch
    begun at an earlier tick. Drum notes (channel 10) are left out and counted; so are notes
    never closed or closed at their onset. Returns (notes, pedal, drum notes, unclosed notes).
    """
    notes, pedal, n_drums, n_unclosed = [], [], 0, 0
    for track in midi.tracks:
        tick, open_notes = 0, {}
        for msg in track:
            tick += msg.time
            kind = msg.type
            if kind == "note_on" and msg.velocity > 0:
                open_notes.setdefault((msg.channel, msg.note), []).append((tick, msg.velocity))
            elif kind == "note_off" or kind == "note_on":
                key = (msg.channel, msg.note)
                held = open_notes.pop(key, [])
                closed = [(on, velocity) for on, velocity in held if on != tick]
                struck_now = [(on, velocity) for on, velocity in held if on == tick]
                if closed and struck_now:  # struck again at this tick: that note stays open
                    open_notes[key] = struck_now
                else:
                    n_unclosed += len(struck_now)  # released at its onset: no duration
                if msg.channel == 9:
                    n_drums += len(closed)
                else:
                    notes += [(msg.note, velocity, on, tick) for on, velocity in closed]
            elif kind == "control_change" and msg.control == SUSTAIN_CC and msg.channel != 9:
                pedal.append((tick, msg.value))
        n_unclosed += sum(len(held) for held in open_notes.values())
    return notes, pedal, n_drums, n_unclosed


def _resolve_overlaps(pitch, velocity, start, end):
    """Cut each note where the next note of the same pitch begins; drop exact duplicates."""
    order = np.lexsort((end, start, pitch))  # same pitch and onset: the shorter comes first
    pitch, velocity, start, end = pitch[order], velocity[order], start[order], end[order].copy()
    overlap = (pitch[1:] == pitch[:-1]) & (start[1:] < end[:-1])
    end[:-1][overlap] = start[1:][overlap]
    duplicate = end <= start  # cut to nothing: it began together with the note that follows
    problems = []
    n_cut = int(overlap.sum()) - int(duplicate.sum())
    if n_cut:
        problems.append(f"shortened {n_cut} notes overlapping a later note of the same pitch")
    if duplicate.any():
        problems.append(f"dropped {int(duplicate.sum())} duplicate notes (same pitch and onset as another)")
    keep = ~duplicate
    return pitch[keep], velocity[keep], start[keep], end[keep], problems


def _note_sequence(pitch, velocity, start, end, sustain_time, sustain_value, total_time) -> music_pb2.NoteSequence:
    seq = music_pb2.NoteSequence()
    seq.ticks_per_quarter = 220  # note_seq's standard PPQ, so MidiFile.save() writes a normal file
    seq.tempos.add(time=0.0, qpm=120.0)
    for p, v, s, e in zip(pitch.tolist(), velocity.tolist(), start.tolist(), end.tolist()):
        seq.notes.add(pitch=p, velocity=v, start_time=s, end_time=e)
    for t, v in zip(sustain_time.tolist(), sustain_value.tolist()):
        seq.control_changes.add(time=t, control_number=SUSTAIN_CC, control_value=v)
    seq.total_time = total_time
    return seq


# --------------------------------------------------------------------------- chunks


@dataclass(frozen=True, eq=False)
class _Timeline:
    """The stretched (and trimmed) song with the control step of every event, as the piano roll sees it."""

    fps: float
    pitch: np.ndarray
    velocity: np.ndarray
    start: np.ndarray
    end: np.ndarray
    first_step: np.ndarray  # the note's first control step
    stop_step: np.ndarray  # one past its last control step
    sustain_time: np.ndarray
    sustain_value: np.ndarray
    sustain_step: np.ndarray
    n_steps: int


@dataclass(frozen=True, eq=False)
class Chunk:
    """Control steps [start_step, start_step + n_steps) of the stretched song: one unit of work."""

    index: int
    start_step: int
    n_steps: int
    n_notes: int  # notes sounding in the chunk, boundary-crossing ones included
    _timeline: _Timeline = field(repr=False)

    @cached_property
    def midi(self) -> MidiFile:
        """This chunk as a RoboPianist ``MidiFile``: stretched, starting at 0, ``n_steps`` control steps long."""
        tl, a, b = self._timeline, self.start_step, self.start_step + self.n_steps
        t0 = a / tl.fps
        inside = (tl.first_step < b) & (tl.stop_step > a)
        starts, ends = [], []
        for s, e, fs, ss in zip(tl.start[inside], tl.end[inside], tl.first_step[inside], tl.stop_step[inside]):
            starts.append(_fit(s - t0, int(fs) - a, tl.fps, math.floor) if fs >= a else 0.0)
            ends.append(_fit(e - t0, int(ss) - a, tl.fps, math.ceil) if ss <= b else _fit(self.n_steps / tl.fps, self.n_steps, tl.fps, math.ceil))

        before = np.flatnonzero(tl.sustain_step < a)
        within = np.flatnonzero((tl.sustain_step >= a) & (tl.sustain_step < b))
        pedal_t = [0.0] if len(before) else []  # the pedal as it is when the chunk begins
        pedal_v = [int(tl.sustain_value[before[-1]])] if len(before) else []
        for i in within:
            pedal_t.append(_fit(tl.sustain_time[i] - t0, int(tl.sustain_step[i]) - a, tl.fps, math.floor))
            pedal_v.append(int(tl.sustain_value[i]))
        # Half a step short of the boundary, so the piano roll has exactly n_steps rows.
        total = (self.n_steps - 0.5) / tl.fps
        return MidiFile(seq=_note_sequence(tl.pitch[inside], tl.velocity[inside], np.array(starts), np.array(ends),
                                           np.array(pedal_t), np.array(pedal_v), total))


def _fit(local: float, step: int, fps: float, rounding) -> float:
    """``local``, moved by a few ulps if rounding error would put it on another step than ``step``.

    Subtracting the chunk's start time can flip ``floor(t * fps)`` for an event lying on a step
    boundary; this keeps every event on the control step it has in the whole song.
    """
    x = max(local, 0.0)
    for _ in range(4):
        got = rounding(x * fps)
        if got == step:
            return x
        x = float(np.nextafter(x, math.inf if got < step else -math.inf))
    # Not an event near a boundary (a note shorter than one step): put it mid-step.
    return (step + 0.5) / fps if rounding is math.floor else (step - 0.5) / fps


@dataclass(frozen=True, eq=False)
class ChunkPlan:
    """How a song is cut: ``chunks`` with notes (the units), ``skipped`` indices without."""

    song_hash: str
    chunk_steps: int
    n_steps: int  # control steps of the whole stretched (and trimmed) song
    chunks: list[Chunk]
    skipped: list[int]

    @property
    def n_chunks(self) -> int:
        return len(self.chunks) + len(self.skipped)

    @property
    def n_notes(self) -> int:
        return sum(c.n_notes for c in self.chunks)

    def chunk(self, index: int) -> Chunk:
        for c in self.chunks:
            if c.index == index:
                return c
        if index in self.skipped:
            raise SongError(f"chunk {index} has no notes (it is skipped)")
        raise SongError(f"chunk {index} does not exist (the song has {self.n_chunks} chunks)")


def plan_chunks(song: Song, env_cfg) -> ChunkPlan:
    """Cut ``song`` into chunks of ``env_cfg.chunk_steps`` control steps after stretching and trimming.

    ``env_cfg`` is a :class:`configs.EnvConfig` (``control_timestep``, ``stretch_factor``,
    ``trim_silence``, ``chunk_steps``). No environment is built: this is cheap.
    """
    fps = 1 / env_cfg.control_timestep  # as RoboPianist's NoteTrajectory computes it
    factor = env_cfg.stretch_factor
    # Same float arithmetic as note_seq's stretch and trim, so steps match RoboPianist's.
    start, end, total = song.start * factor, song.end * factor, song.duration * factor
    sus_t, sus_v = song.sustain_time * factor, song.sustain_value
    if env_cfg.trim_silence:
        offset = float(start.min())
        sounding = sus_t < total  # trimming ends the song at its last release
        sus_t, sus_v = np.maximum(sus_t[sounding] - offset, 0.0), sus_v[sounding]
        start, end, total = start - offset, end - offset, total - offset
    first = (start * fps).astype(np.int64)
    stop = np.maximum(first + 1, np.ceil(end * fps).astype(np.int64))
    n_steps = int(total * fps + 1)
    tl = _Timeline(fps=fps, pitch=song.pitch, velocity=song.velocity, start=start, end=end, first_step=first,
                   stop_step=stop, sustain_time=sus_t, sustain_value=sus_v,
                   sustain_step=(sus_t * fps).astype(np.int64), n_steps=n_steps)

    size = env_cfg.chunk_steps
    chunks, skipped = [], []
    for k in range(-(-n_steps // size)):
        a, b = k * size, min((k + 1) * size, n_steps)
        n_notes = int(((first < b) & (stop > a)).sum())
        if n_notes:
            chunks.append(Chunk(index=k, start_step=a, n_steps=b - a, n_notes=n_notes, _timeline=tl))
        else:
            skipped.append(k)
    return ChunkPlan(song_hash=song.content_hash, chunk_steps=size, n_steps=n_steps, chunks=chunks, skipped=skipped)


def load_chunk(path: str | Path, chunk_index: int, env_cfg, expected_hash: str | None = None,
               limits: SongLimits | None = None) -> MidiFile:
    """Rebuild chunk ``chunk_index`` of the song at ``path`` (what a worker calls).

    With ``expected_hash``, refuse a file whose content changed since the unit was planned.
    """
    song = load_song(path, limits=limits)
    if expected_hash and song.content_hash != expected_hash:
        raise SongError(f"{path}: content changed since the unit was planned "
                        f"(sha256 {song.content_hash[:12]}, expected {expected_hash[:12]})")
    try:
        return plan_chunks(song, env_cfg).chunk(chunk_index).midi
    except SongError as e:
        raise SongError(f"{path}: {e}") from None
