"""Manifests: YAML and CSV songs lists, located errors, duplicates, units, and `manifest check`."""

from pathlib import Path

import pretty_midi
import pytest
from typer.testing import CliRunner

import configs
from orchestrator.cli import app
from orchestrator.manifest import ManifestError, demo_manifest, load_manifest


@pytest.fixture(scope="module")
def cfg():
    return configs.load()


def _song(path: Path, pitches=(60, 62, 64), seconds=1.0, drums=False) -> Path:
    """A small MIDI file; different pitches give different content (and hash)."""
    pm = pretty_midi.PrettyMIDI()
    inst = pretty_midi.Instrument(program=0)
    inst.notes = [pretty_midi.Note(80, p, i * seconds, (i + 1) * seconds) for i, p in enumerate(pitches)]
    pm.instruments.append(inst)
    if drums:
        kit = pretty_midi.Instrument(program=0, is_drum=True)
        kit.notes = [pretty_midi.Note(80, 36, 0.0, 0.1)]
        pm.instruments.append(kit)
    path.parent.mkdir(parents=True, exist_ok=True)
    pm.write(str(path))
    return path


def _problems(manifest):
    return [(p.line, p.severity, p.field, p.song) for p in manifest.problems]


def test_yaml_manifest_resolves_paths_and_applies_defaults_and_overrides(tmp_path, cfg):
    _song(tmp_path / "m" / "songs" / "a.mid", (60, 62))
    _song(tmp_path / "m" / "songs" / "b.mid", (65, 67), seconds=20.0)  # 40 s * 1.25 = 50 s: 2 chunks
    _song(tmp_path / "elsewhere" / "c.mid", (70,))
    manifest_path = tmp_path / "m" / "list.yaml"
    manifest_path.write_text(f"""\
defaults:
  split: eval
  overrides: {{specialist.total_steps: 5000}}
songs:
  - path: songs/a.mid
  - path: songs/b.mid
    name: bee
    split: held-out
    overrides: {{droq.batch_size: 64, specialist.total_steps: 7000}}
  - {tmp_path / "elsewhere" / "c.mid"}
""")
    m = load_manifest(manifest_path, cfg)
    assert m.problems == []
    assert [(s.name, s.split, s.line) for s in m.songs] == [("a", "eval", 5), ("bee", "held-out", 6), ("c", "eval", 10)]
    assert m.songs[0].path == (tmp_path / "m" / "songs" / "a.mid").resolve()
    a, b, c = m.songs
    assert a.overrides == c.overrides == {"specialist.total_steps": 5000}
    assert b.overrides == {"specialist.total_steps": 7000, "droq.batch_size": 64}
    assert b.cfg.droq.batch_size == 64 and b.cfg.specialist.total_steps == 7000 and a.cfg.droq.batch_size == 256
    assert a.config_hash == a.cfg.hash("env", "droq", "specialist") == c.config_hash != b.config_hash
    assert a.config_hash != cfg.hash("env", "droq", "specialist")

    units = m.units()
    assert [(u.song_name, u.chunk_index) for u in units] == [("a", 0), ("bee", 0), ("bee", 1), ("c", 0)]
    bee = units[1]
    assert (bee.song_hash, bee.config_hash, bee.split) == (b.song.content_hash, b.config_hash, "held-out")
    assert bee.song_path == str(b.path) and bee.overrides == b.overrides
    assert len({u.unit_id for u in units}) == 4


def test_per_song_env_override_changes_only_that_songs_chunks(tmp_path, cfg):
    _song(tmp_path / "a.mid", (60, 62), seconds=9.9)
    _song(tmp_path / "b.mid", (64, 65), seconds=9.9)
    (tmp_path / "m.yaml").write_text("songs:\n  - a.mid\n  - {path: b.mid, overrides: {env.chunk_steps: 100}}\n")
    a, b = load_manifest(tmp_path / "m.yaml", cfg).songs
    assert (len(a.plan.chunks), len(b.plan.chunks)) == (1, 5)  # 19.8 s * 1.25 = 24.75 s: 496 steps
    assert b.cfg.env.chunk_steps == 100 and b.plan.chunk_steps == 100


def test_bad_entries_are_reported_at_their_line_and_skipped(tmp_path, cfg):
    _song(tmp_path / "good.mid", (60,))
    _song(tmp_path / "good2.mid", (61,))
    (tmp_path / "corrupt.mid").write_bytes(b"not a midi file at all")
    (tmp_path / "m.yaml").write_text("""\
songs:
  - path: good.mid
  - path: good2.mid
    nmae: typo
  - path: good2.mid
    split: test
  - name: no-path
  - path: corrupt.mid
  - path: good2.mid
    overrides: {droq.batchsize: 64}
  - path: good2.mid
    overrides:
      specialist.total_steps: lots
  - 42
  - path: missing.mid
""")
    m = load_manifest(tmp_path / "m.yaml", cfg)
    assert [s.name for s in m.songs] == ["good"]
    assert _problems(m) == [
        (4, "error", "nmae", None),
        (6, "error", "split", None),
        (7, "error", "path", None),
        (8, "error", "path", "corrupt"),
        (10, "error", "overrides", "good2"),
        (12, "error", "overrides", "good2"),
        (14, "error", None, None),
        (15, "error", "path", "missing"),
    ]
    text = [str(p) for p in m.problems]
    assert text[0] == f"{tmp_path / 'm.yaml'}:4: error: nmae: unknown field (expected one of: path, name, split, overrides)"
    assert "'train', 'eval' or 'held-out'" in text[1]
    assert "corrupt.mid: not a readable MIDI file" in text[3]
    assert "droq.batchsize" in text[4] and "specialist.total_steps" in text[5]
    assert "missing.mid: no such file" in text[7]


def test_invalid_yaml_is_one_located_error(tmp_path, cfg):
    (tmp_path / "m.yaml").write_text("songs:\n  - path: a.mid\n  - path: [b.mid\n")
    m = load_manifest(tmp_path / "m.yaml", cfg)
    assert m.songs == [] and len(m.errors) == 1
    assert m.errors[0].line == 4 and "invalid YAML" in m.errors[0].message


def test_unknown_top_level_key_and_bad_defaults_are_reported(tmp_path, cfg):
    _song(tmp_path / "a.mid")
    (tmp_path / "m.yaml").write_text(
        "defaults:\n  overrides: {gate.f1_threshold: 0.9, nope.x: 1}\nsong:\n  - a.mid\nsongs:\n  - a.mid\n")
    m = load_manifest(tmp_path / "m.yaml", cfg)
    assert _problems(m) == [(2, "error", "defaults.overrides", None), (3, "error", "song", None)]
    assert [s.name for s in m.songs] == ["a"] and m.songs[0].overrides == {}


def test_non_unit_override_is_a_warning(tmp_path, cfg):
    _song(tmp_path / "a.mid")
    (tmp_path / "m.yaml").write_text("songs:\n  - path: a.mid\n    overrides: {gate.f1_threshold: 0.9}\n")
    m = load_manifest(tmp_path / "m.yaml", cfg)
    assert _problems(m) == [(3, "warning", "overrides", "a")] and len(m.songs) == 1


def test_same_song_twice_is_one_song(tmp_path, cfg):
    _song(tmp_path / "a.mid", (60, 62))
    (tmp_path / "copy").mkdir()
    (tmp_path / "copy" / "a-again.mid").write_bytes((tmp_path / "a.mid").read_bytes())
    _song(tmp_path / "b.mid", (70, 72))
    (tmp_path / "m.yaml").write_text("songs:\n  - a.mid\n  - {path: b.mid, name: a}\n  - copy/a-again.mid\n"
                                     "  - {path: copy/a-again.mid, split: held-out}\n  - {path: b.mid, name: b}\n")
    m = load_manifest(tmp_path / "m.yaml", cfg)
    assert [s.name for s in m.songs] == ["a", "a"] and len(m.units()) == 2
    assert _problems(m) == [(3, "warning", "name", "a"), (4, "warning", None, "a-again"), (5, "error", None, "a-again"),
                            (6, "warning", None, "b")]
    assert "same MIDI content as 'a' (line 2)" in m.problems[1].message
    assert "same MIDI content as 'a' (line 3)" in m.problems[3].message


def test_song_fixes_are_warnings(tmp_path, cfg):
    _song(tmp_path / "a.mid", drums=True)
    (tmp_path / "m.yaml").write_text("songs:\n  - a.mid\n")
    m = load_manifest(tmp_path / "m.yaml", cfg)
    assert _problems(m) == [(2, "warning", None, "a")] and "dropped 1 drum-track notes" in m.problems[0].message


def test_silent_chunks_are_reported(tmp_path, cfg):
    pm = pretty_midi.PrettyMIDI()
    pm.instruments.append(pretty_midi.Instrument(0))
    pm.instruments[0].notes = [pretty_midi.Note(80, 60, 0.0, 1.0), pretty_midi.Note(80, 62, 80.0, 81.0)]
    pm.write(str(tmp_path / "gap.mid"))  # played: the second note at 100 s = step 2000, in chunk 3
    (tmp_path / "m.yaml").write_text("songs:\n  - gap.mid\n")
    m = load_manifest(tmp_path / "m.yaml", cfg)
    assert [c.index for c in m.songs[0].plan.chunks] == [0, 3] and len(m.units()) == 2
    assert _problems(m) == [(2, "warning", None, "gap")]
    assert "chunks 1, 2 of 4 hold no notes; they are skipped" in m.problems[0].message


def test_csv_manifest(tmp_path, cfg):
    for i in range(4):
        _song(tmp_path / f"s{i}.mid", (60 + i,))
    (tmp_path / "m.csv").write_text(
        "# songs for the test\n"
        "path,name,split,overrides\n"
        "s0.mid,,,\n"
        's1.mid,one,eval,"{""droq.batch_size"": 32}"\n'
        "s2.mid,two,held-out,droq.batch_size=16;env.four_fingers=true\n"
        "s3.mid,three,validation,\n"
        "s3.mid,three,train,droq.nope=1\n"
        "s3.mid,three,train,batch_size\n")
    m = load_manifest(tmp_path / "m.csv", cfg)
    assert [(s.name, s.split, s.line) for s in m.songs] == [("s0", "train", 3), ("one", "eval", 4), ("two", "held-out", 5)]
    assert m.songs[1].cfg.droq.batch_size == 32
    assert m.songs[2].cfg.droq.batch_size == 16 and m.songs[2].cfg.env.four_fingers is True
    assert _problems(m) == [(6, "error", "split", None), (7, "error", "overrides", "three"), (8, "error", "overrides", None)]


def test_csv_needs_a_path_column(tmp_path, cfg):
    (tmp_path / "m.csv").write_text("file,name\na.mid,a\n")
    m = load_manifest(tmp_path / "m.csv", cfg)
    assert m.songs == [] and [(p.line, p.field) for p in m.errors] == [(1, "file"), (1, "path")]


def test_an_unclosed_quote_is_an_error_at_its_line_and_the_next_songs_still_load(tmp_path):
    for i, name in enumerate("abc"):
        _song(tmp_path / "midi" / f"{name}.mid", (60 + i,))
    (tmp_path / "m.csv").write_text('path,name,split\nmidi/a.mid,Air,train\nmidi/b.mid,"Bach 120,train\n'
                                    'midi/c.mid,"Chopin, Op. 9",eval\n')
    result = runner.invoke(app, ["manifest", "check", str(tmp_path / "m.csv")])
    assert result.exit_code == 1, result.output
    assert f"{tmp_path / 'm.csv'}:3: error: not a CSV row: unexpected end of data (a quote left open?" in result.output
    assert "2 songs, 2 units" in result.output and "Chopin, Op. 9" in result.output


def test_csv_rows_are_read_strictly(tmp_path, cfg):
    _song(tmp_path / "#1.mid", (60,))
    _song(tmp_path / "b.mid", (62,))
    (tmp_path / "m.csv").write_bytes(  # a BOM, CRLF line ends, as spreadsheets write them
        '\ufeffpath,name,overrides\r\n"#1.mid",one\r\nb.mid,"b" ,\r\nb.mid,bee,"{""droq.batch_size"": 8, '
        '""droq.batch_size"": 16}"\r\nb.mid,bee,droq.batch_size=8;droq.batch_size=16\r\n,,\r\nb.mid,bee\r\n'.encode())
    m = load_manifest(tmp_path / "m.csv", cfg)
    assert [(s.name, s.line) for s in m.songs] == [("one", 2), ("bee", 7)]
    assert [(p.line, p.field, p.message) for p in m.errors] == [
        (3, None, "not a CSV row: ',' expected after '\"'"),
        (4, "overrides", "overrides name 'droq.batch_size' twice"),
        (5, "overrides", "overrides name 'droq.batch_size' twice")]
    (tmp_path / "twice.csv").write_text("path,name,Name\nb.mid,a,b\n")
    m = load_manifest(tmp_path / "twice.csv", cfg)
    assert m.songs == [] and [(p.line, p.message) for p in m.errors] == [(1, "column 'name' named twice")]


def test_yaml_keys_written_twice_are_errors_and_no_song_is_lost(tmp_path, cfg):
    for i, name in enumerate("abc"):
        _song(tmp_path / f"{name}.mid", (60 + i,))
    (tmp_path / "m.yaml").write_text("\ufeffsongs:\n  - a.mid\n  - path: b.mid\n    split: eval\n    split: train\n"
                                     "  - path: c.mid\n    overrides: {droq.batch_size: 8, droq.batch_size: 16}\n"
                                     "songs:\n  - c.mid\n")
    m = load_manifest(tmp_path / "m.yaml", cfg)
    assert [(s.name, s.line) for s in m.songs] == [("a", 2), ("c", 9)]
    assert [(p.line, p.field) for p in m.errors] == [(5, "split"), (7, "droq.batch_size"), (8, "songs")]
    assert "'split' is also a key of this song at line 4; the song is left out" in m.errors[0].message


def test_yaml_values_pyyaml_cannot_build_cost_only_their_song(cfg):
    from orchestrator.manifest import parse_manifest

    bomb = "".join(f"      l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]\n" for i in range(1, 9))
    text = ("songs:\n  - a.mid\n  - {path: b.mid, name: 2024-13-01}\n  - {path: c.mid, overrides: &o {x.y: *o}}\n"
            "  - path: d.mid\n    overrides:\n      l0: &l0 [x, x, x, x, x, x, x, x, x, x]\n" + bomb + "  - e.mid\n")
    _, listed, problems = parse_manifest("m.yaml", cfg, text=text)  # returns at once: nothing is expanded
    assert [(s.entry.path, s.line) for s in listed] == [("a.mid", 2), ("e.mid", 16)]
    assert [(p.line, p.message) for p in problems] == [
        (3, "invalid YAML: month must be in 1..12"),
        (4, "overrides hold over 10,000 values once YAML aliases are expanded (or refer to themselves)"),
        (6, "overrides hold over 10,000 values once YAML aliases are expanded (or refer to themselves)")]
    for bad, line in [("songs:\n  - a.mid\n  - b\x1f.mid\n", 3), ("songs: [" * 3000, None),
                      ('songs:\n  - "\\U00110000"\n', 2)]:
        assert [p.line for p in parse_manifest("m.yaml", cfg, text=bad)[2]] == [line]


def test_unreadable_manifest_raises(tmp_path, cfg):
    with pytest.raises(ManifestError, match="nope.yaml: no such manifest"):
        load_manifest(tmp_path / "nope.yaml", cfg)
    (tmp_path / "m.txt").write_text("songs: []\n")
    with pytest.raises(ManifestError, match="m.txt: a manifest is a .yaml, .yml or .csv file"):
        load_manifest(tmp_path / "m.txt", cfg)


def test_demo_manifest_names_the_bundled_songs(tmp_path, cfg):
    path = demo_manifest(tmp_path / "demo")
    assert path == tmp_path / "demo" / "demo.yaml" and [p.name for p in path.parent.iterdir()] == ["demo.yaml"]
    m = load_manifest(path, cfg)
    assert m.problems == []
    assert [(s.name, s.split, len(s.plan.chunks)) for s in m.songs] == [("twinkle-twinkle", "train", 1), ("nocturne", "held-out", 2)]
    assert all(s.path.is_absolute() for s in m.songs) and len(m.units()) == 3


# --------------------------------------------------------------------------- CLI

runner = CliRunner()


def test_check_prints_songs_and_totals(tmp_path):
    path = demo_manifest(tmp_path)
    m = load_manifest(path, configs.load())
    result = runner.invoke(app, ["manifest", "check", str(path)])
    assert result.exit_code == 0, result.output
    for s in m.songs:
        assert s.name in result.output and s.song.content_hash[:12] in result.output
    assert "2 songs, 3 units" in result.output and "0 errors, 0 warnings" in result.output
    smaller = runner.invoke(app, ["manifest", "check", str(path), "--set", "env.chunk_steps=100", "--profile", "local"])
    assert smaller.exit_code == 0 and "2 songs, 9 units" in smaller.output


def test_check_fails_on_errors_and_names_file_and_line(tmp_path):
    _song(tmp_path / "a.mid")
    (tmp_path / "m.yaml").write_text("songs:\n  - a.mid\n  - path: gone.mid\n")
    result = runner.invoke(app, ["manifest", "check", str(tmp_path / "m.yaml")])
    assert result.exit_code == 1
    assert f"{tmp_path / 'm.yaml'}:3: error: [gone] path: " in result.output and "gone.mid: no such file" in result.output
    assert "1 songs, 1 units" in result.output


def test_check_passes_with_warnings_only(tmp_path):
    _song(tmp_path / "a.mid", drums=True)
    (tmp_path / "m.yaml").write_text("songs:\n  - a.mid\n")
    result = runner.invoke(app, ["manifest", "check", str(tmp_path / "m.yaml")])
    assert result.exit_code == 0 and "0 errors, 1 warning" in result.output


def test_check_reports_bad_config_and_missing_manifest(tmp_path):
    assert runner.invoke(app, ["manifest", "check", str(tmp_path / "none.yaml")]).exit_code == 2
    demo = demo_manifest(tmp_path)
    bad = runner.invoke(app, ["manifest", "check", str(demo), "--set", "env.nope=1"])
    assert bad.exit_code == 2 and "env.nope" in bad.output


def test_a_crafted_midi_is_an_error_naming_it_and_the_rest_goes_on(tmp_path):
    from env_fixtures import write_crafted_midi

    _song(tmp_path / "a.mid")
    write_crafted_midi(tmp_path / "crafted.mid")
    (tmp_path / "m.yaml").write_text("songs:\n  - crafted.mid\n  - a.mid\n")
    result = runner.invoke(app, ["manifest", "check", str(tmp_path / "m.yaml")])
    assert result.exit_code == 1, result.output
    assert f"{tmp_path / 'm.yaml'}:2: error: [crafted] path: " in result.output
    assert "crafted.mid: 1,398,101 s long" in result.output and "manifest.max_song_duration_s" in result.output
    assert "1 songs, 1 units" in result.output


def test_a_bad_set_value_names_the_set_option_not_the_profile(tmp_path):
    path = demo_manifest(tmp_path)
    result = runner.invoke(app, ["manifest", "check", str(path), "--set", "env.chunk_steps=many"])
    assert result.exit_code == 2
    assert "--set env.chunk_steps=many" in result.output and "env.chunk_steps" in result.output
    assert "profiles/local.yaml" not in result.output
