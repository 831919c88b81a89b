"""Videos with sound of a unit's recorded rollouts: replayed from the lake through MuJoCo's
offscreen renderer, RoboPianist's synthesizer and ffmpeg; checked with ffprobe."""

from __future__ import annotations

import json
import os
import subprocess

import numpy as np
import pytest
from typer.testing import CliRunner

from unit_fixtures import ffprobe, tiny_unit


@pytest.fixture(scope="module")
def unit(tmp_path_factory):
    return tiny_unit(tmp_path_factory.getbasetemp())


def test_render_replays_the_best_recorded_rollout_with_sound(unit, tmp_path):
    from orchestrator.playback import render_unit, resolve_unit
    from workers.lake import Lake
    from workers.lake.episodes import read_episode

    view = resolve_unit(unit)
    best = read_episode(Lake(view.lake_root), view.shard())
    result = render_unit(view, tmp_path / "clip.mp4", width=96, height=64)

    assert result.seed == best.seed and result.steps == best.n_steps == 20
    # The replay from the lake's seed and actions plays exactly the recorded episode.
    assert result.f1 == pytest.approx(best.f1, abs=1e-9)
    streams = ffprobe(tmp_path / "clip.mp4")
    video, audio = streams["video"], streams["audio"]
    assert (video["codec_name"], video["width"], video["height"]) == ("h264", 96, 64)
    assert int(video["nb_read_frames"]) == result.frames == 20 + 20  # one per step, then 1 s of the last frame
    assert audio["codec_name"] == "aac" and int(audio["sample_rate"]) == 44100
    assert float(audio["duration"]) == pytest.approx(20 * 0.05 + 1.0, abs=0.05)


def test_render_cli_picks_a_recorded_seed(unit, tmp_path):
    from orchestrator.cli import app
    from orchestrator.playback import resolve_unit
    from workers.lake import Lake

    view = resolve_unit(unit)
    seeds = [ep.seed for ep in Lake(view.lake_root).read_episodes(view.shard())]
    assert len(seeds) == 2
    out = tmp_path / "seed.mp4"
    result = CliRunner().invoke(app, ["render", str(unit), "--out", str(out), "--seed", str(seeds[1]),
                                      "--width", "64", "--height", "48", "--max-steps", "5"])
    assert result.exit_code == 0, result.output
    assert f"seed {seeds[1]}" in result.output and "25 frames 64x48" in result.output
    assert int(ffprobe(out)["video"]["nb_read_frames"]) == 5 + 20

    missing = CliRunner().invoke(app, ["render", str(unit), "--out", str(out), "--seed", "7"])
    assert missing.exit_code == 1 and "no episode with seed 7" in missing.output


def test_gl_backend_falls_back_to_osmesa(monkeypatch):
    from workers.piano import render

    monkeypatch.setenv("MUJOCO_GL", "no-such-backend")
    assert render.gl_backend() == "osmesa"
    assert os.environ["MUJOCO_GL"] == "no-such-backend"  # the choice is passed to the child, not set here


def test_dashboard_serves_the_best_rollouts_video_made_once(unit, tmp_path):
    """A campaign holding the tiny unit: the page shows the video beside the audio, and
    /video/<unit>.mp4 renders it on the first request and serves the cached file after."""
    import shutil
    import urllib.request

    import yaml

    from dashboards.app import DashboardServer
    from dashboards.data import Campaign
    from orchestrator.playback import resolve_unit
    from orchestrator.store import CampaignStore

    view = resolve_unit(unit)
    campaign = tmp_path / "camp"
    (campaign / "units" / view.spec.unit_id).mkdir(parents=True)  # the store, not unit.json, says what it is
    shutil.copytree(view.lake_root, campaign / "lake")
    (campaign / "config.yaml").write_text(yaml.safe_dump(view.cfg.to_dict()))
    with CampaignStore(campaign / "campaign.db") as store:
        store.put_config(view.cfg.to_dict(), "k")
        store.add_units([view.spec], "k")

    camp = Campaign(campaign)
    focus = camp.focus(view.spec.unit_id)
    with DashboardServer(camp, port=0) as url:
        page = urllib.request.urlopen(f"{url}/?unit={view.spec.unit_id}", timeout=60).read().decode()
        assert f'src="/video/{view.spec.unit_id}.mp4"' in page and 'id="rollout-audio"' in page
        with urllib.request.urlopen(f"{url}/video/{view.spec.unit_id}.mp4", timeout=600) as response:
            assert response.headers["Content-Type"] == "video/mp4"
            first = response.read()
        made = camp.video_path(focus).stat().st_mtime_ns
        second = urllib.request.urlopen(f"{url}/video/{view.spec.unit_id}.mp4", timeout=60).read()
        # The video's poster frame was made with it, and is served as a PNG.
        assert f'poster="/poster/{view.spec.unit_id}.png"' in page and camp.poster_path(focus).exists()
        with urllib.request.urlopen(f"{url}/poster/{view.spec.unit_id}.png", timeout=60) as response:
            assert response.headers["Content-Type"] == "image/png" and response.read()[:8] == b"\x89PNG\r\n\x1a\n"
    assert first == second and camp.video_path(focus).stat().st_mtime_ns == made
    streams = ffprobe(camp.video_path(focus))
    assert int(streams["video"]["nb_read_frames"]) == focus.n_steps + 20 and "audio" in streams


def test_render_writes_the_container_its_extension_names_and_refuses_others(unit, tmp_path):
    from orchestrator.cli import app

    out = tmp_path / "clip.avi"
    result = CliRunner().invoke(app, ["render", str(unit), "--out", str(out), "--width", "64", "--height", "48",
                                      "--max-steps", "3"])
    assert result.exit_code == 0, result.output
    probe = subprocess.run(["ffprobe", "-v", "error", "-show_entries", "format=format_name:stream=codec_name", "-of",
                            "json", str(out)], capture_output=True, text=True, check=True)
    info = json.loads(probe.stdout)
    assert info["format"]["format_name"] == "avi"
    assert sorted(s["codec_name"] for s in info["streams"]) == ["mp3", "mpeg4"]
    refused = CliRunner().invoke(app, ["render", str(unit), "--out", str(tmp_path / "clip.gif")])
    assert refused.exit_code == 1 and "cannot write a .gif" in refused.output and ".webm" in refused.output
    assert not (tmp_path / "clip.gif").exists()


@pytest.fixture(scope="module")
def piano_view():
    from env_fixtures import chord_song, env_config
    from workers.piano.env import make_env
    from workers.piano.view import PianoView

    env = make_env(chord_song(), env_config())
    yield env, PianoView(env, 320, 240)
    env.close()


def _pixels(frame: np.ndarray, colour: str) -> np.ndarray:
    """bool [h, w]: pixels whose hue is clearly the key colour's (shading changes brightness only)."""
    rgb = frame.astype(np.int32)
    main = {"right": 1, "wrong": 0, "missed": 2}[colour]
    others = [c for c in range(3) if c != main]
    return (rgb[..., main] > 80) & np.all(rgb[..., [main]] > 1.4 * rgb[..., others], axis=-1)


def test_frames_colour_right_wrong_and_missed_keys(piano_view):
    """A pressed target key is green, a key pressed that should not sound red, a target not pressed
    blue, each where the camera sees that key; the scene without them has none of these colours."""
    env, view = piano_view
    env.reset(seed=0)
    keys = {"right": 8, "wrong": 84, "missed": 20}  # far from the hands, which rest over the middle
    pressed, target = np.zeros(88, bool), np.zeros(88, bool)
    pressed[[keys["right"], keys["wrong"]]] = True
    target[[keys["right"], keys["missed"]]] = True
    frame = view.frame(pressed, target)
    assert frame.shape == (240, 320, 3)
    centres = np.c_[env.environment.physics.data.geom_xpos[view.key_geoms], np.ones(88)] @ view.camera.matrix.T
    columns = (centres[:, 0] / centres[:, 2]).astype(int)  # where this frame's camera sees each key
    plain = view.frame()
    for colour, key in keys.items():
        mask = _pixels(frame, colour)
        assert mask.sum() > 20, colour
        assert not _pixels(plain, colour).any(), colour
        assert abs(np.median(np.nonzero(mask)[1]) - columns[key]) < 8, (colour, key)  # on that key
