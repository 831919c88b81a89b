"""A tiny trained unit directory (20-step chunk, random-action training, 2 recorded rollouts),
made once per pytest run and shared by the render and play tests (no pytest fixtures here)."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

from typer.testing import CliRunner

from env_fixtures import TWINKLE

UNIT_ARGS = ["--steps", "30", "--warmup", "30", "--rollouts", "2", "--eval-every", "30", "--checkpoint-every", "30",
             "--set", "env.chunk_steps=20", "--set", "specialist.eval_episodes=1", "--no-progress"]


def tiny_unit(base: Path) -> Path:
    """``base/unit``: a finished unit with its lake shard, trained on first use."""
    from orchestrator.cli import app

    unit = base / "unit"
    if not (unit / "result.json").exists():
        with contextlib.redirect_stderr(io.StringIO()):
            result = CliRunner().invoke(app, ["specialist", "--song", str(TWINKLE), "--out", str(unit), *UNIT_ARGS])
        assert result.exit_code == 0, result.output
    return unit


def ffprobe(path: Path) -> dict:
    """ffprobe's streams of a media file, counting video frames exactly."""
    import json
    import subprocess

    out = subprocess.run(["ffprobe", "-v", "error", "-count_frames", "-show_entries",
                          "stream=codec_type,codec_name,width,height,nb_read_frames,duration,sample_rate",
                          "-of", "json", str(path)], capture_output=True, text=True, check=True).stdout
    return {s["codec_type"]: s for s in json.loads(out)["streams"]}
