"""Songs from MIDI: RoboPianist-identical trajectories, chunking, and every messy-file case."""

from pathlib import Path

import mido
import pretty_midi
import pytest
import robopianist
from note_seq import sequences_lib
from robopianist.music.midi_file import MidiFile, NoteTrajectory

import configs
from workers.piano.music import SongError, load_chunk, load_song, plan_chunks

SONGS = sorted((Path(robopianist.__file__).parent / "music" / "data" / "rousseau").glob("*.mid"))
DT = 0.05


@pytest.fixture(scope="module")
def env_cfg():
    return configs.load().env


def _env(env_cfg, **changes):
    return env_cfg.model_copy(update=changes)


def _traj(midi: MidiFile, dt: float = DT) -> NoteTrajectory:
    return NoteTrajectory.from_midi(midi, dt)


def _keys(traj: NoteTrajectory) -> list[list[int]]:
    return [sorted(n.number for n in step) for step in traj.notes]


def _write_pm(path: Path, notes_by_track, drum_tracks=(), pedal=(), tempo=120.0) -> Path:
    """Write a MIDI with pretty_midi; ``notes_by_track`` = [[(pitch, start, end, velocity?), ...], ...]."""
    pm = pretty_midi.PrettyMIDI(initial_tempo=tempo)
    for i, notes in enumerate(notes_by_track):
        inst = pretty_midi.Instrument(program=0, is_drum=i in drum_tracks, name=f"track{i}")
        for n in notes:
            pitch, start, end, velocity = (*n, 80)[:4]
            inst.notes.append(pretty_midi.Note(velocity=velocity, pitch=pitch, start=start, end=end))
        if i == 0:
            inst.control_changes += [pretty_midi.ControlChange(64, v, t) for t, v in pedal]
        pm.instruments.append(inst)
    pm.write(str(path))
    return path


def _write_mido(path: Path, tracks, ticks_per_beat=480) -> Path:
    """Write a type-1 MIDI from tracks of (absolute tick, mido message) pairs."""
    mid = mido.MidiFile(type=1, ticks_per_beat=ticks_per_beat)
    for events in tracks:
        track, prev = mido.MidiTrack(), 0
        for tick, msg in sorted(events, key=lambda e: e[0]):
            track.append(msg.copy(time=tick - prev))
            prev = tick
        mid.tracks.append(track)
    mid.save(str(path))
    return path


def _on(note, vel=80):
    return mido.Message("note_on", note=note, velocity=vel)


def _off(note):
    return mido.Message("note_off", note=note, velocity=0)


# --------------------------------------------------------------------------- RoboPianist parity


@pytest.mark.parametrize("stretch", [1.0, 1.25])
@pytest.mark.parametrize("path", SONGS, ids=lambda p: p.stem)
def test_song_plays_like_robopianists_own_loader(path, stretch):
    ours = _traj(load_song(path).to_midi_file().stretch(stretch))
    theirs = _traj(MidiFile.from_file(path).stretch(stretch))
    assert len(ours) == len(theirs) > 100
    assert ours.notes == theirs.notes  # pitch, velocity and fingering of every note at every step
    assert ours.sustains == theirs.sustains
    assert any(ours.sustains)


@pytest.mark.parametrize("chunk_steps", [550, 37])
@pytest.mark.parametrize("path", SONGS, ids=lambda p: p.stem)
def test_chunks_replay_the_stretched_trimmed_song(path, chunk_steps, env_cfg):
    """Chunk k played alone is steps [k*chunk_steps, ...) of the whole song as RP1M plays it."""
    env = _env(env_cfg, chunk_steps=chunk_steps)
    seq = MidiFile.from_file(path).stretch(env.stretch_factor).seq
    first, last = min(n.start_time for n in seq.notes), max(n.end_time for n in seq.notes)
    whole = _traj(MidiFile(sequences_lib.extract_subsequence(seq, first, last)), env.control_timestep)
    plan = plan_chunks(load_song(path), env)
    assert plan.n_steps == len(whole)
    assert [c.index for c in plan.chunks] == [k for k in range(plan.n_chunks) if k not in plan.skipped]
    for chunk in plan.chunks:
        part = _traj(chunk.midi, env.control_timestep)
        a = chunk.start_step
        assert a == chunk.index * chunk_steps and len(part) == chunk.n_steps
        assert part.sustains == whole.sustains[a:a + chunk.n_steps]
        assert part.notes[1:] == whole.notes[a + 1:a + chunk.n_steps]
        # Step 0 may also show a key re-struck while sounding (RoboPianist hides it for one step).
        extra = {n.number for n in part.notes[0]} - {n.number for n in whole.notes[a]}
        assert {n.number for n in whole.notes[a]} <= {n.number for n in part.notes[0]}
        assert all(a > 0 and any(n.number == k for n in whole.notes[a - 1]) for k in extra)
    for k in plan.skipped:
        assert not any(whole.notes[k * chunk_steps:(k + 1) * chunk_steps])


def test_nocturne_is_two_chunks_at_rp1m_settings(env_cfg):
    plan = plan_chunks(load_song(SONGS[0]), env_cfg)
    assert SONGS[0].stem.startswith("nocturne")
    assert [(c.index, c.start_step, c.n_steps) for c in plan.chunks] == [(0, 0, 550), (1, 550, plan.n_steps - 550)]
    assert plan.skipped == [] and plan.chunks[0].midi.seq.notes[0].start_time == 0.0
    assert sum(len(c.midi.seq.notes) for c in plan.chunks) > load_song(SONGS[0]).n_notes  # crossing notes in both


# --------------------------------------------------------------------------- chunking


def test_note_and_pedal_crossing_a_boundary_are_in_both_chunks(tmp_path, env_cfg):
    path = _write_pm(tmp_path / "cross.mid", [[(60, 0.0, 0.5), (64, 2.0, 4.0), (67, 4.5, 5.0)]], pedal=[(1.0, 127)])
    env = _env(env_cfg, stretch_factor=1.0, trim_silence=True, chunk_steps=50)  # 2.5 s chunks
    plan = plan_chunks(load_song(path), env)
    c0, c1 = plan.chunks
    k0, k1 = _keys(_traj(c0.midi)), _keys(_traj(c1.midi))
    assert [t for t, keys in enumerate(k0) if 64 in keys] == list(range(40, 50))
    assert [t for t, keys in enumerate(k1) if 64 in keys] == list(range(0, 30))
    assert (c0.n_notes, c1.n_notes) == (2, 2)
    assert _traj(c1.midi).sustains[0] == 1  # the pedal is still down when chunk 1 begins


def test_silent_chunks_are_skipped_and_trim_only_removes_leading_silence(tmp_path, env_cfg):
    path = _write_pm(tmp_path / "gap.mid", [[(60, 5.0, 6.0), (62, 15.0, 16.0)]])
    song = load_song(path)
    untrimmed = plan_chunks(song, _env(env_cfg, stretch_factor=1.0, trim_silence=False, chunk_steps=50))
    assert [c.index for c in untrimmed.chunks] == [2, 6] and untrimmed.skipped == [0, 1, 3, 4, 5]
    trimmed = plan_chunks(song, _env(env_cfg, stretch_factor=1.0, trim_silence=True, chunk_steps=50))
    assert [c.index for c in trimmed.chunks] == [0, 4] and trimmed.skipped == [1, 2, 3]
    assert trimmed.n_steps == int(11.0 / DT + 1)
    assert _keys(_traj(trimmed.chunks[1].midi))[0] == [62]  # 15 s - 5 s = step 200 = chunk 4, step 0


def test_stretch_scales_the_song_length(tmp_path, env_cfg):
    path = _write_pm(tmp_path / "s.mid", [[(60, 0.0, 4.0)]])
    env = _env(env_cfg, trim_silence=True)
    assert plan_chunks(load_song(path), _env(env, stretch_factor=1.0)).n_steps == 81
    assert plan_chunks(load_song(path), _env(env, stretch_factor=1.25)).n_steps == 101


def test_load_chunk_rebuilds_the_planned_chunk(env_cfg):
    env = _env(env_cfg, chunk_steps=200)
    song = load_song(SONGS[0])
    planned = plan_chunks(song, env).chunk(2).midi
    rebuilt = load_chunk(SONGS[0], 2, env, expected_hash=song.content_hash)
    assert _traj(rebuilt).notes == _traj(planned).notes and _traj(rebuilt).sustains == _traj(planned).sustains
    with pytest.raises(SongError, match="content changed"):
        load_chunk(SONGS[0], 2, env, expected_hash="0" * 64)
    with pytest.raises(SongError, match=rf"{SONGS[0].name}.*chunk 99 does not exist"):
        load_chunk(SONGS[0], 99, env)


def test_load_chunk_refuses_a_skipped_chunk(tmp_path, env_cfg):
    path = _write_pm(tmp_path / "gap.mid", [[(60, 0.0, 1.0), (62, 10.0, 11.0)]])
    with pytest.raises(SongError, match="gap.mid: chunk 1 has no notes"):
        load_chunk(path, 1, _env(env_cfg, stretch_factor=1.0, chunk_steps=50))


# --------------------------------------------------------------------------- identity


def test_song_identity_is_the_content_hash(tmp_path):
    a = tmp_path / "a.mid"
    a.write_bytes(SONGS[1].read_bytes())
    (tmp_path / "sub").mkdir()
    b = tmp_path / "sub" / "copy.mid"
    b.write_bytes(SONGS[1].read_bytes())
    sa, sb = load_song(a), load_song(b, name="twinkle")
    assert sa.content_hash == sb.content_hash and len(sa.content_hash) == 64
    assert (sa.name, sb.name) == ("a", "twinkle")
    assert load_song(SONGS[0]).content_hash != sa.content_hash


# --------------------------------------------------------------------------- messy files


def test_tracks_are_merged(tmp_path):
    song = load_song(_write_pm(tmp_path / "two.mid", [[(72, 0.0, 1.0)], [(48, 0.5, 1.5), (50, 1.0, 2.0)]]))
    assert song.n_notes == 3 and song.problems == []
    assert song.pitch.tolist() == [72, 48, 50]  # sorted by onset


def test_tempo_change_on_a_later_track_moves_note_times(tmp_path):
    """Track 0 says 120 bpm; track 1 switches to 60 bpm after two beats (pretty_midi alone ignores it)."""
    ppq = 480
    path = _write_mido(tmp_path / "tempo.mid", [
        [(0, mido.MetaMessage("set_tempo", tempo=mido.bpm2tempo(120)))],
        [(0, _on(60)), (ppq, _off(60)),
         (2 * ppq, mido.MetaMessage("set_tempo", tempo=mido.bpm2tempo(60))),
         (4 * ppq, _on(62)), (5 * ppq, _off(62))],
    ], ticks_per_beat=ppq)
    song = load_song(path)
    # 2 beats at 120 bpm (1 s) + 2 beats at 60 bpm (2 s): the second note starts at 3 s and lasts 1 s.
    assert song.start.tolist() == pytest.approx([0.0, 3.0])
    assert song.end.tolist() == pytest.approx([0.5, 4.0])
    assert any("tempo changes on track 1" in p for p in song.problems)


def test_sustain_pedal_becomes_sustain(tmp_path):
    path = _write_pm(tmp_path / "pedal.mid", [[(60, 0.0, 2.0)]], pedal=[(0.5, 100), (1.5, 0)])
    traj = _traj(load_song(path).to_midi_file())
    assert [t for t, s in enumerate(traj.sustains) if s] == list(range(10, 30))


def test_drum_tracks_are_dropped_and_reported(tmp_path):
    song = load_song(_write_pm(tmp_path / "drums.mid", [[(60, 0.0, 1.0)], [(36, 0.0, 0.2), (38, 0.5, 0.7)]],
                               drum_tracks={1}))
    assert song.pitch.tolist() == [60]
    assert song.problems == ["dropped 2 drum-track notes"]


def test_notes_outside_the_88_keys_are_dropped_and_counted(tmp_path):
    song = load_song(_write_pm(tmp_path / "range.mid", [[(20, 0.0, 1.0), (21, 0.0, 1.0), (108, 0.0, 1.0),
                                                        (109, 0.0, 1.0), (120, 1.0, 2.0)]]))
    assert sorted(song.pitch.tolist()) == [21, 108]
    assert len(song.problems) == 1 and "dropped 3 notes outside the piano's 88 keys" in song.problems[0]
    assert "20..120" in song.problems[0]
    _traj(song.to_midi_file())  # RoboPianist accepts the result (it raises on such pitches)


def test_overlapping_notes_of_one_pitch_are_cut_at_the_later_onset(tmp_path):
    ppq = 480  # 120 bpm: one beat = 0.5 s
    path = _write_mido(tmp_path / "overlap.mid", [
        [(0, _on(60)), (ppq, _off(60))],  # track 0: 0.0 .. 0.5 s
        [(ppq // 2, _on(60, 90)), (2 * ppq, _off(60)),  # track 1: 0.25 .. 1.0 s
         (4 * ppq, _on(64)), (6 * ppq, _off(64))],
        [(4 * ppq, _on(64, 100)), (5 * ppq, _off(64))],  # same pitch and onset as track 1's, shorter
    ], ticks_per_beat=ppq)
    song = load_song(path)
    notes = sorted(zip(song.pitch.tolist(), song.start.tolist(), song.end.tolist()))
    assert notes == [(60, 0.0, 0.25), (60, 0.25, 1.0), (64, 2.0, 3.0)]
    assert "shortened 1 notes overlapping a later note of the same pitch" in song.problems
    assert "dropped 1 duplicate notes (same pitch and onset as another)" in song.problems


def test_notes_without_duration_are_dropped_and_reported(tmp_path):
    path = _write_mido(tmp_path / "zero.mid", [[(0, _on(60)), (0, _off(60)), (0, _on(62)), (480, _off(62))]])
    song = load_song(path)
    assert song.pitch.tolist() == [62]
    assert any("dropped 1 notes without duration" in p for p in song.problems)


def test_files_without_playable_notes_are_refused(tmp_path):
    empty = tmp_path / "empty.mid"
    empty.write_bytes(b"")
    with pytest.raises(SongError, match="empty.mid: empty file, no playable notes"):
        load_song(empty)
    silent = _write_mido(tmp_path / "silent.mid", [[(0, mido.MetaMessage("set_tempo", tempo=500000))]])
    with pytest.raises(SongError, match="silent.mid: no playable notes"):
        load_song(silent)
    drums = _write_pm(tmp_path / "drums.mid", [[(36, 0.0, 0.5)]], drum_tracks={0})
    with pytest.raises(SongError, match=r"drums.mid: no playable notes \(dropped 1 drum-track notes\)"):
        load_song(drums)


def test_corrupt_and_missing_files_are_named(tmp_path):
    corrupt = tmp_path / "corrupt.mid"
    corrupt.write_bytes(b"MThd\x00\x00\x00\x06garbage that is not a MIDI file")
    with pytest.raises(SongError, match="corrupt.mid: not a readable MIDI file"):
        load_song(corrupt)
    with pytest.raises(SongError, match="nowhere.mid: no such file"):
        load_song(tmp_path / "nowhere.mid")
    truncated = tmp_path / "truncated.mid"
    truncated.write_bytes(SONGS[1].read_bytes()[:200])
    with pytest.raises(SongError, match="truncated.mid"):
        load_song(truncated)


def test_a_crafted_huge_delta_is_refused_by_its_duration(tmp_path):
    from env_fixtures import CRAFTED_MIDI, write_crafted_midi

    assert len(CRAFTED_MIDI) == 47
    crafted = write_crafted_midi(tmp_path / "crafted.mid")
    assert mido.MidiFile(str(crafted)).tracks[0][3].time == 268_435_455  # the file is what it claims
    with pytest.raises(SongError, match=r"crafted.mid: 1,398,101 s long, over the limit of 3,600 s "
                                        r"\(manifest.max_song_duration_s\)"):
        load_song(crafted)


def test_a_long_piece_at_fine_resolution_loads_with_pretty_midis_timing(tmp_path):
    """14 minutes at 10,080 ticks per beat are 12.7 million ticks: valid music, whatever the tick count."""
    from env_fixtures import write_long_piece

    path = write_long_piece(tmp_path / "quartet.mid")
    song = load_song(path)
    assert mido.MidiFile(str(path)).ticks_per_beat == 10_080
    assert 780 < song.duration < 840 and song.n_notes > 10_000
    # Notes timed through the tempo map exactly as pretty_midi times them (with its per-tick table).
    pm = pretty_midi.PrettyMIDI(str(path))
    theirs = {(n.pitch, n.start) for inst in pm.instruments for n in inst.notes}
    assert set(zip(song.pitch.tolist(), song.start.tolist())) == theirs
    assert song.sustain_time.tolist() == sorted(c.time for inst in pm.instruments for c in inst.control_changes
                                                if c.number == 64)


def test_song_duration_and_note_limits_come_from_the_config(tmp_path):
    from workers.piano.music import song_limits

    path = _write_pm(tmp_path / "long.mid", [[(60 + i % 12, i * 1.0, i * 1.0 + 0.5) for i in range(40)]])
    assert load_song(path).n_notes == 40  # within the defaults
    short = song_limits(configs.load(overrides=["manifest.max_song_duration_s=30"]).manifest)
    with pytest.raises(SongError, match=r"long.mid: 40 s long, over the limit of 30 s \(manifest.max_song_duration_s\)"):
        load_song(path, limits=short)
    few = song_limits(configs.load(overrides=["manifest.max_song_notes=39"]).manifest)
    with pytest.raises(SongError, match=r"long.mid: more than 39 notes, the limit \(manifest.max_song_notes\)"):
        load_song(path, limits=few)
    slow = _write_pm(tmp_path / "slow.mid", [[(60, 0.0, 20.0)]], tempo=30.0)  # the tempo map is followed
    with pytest.raises(SongError, match=r"slow.mid: 20 s long"):
        load_song(slow, limits=song_limits(configs.load(overrides=["manifest.max_song_duration_s=10"]).manifest))


@pytest.fixture
def no_mido_read(monkeypatch):
    """Fail the test if mido is asked to build the file's messages."""
    import workers.piano.music as music

    def refuse(*args, **kwargs):
        raise AssertionError("mido read a file the scan should have refused")

    monkeypatch.setattr(music.mido, "MidiFile", refuse)


@pytest.mark.parametrize("event, n, limit", [
    ("PEDAL_EVENT", 1_000_000, r"more than 500,000 MIDI events \(notes, pedal, other controllers and meta messages\), "
                               r"the limit \(manifest.max_midi_events\)"),
    ("NOTE_EVENT", 200_000, r"more than 200,000 notes, the limit \(manifest.max_song_notes\)"),
])
def test_crafted_event_floods_are_refused_by_the_scan_before_mido_reads_them(tmp_path, no_mido_read, event, n, limit):
    import env_fixtures

    path = env_fixtures.crafted_midi(tmp_path / "flood.mid", n, getattr(env_fixtures, event))
    assert path.stat().st_size < 5_000_000
    with pytest.raises(SongError, match=rf"flood.mid: {limit}"):
        load_song(path)


def test_file_size_and_event_limits_come_from_the_config(tmp_path, no_mido_read):
    from env_fixtures import PEDAL_EVENT, crafted_midi
    from workers.piano.music import song_limits

    path = crafted_midi(tmp_path / "pedal.mid", 1000, PEDAL_EVENT)
    small = song_limits(configs.load(overrides=["manifest.max_midi_bytes=4000"]).manifest)
    with pytest.raises(SongError, match=r"pedal.mid: 4,037 bytes, over the limit of 4,000 \(manifest.max_midi_bytes\)"):
        load_song(path, limits=small)
    few = song_limits(configs.load(overrides=["manifest.max_midi_events=1003"]).manifest)
    with pytest.raises(SongError, match=r"pedal.mid: more than 1,003 MIDI events .* \(manifest.max_midi_events\)"):
        load_song(path, limits=few)  # a program change, a note (on, off), 1000 pedal events, the end of track


@pytest.mark.parametrize("body, why", [
    (b"\x00\x90\x3c\x40\xff\xff\xff\xff\x7f\x80\x3c\x40", "a variable-length number longer than 4 bytes"),
    (b"\x00\x3c\x40", "running status without a status byte"),
    (b"\x00\xf4", "undefined status byte 0xf4"),
    (b"\x00\xff\x01\x20abc", "an event runs 29 bytes past the end of its chunk"),
])
def test_malformed_structure_is_refused_by_the_scan(tmp_path, no_mido_read, body, why):
    path = tmp_path / "bad.mid"
    path.write_bytes(b"MThd\x00\x00\x00\x06\x00\x00\x00\x01\x01\xe0MTrk" + len(body).to_bytes(4, "big") + body)
    with pytest.raises(SongError, match=rf"bad.mid: not a readable MIDI file \(track 0: {why}"):
        load_song(path)


def test_smpte_time_division_is_timed_in_frames(tmp_path):
    # 25 frames a second, 40 ticks a frame: 1000 ticks a second, whatever the tempo says.
    path = _write_mido(tmp_path / "smpte.mid", [[(0, mido.MetaMessage("set_tempo", tempo=250_000)),
                                                  (500, _on(60)), (1500, _off(60))]], ticks_per_beat=-(25 << 8) + 40)
    song = load_song(path)
    assert (song.start.tolist(), song.end.tolist()) == ([0.5], [1.5])
