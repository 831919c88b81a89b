"""Songs from MIDI files, and their cut into chunks: the units of work.

A :class:`Song` is what pretty_midi reads from a MIDI file, cleaned into a note list the
RoboPianist piano can play; ``Song.to_midi_file()`` turns it into the RoboPianist
``MidiFile`` (a note_seq ``NoteSequence``) the environment consumes. For a clean file the
result plays exactly like ``MidiFile.from_file(path)``: same notes and sustain per control
step.

What loading does with messy files (each fix is listed in ``Song.problems``):

- several tracks / instruments: merged into one note list (one piano, two hands);
- tempo changes on tracks other than the first: moved into the global tempo map (pretty_midi
  would otherwise ignore them), so note times follow every tempo change;
- sustain pedal (CC64) of every non-drum track: kept as the song's sustain; other controls
  are dropped;
- drum tracks (channel 10): dropped;
- notes outside the piano's 88 keys (MIDI 21..108): dropped and counted (not octave-folded:
  folding changes the music, and RoboPianist itself refuses such notes);
- overlapping notes of the same pitch: the earlier note is cut where the later begins; two
  notes with the same pitch and onset keep only the longer one;
- notes without duration (note-off at the note-on tick, or never released): dropped;
- nothing playable left, an empty file, a missing or unreadable file: :class:`SongError`;
- a file past the :class:`SongLimits` (length in ticks, duration, note count): :class:`SongError`,
  found by a scan of the raw MIDI messages before pretty_midi expands anything in memory
  (pretty_midi allocates per tick; its own tick guard is switched off by note_seq, which raises
  ``pretty_midi.MAX_TICK`` to 1e10 on import).

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
import warnings
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import mido
import numpy as np
import pretty_midi
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
    """Bounds a MIDI file must respect before it is expanded in memory (``manifest.*`` in the config).

    A crafted file with one huge delta time is a few bytes long but would make pretty_midi
    build a per-tick table of gigabytes; these are checked on the raw messages first.
    """

    max_midi_ticks: int = 10_000_000  # pretty_midi's own MAX_TICK before note_seq raises it
    max_song_duration_s: float = 3600.0
    max_song_notes: int = 200_000


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


def song_limits(manifest_cfg) -> SongLimits:
    """The limits of a :class:`configs.ManifestConfig` (``manifest.*``)."""
    return SongLimits(max_midi_ticks=manifest_cfg.max_midi_ticks, max_song_duration_s=manifest_cfg.max_song_duration_s,
                      max_song_notes=manifest_cfg.max_song_notes)


def load_song(path: str | Path, name: str | None = None, limits: SongLimits | None = None) -> Song:
    """Read a MIDI file into a :class:`Song` (named ``name`` or the file's stem).

    Raises :class:`SongError` naming the file when it is missing, unreadable, past ``limits``
    (default :class:`SongLimits`), or has no playable notes. Fixes that still leave a playable
    song go to ``Song.problems``.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise SongError(f"{path}: no such file") from None
    except OSError as e:
        raise SongError(f"{path}: cannot read the file ({e.strerror or e})") from None
    if not data:
        raise SongError(f"{path}: empty file, no playable notes")
    try:
        midi = mido.MidiFile(file=io.BytesIO(data))
    except Exception as e:  # mido raises many types for damaged files
        raise SongError(f"{path}: not a readable MIDI file ({type(e).__name__}: {e})") from None
    _check_limits(midi, path, limits or SongLimits())
    try:
        problems = _tempo_into_first_track(midi)
        n_note_ons = sum(msg.type == "note_on" and msg.velocity > 0 for track in midi.tracks for msg in track)
        with warnings.catch_warnings():  # its warnings are about the tempo map handled above
            warnings.simplefilter("ignore")
            pm = pretty_midi.PrettyMIDI(mido_object=midi)
    except Exception as e:  # mido and pretty_midi raise many types for damaged files
        raise SongError(f"{path}: not a readable MIDI file ({type(e).__name__}: {e})") from None

    notes, pedal, n_formed, n_drums = [], [], 0, 0
    for inst in pm.instruments:
        n_formed += len(inst.notes)
        if inst.is_drum:
            n_drums += len(inst.notes)
            continue
        notes += [(n.pitch, n.velocity, n.start, n.end) for n in inst.notes]
        pedal += [(c.time, c.value) for c in inst.control_changes if c.number == SUSTAIN_CC]
    if n_drums:
        problems.append(f"dropped {n_drums} drum-track notes")
    arr = np.array(notes, dtype=np.float64).reshape(-1, 4)
    pitch, velocity, start, end = arr[:, 0].astype(np.int16), arr[:, 1].astype(np.int16), arr[:, 2], arr[:, 3]

    n_silent = n_note_ons - n_formed  # pretty_midi silently drops notes it cannot close
    audible = end > start
    n_silent += int((~audible).sum())
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
    pedal_arr = np.array(pedal, dtype=np.float64).reshape(-1, 2)
    by_time = np.argsort(pedal_arr[:, 0], kind="stable")  # one pedal: merge the tracks' events in time
    return Song(path=path, content_hash=hashlib.sha256(data).hexdigest(), name=name or path.stem,
                pitch=pitch[order], velocity=velocity[order], start=start[order], end=end[order],
                sustain_time=pedal_arr[by_time, 0], sustain_value=pedal_arr[by_time, 1].astype(np.int16),
                problems=problems)


def _check_limits(midi: mido.MidiFile, path: Path, limits: SongLimits) -> None:
    """Raise :class:`SongError` when the raw messages go past ``limits`` (one pass, nothing expanded)."""
    last_tick, n_notes, tempos = 0, 0, []
    for track in midi.tracks:
        tick = 0
        for msg in track:
            tick += msg.time
            if msg.type == "note_on" and msg.velocity > 0:
                n_notes += 1
            elif msg.type == "set_tempo":
                tempos.append((tick, msg.tempo))
        last_tick = max(last_tick, tick)
    if last_tick > limits.max_midi_ticks:
        raise SongError(f"{path}: {last_tick:,} MIDI ticks long, over the limit of {limits.max_midi_ticks:,} "
                        "(manifest.max_midi_ticks); a crafted or damaged file?")
    if n_notes > limits.max_song_notes:
        raise SongError(f"{path}: {n_notes:,} notes, over the limit of {limits.max_song_notes:,} (manifest.max_song_notes)")
    if midi.type == 2:  # independent tracks: no shared tempo map to measure with; the tick limit holds
        return
    seconds, at, tempo = 0.0, 0, 500_000  # MIDI's default tempo: 120 bpm
    for tick, new_tempo in sorted(tempos):
        seconds += (min(tick, last_tick) - at) * tempo / (1e6 * max(midi.ticks_per_beat, 1))
        at, tempo = min(tick, last_tick), new_tempo
    seconds += (last_tick - at) * tempo / (1e6 * max(midi.ticks_per_beat, 1))
    if seconds > limits.max_song_duration_s:
        raise SongError(f"{path}: {seconds:,.0f} s long, over the limit of {limits.max_song_duration_s:,.0f} s "
                        "(manifest.max_song_duration_s)")


def _tempo_into_first_track(midi: mido.MidiFile) -> list[str]:
    """Move tempo changes found on later tracks into track 0, where pretty_midi reads the tempo map."""
    moved_from = [i for i, track in enumerate(midi.tracks) if i > 0 and any(m.type == "set_tempo" for m in track)]
    if not moved_from:
        return []
    tempos = []
    for i in moved_from:
        tick, kept, carry = 0, [], 0
        for msg in midi.tracks[i]:
            tick += msg.time
            if msg.type == "set_tempo":
                tempos.append((tick, msg.copy(time=0)))
                carry += msg.time
            else:
                kept.append(msg.copy(time=msg.time + carry))
                carry = 0
        midi.tracks[i] = mido.MidiTrack(kept)
    first, tick = [], 0
    for msg in midi.tracks[0]:
        tick += msg.time
        first.append((tick, msg.copy(time=0)))
    events = sorted(first + tempos, key=lambda e: (e[0], e[1].type == "end_of_track"))
    track, prev = mido.MidiTrack(), 0
    for tick, msg in events:
        track.append(msg.copy(time=tick - prev))
        prev = tick
    midi.tracks[0] = track
    tracks = ", ".join(str(i) for i in moved_from)
    return [f"tempo changes on track {tracks} applied to the whole song"]


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
