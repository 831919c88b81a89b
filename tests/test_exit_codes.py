"""Every command exits with the status of the table in docs/faults.md (``cli.ExitCode``): the same error, the same status."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from orchestrator.cli import ExitCode, app

BAD_SET = ["--set", "env.n_steps_lookahead=5"]


@pytest.fixture(scope="module")
def where(tmp_path_factory):
    d = tmp_path_factory.mktemp("exit-codes")
    (d / "songs.yaml").write_text("songs:\n  - path: missing.mid\n")
    (d / "song.mid").write_bytes(b"MThd not really")
    (d / "not-a-lake").mkdir()
    (d / "campaigns").mkdir()
    return d


def _cases(d: Path) -> list[tuple[str, list[str], ExitCode]]:
    lake = str(d / "not-a-lake")
    return [
        # a bad --set: 2 in every command that takes one
        ("bad --set", ["manifest", "check", str(d / "songs.yaml"), *BAD_SET], ExitCode.BAD_INPUT),
        ("bad --set", ["submit", str(d / "songs.yaml"), "--root", str(d / "campaigns"), *BAD_SET], ExitCode.BAD_INPUT),
        ("bad --set", ["specialist", "--song", str(d / "song.mid"), "--out", str(d / "unit"), *BAD_SET], ExitCode.BAD_INPUT),
        ("bad --set", ["demo", "--root", str(d / "campaigns"), *BAD_SET], ExitCode.BAD_INPUT),
        ("bad --set", ["train-il", "--lake", lake, *BAD_SET], ExitCode.BAD_INPUT),
        ("bad --set", ["eval", lake, "--songs", str(d / "song.mid"), *BAD_SET], ExitCode.BAD_INPUT),
        ("bad --set", ["render", "--policy", str(d / "song.mid"), "--song", str(d / "song.mid"), "--out",
                       str(d / "x.mp4"), *BAD_SET], ExitCode.BAD_INPUT),
        # a missing manifest: 2
        ("missing manifest", ["manifest", "check", str(d / "nope.yaml")], ExitCode.BAD_INPUT),
        ("missing manifest", ["submit", str(d / "nope.yaml")], ExitCode.BAD_INPUT),
        ("missing manifest", ["eval", lake, "--songs", str(d / "nope.yaml")], ExitCode.BAD_INPUT),
        # a manifest whose entries have errors: the check found them
        ("manifest errors", ["manifest", "check", str(d / "songs.yaml")], ExitCode.FAILED),
        # a missing campaign: 2
        ("missing campaign", ["resume", "nope", "--root", str(d / "campaigns")], ExitCode.BAD_INPUT),
        ("missing campaign", ["status", "nope", "--root", str(d / "campaigns")], ExitCode.BAD_INPUT),
        ("missing campaign", ["dashboard", "nope", "--root", str(d / "campaigns")], ExitCode.BAD_INPUT),
        ("missing campaign", ["mlflow", "sync", "nope", "--root", str(d / "campaigns")], ExitCode.BAD_INPUT),
        # resume told to change what it does not apply: 2
        ("resume --set not applied", ["resume", "nope", "--root", str(d / "campaigns"),
                                      "--set", "specialist.total_steps=10"], ExitCode.BAD_INPUT),
        # a folder that is not a lake: 2
        ("not a lake", ["lake", "list", lake], ExitCode.BAD_INPUT),
        ("not a lake", ["lake", "verify", lake], ExitCode.BAD_INPUT),
        ("not a lake", ["lake", "export", lake, "--out", str(d / "export")], ExitCode.BAD_INPUT),
        ("not a lake", ["train-il", "--lake", lake], ExitCode.BAD_INPUT),
        # a missing unit: 2
        ("missing unit", ["export-policy", str(d / "nounit"), "--out", str(d / "p.pt")], ExitCode.BAD_INPUT),
        ("missing unit", ["render", str(d / "nounit"), "--out", str(d / "x.mp4")], ExitCode.BAD_INPUT),
        ("missing unit", ["play", str(d / "nounit")], ExitCode.BAD_INPUT),
        # an unusable song: 2
        ("bad song", ["specialist", "--song", str(d / "song.mid"), "--out", str(d / "unit")], ExitCode.BAD_INPUT),
    ]


def test_each_command_gives_each_kind_of_error_its_one_exit_status(where):
    wrong = []
    for kind, args, code in _cases(where):
        out = CliRunner().invoke(app, args)
        if out.exit_code != code or (code != ExitCode.OK and "error" not in out.output.lower()):
            wrong.append(f"{kind}: pianoforge {' '.join(args[:2])} exited {out.exit_code}, expected {int(code)}: "
                         f"{out.output[-300:]}")
    assert not wrong, "\n".join(wrong)


def test_a_folder_that_is_not_a_lake_is_named_not_listed_as_empty(where):
    out = CliRunner().invoke(app, ["lake", "list", str(where / "not-a-lake")])
    assert f"{where / 'not-a-lake'}: not a trajectory lake" in out.output and "0 shards" not in out.output


def test_counts_are_pluralised(where):
    (where / "one.yaml").write_text("songs:\n  - path: missing.mid\n")
    out = CliRunner().invoke(app, ["manifest", "check", str(where / "one.yaml")])
    assert "1 error," in out.output and "1 errors" not in out.output


def test_a_damaged_checkpoint_is_called_damaged_by_export_policy_and_play(where):
    import configs
    from orchestrator.playback import write_unit_file
    from workers.units import UnitSpec

    unit_dir = where / "damaged-unit"
    unit_dir.mkdir()
    spec = UnitSpec.create(song_path=str(where / "song.mid"), song_hash="ab" * 32, song_name="song", chunk_index=0,
                           config_hash="cfg00000")
    write_unit_file(unit_dir, spec, configs.load(), unit_dir / "lake")
    (unit_dir / "checkpoint.pt").write_bytes(b"PK\x03\x04 truncated")
    for args in (["export-policy", str(unit_dir), "--out", str(where / "p.pt")], ["play", str(unit_dir)]):
        out = CliRunner().invoke(app, args)
        assert out.exit_code == ExitCode.BAD_INPUT, out.output
        assert "checkpoint is damaged" in out.output and "checkpoint.pt" in out.output, out.output
        assert "starting from scratch" not in out.output and "no checkpoint.pt" not in out.output


def _command_paths(group, prefix=()):
    for name, sub in group.commands.items():
        if hasattr(sub, "commands"):
            yield from _command_paths(sub, prefix + (name,))
        else:
            yield prefix + (name,)


def test_usage_lines_name_arguments_plainly_and_flags_take_no_value():
    import typer

    paths = list(_command_paths(typer.main.get_command(app)))
    assert ("submit",) in paths and ("lake", "list") in paths
    for path in [()] + paths:
        out = CliRunner().invoke(app, [*path, "--help"], terminal_width=200)
        assert out.exit_code == 0, out.output
        usage = next(line for line in out.output.splitlines() if "Usage:" in line)
        assert "{" not in usage and "<bool>" not in out.output, f"pianoforge {' '.join(path)}: {out.output}"
    submit_usage = CliRunner().invoke(app, ["submit", "--help"]).output
    assert "Usage: pianoforge submit [OPTIONS] MANIFEST" in submit_usage


def test_logging_an_evaluation_prints_no_third_party_deprecation_warning(tmp_path):
    import subprocess
    import sys

    code = ("from workers.imitation.evaluate import EvalRow, log_to_mlflow; "
            "row = EvalRow('flow', 'seen', 'song', 'ab', 1, 1, 50, 0.5, 0.5, 0.5); "
            f"log_to_mlflow([row], 'sqlite:///{tmp_path}/mlflow.db', 'eval')")
    done = subprocess.run([sys.executable, "-W", "default", "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "DeprecationWarning" not in done.stderr, done.stderr
