"""The campaign dashboard: numbers from the store, lake and MLflow; a page a real browser shows.

Campaign directories are written with the store's, the lake's and MLflow's own APIs (the same
calls the driver makes), so the dashboard is tested against real files. Browser tests run
Debian's chromium headless through Playwright and save screenshots to the test's tmp dir and
to ``tests/artifacts/``.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
import urllib.request
import wave
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

import configs
from dashboards import audio, timeline
from dashboards.app import FIGURE_IDS
from dashboards.data import Campaign, find_campaign, read_store
from dashboards.fingering import finger_key_counts, key_press_points
from dashboards.data import summary as page_summary
from dashboards.timeline import StateChange
from orchestrator.store import GATED, SUCCEEDED, CampaignStore
from workers.lake import Lake, ShardMeta, synthetic_episode
from workers.units import UnitResult, UnitSpec

ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
CHROMIUM = "/usr/bin/chromium"

# (song, chunk, F1 or "fail" or None = left pending/running): the finished campaign.
PLAN = [("Fur Elise", 0, 0.91), ("Fur Elise", 1, 0.82), ("Fur Elise", 2, 0.55), ("Twinkle", 0, 0.97),
        ("Twinkle", 1, 0.78), ("Twinkle", 2, "fail"), ("Nocturne", 0, 0.32), ("Nocturne", 1, 0.88)]
STEPS_PER_EPISODE = 40
EPISODES = 3


def _cfg() -> configs.Config:
    return configs.load(overrides=["gate.min_shards=4", "campaign.workload=synthetic"])


def _spec(song: str, chunk: int, cfg: configs.Config) -> UnitSpec:
    song_hash = hashlib.sha256(song.encode()).hexdigest()
    return UnitSpec.create(f"/songs/{song}.mid", song_hash, song, chunk, cfg.hash("env", "droq", "specialist"))


def _episodes(seed: int, f1: float) -> list:
    """Synthetic episodes whose fingertips hover over the keys to press (so OT fingering has
    something to match), the best one (highest F1) last."""
    points = key_press_points()
    eps = []
    for k in range(EPISODES):
        ep = synthetic_episode(STEPS_PER_EPISODE, seed=seed + k, f1=max(0.0, f1 - 0.1 * (EPISODES - 1 - k)))
        # The fingertips after step t's action (obs[t + 1]) over the keys of step t.
        ep.obs[1:, 1068:1098] = _fingertips_over(ep.target[:-1], points)
        ep.obs[:, 1067] = 0.0  # sustain pedal up
        eps.append(ep)
    return eps


def _fingertips_over(target: np.ndarray, points: np.ndarray) -> np.ndarray:
    """(T, 30) fingertip positions: finger i of the step's sorted target keys sits 2 mm above
    key i; the unused fingers wait far away."""
    tips = np.tile(np.array([0.0, 0.0, 1.0]), (len(target), 10, 1)) + np.arange(10)[None, :, None] * 0.05
    for t in range(len(target)):
        for i, key in enumerate(np.flatnonzero(target[t])[:10]):
            tips[t, i] = points[key] + np.array([0.0, 0.0, 0.002])
    return tips.reshape(len(target), 30).astype(np.float32)


def make_campaign(root: Path, name: str, finished: bool = True, mlflow_runs: bool = True,
                  tracking_uri: str | None = None, imitation: bool = True) -> Path:
    """A campaign directory written through the store, lake and MLflow APIs. Finished: every
    unit of PLAN ends (one failed after 3 attempts), and (``imitation``) the gate's imitation job
    ran and was evaluated. In progress: the first 4 end, one runs, the rest are pending.
    ``tracking_uri``: a tracking server other campaigns may share (default: the campaign's own file)."""
    from mlflow.tracking import MlflowClient

    cfg = _cfg()
    directory = root / name
    (directory / "units").mkdir(parents=True)
    (directory / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    lake = Lake(directory / "lake", cfg.lake)
    uri = tracking_uri or f"sqlite:///{directory / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment_id = client.create_experiment(name)
    with CampaignStore(directory / "campaign.db") as store:
        store.set_meta("name", name)
        store.set_meta("tracking_uri", uri)
        store.set_meta("mlflow_experiment_id", experiment_id)
        config_key = store.put_config(cfg.to_dict(), cfg.hash())
        specs = [_spec(song, chunk, cfg) for song, chunk, _ in PLAN]
        store.add_units(specs, config_key)
        n_done = len(PLAN) if finished else 4
        for i, (spec, (_, _, outcome)) in enumerate(zip(specs, PLAN)):
            if i > n_done:
                break
            store.mark_running(spec.unit_id)
            store.note_worker(spec.unit_id, f"node-{i % 2}", None, 1000 + i, None)
            if mlflow_runs:
                run = client.create_run(experiment_id, run_name=spec.unit_id)
                store.set_mlflow_run(spec.unit_id, run.info.run_id)
                target = 0.5 if outcome == "fail" else outcome
                for step in range(0, 5001, 1000):
                    client.log_metric(run.info.run_id, "eval/f1", target * step / 5000, step=step)
                    client.log_metric(run.info.run_id, "train/return", 100 * target * step / 5000, step=step)
            if i == n_done:  # the in-progress campaign's running unit
                break
            time.sleep(0.01)  # distinct event times, as a real campaign has
            if outcome == "fail":
                for attempt in range(3):
                    err = (f"Traceback (most recent call last):\n  File \"workers/specialist.py\", line 80\n"
                           f"FloatingPointError: NaN in critic loss (attempt {attempt + 1})")
                    store.mark_attempt_failed(spec.unit_id, err, retry=attempt < 2)
                    if attempt < 2:
                        store.mark_running(spec.unit_id)
                continue
            episodes = _episodes(seed=100 * i, f1=outcome)
            meta = ShardMeta(spec.unit_id, spec.song_hash, spec.song_name, spec.chunk_index, spec.split,
                             spec.config_hash, outcome)
            shard = lake.commit_shard(meta, episodes)
            result = UnitResult(unit_id=spec.unit_id, f1=outcome, precision=outcome, recall=outcome,
                                episode_return=1.0, steps=5000, shard_path=str(shard.path), seconds=12.5 + i)
            store.mark_finished(spec.unit_id, result, SUCCEEDED if outcome >= cfg.gate.f1_threshold else GATED)
    if finished and mlflow_runs and imitation:  # the gate opened: an imitation job ran, as the trainer logs it
        from workers.tracking import ensure_experiment

        il_experiment = ensure_experiment(client, "pianoforge-il")
        run = client.create_run(il_experiment, run_name="il-flow", tags={"pianoforge.kind": "imitation"})
        for step in range(0, 1000, 100):
            client.log_metric(run.info.run_id, "train/loss", 2.0 / (1 + step / 100), step=step)
        for step in (300, 600, 900):
            client.log_metric(run.info.run_id, "eval/f1", step / 1000, step=step)
        # ... and `pianoforge eval` logged its evaluation (RP1M table II: seen vs held-out songs).
        from workers.imitation.evaluate import MEAN, EvalRow, log_to_mlflow

        rows = [EvalRow("flow", group, song, "", 1, 1, 550, f1, f1, f1)
                for group, song, f1 in [("seen", "Twinkle", 0.81), ("seen", MEAN, 0.8), ("held-out", MEAN, 0.45)]]
        eval_run = log_to_mlflow(rows, uri, name, run_name="eval-flow")
        # The driver records the job's run in its launch record; the demo its evaluation's.
        from orchestrator.gate import LAUNCHES_KEY, record_evaluation, record_il_run

        with CampaignStore(directory / "campaign.db") as store:
            store.set_meta(LAUNCHES_KEY, [{"n": 1, "state": "succeeded", "passing": 5, "out_dir": str(directory / "il")}])
            record_il_run(store, str(directory / "il"), run.info.run_id)
            record_evaluation(store, str(directory / "il"), eval_run)
    return directory


@pytest.fixture(scope="module")
def finished_campaign(tmp_path_factory) -> Path:
    return make_campaign(tmp_path_factory.mktemp("campaigns"), "demo")


# --------------------------------------------------------------------------------------------
# Numbers without a browser
# --------------------------------------------------------------------------------------------


def test_states_over_time_replays_transitions():
    changes = [StateChange(0, "a", "pending"), StateChange(0, "b", "pending"), StateChange(1, "a", "running"),
               StateChange(2, "a", "pending"), StateChange(3, "a", "running"), StateChange(4, "a", "succeeded"),
               StateChange(5, "b", "running"), StateChange(6, "b", "failed")]
    times, counts = timeline.states_over_time(changes, now=10)
    assert times == [0, 1, 2, 3, 4, 5, 6, 10]
    assert counts["pending"] == [2, 1, 2, 1, 1, 0, 0, 0]
    assert counts["running"] == [0, 1, 0, 1, 0, 1, 0, 0]
    assert counts["succeeded"] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert counts["failed"][-1] == 1
    # Every instant accounts for every unit seen so far.
    assert all(sum(c[i] for c in counts.values()) == 2 for i in range(len(times)))
    # A retried unit finishes once, at its last end.
    assert timeline.finish_times(changes) == [4, 6]


def test_throughput_and_eta():
    from orchestrator.status import throughput_eta

    done = [100.0, 200.0, 300.0, 400.0]
    # 4 units in the last 400 s -> 36 per hour; 9 left -> 15 minutes.
    rate, eta = throughput_eta(done, start=0.0, now=400.0, remaining=9, window_s=600.0)
    assert rate == pytest.approx(36.0) and eta == pytest.approx(900.0)
    assert throughput_eta([], 0.0, 400.0, 0, 600.0) == (None, 0.0) and throughput_eta([], 0.0, 400.0, 3, 600.0) == (None, None)
    # Only the window counts when the campaign is older than it.
    assert throughput_eta(done, 0.0, 400.0, 1, window_s=150.0)[0] == pytest.approx(2 / 150 * 3600)
    # Nothing left: the rate is measured up to the last end, not up to now.
    assert throughput_eta(done, 0.0, 10_000.0, 0, 600.0) == (pytest.approx(36.0), 0.0)
    edges, counts = timeline.throughput_bins(done, 0.0, 400.0, n_bins=4)
    assert sum(counts) == 4 and len(edges) == 5


def test_status_and_dashboard_show_the_same_throughput_and_eta(tmp_path, monkeypatch):
    """One campaign in progress, read by `pianoforge status` and by the dashboard at the same
    moment: the same numbers (they once used different windows and end states)."""
    from orchestrator.status import read_status

    directory = make_campaign(tmp_path, "midway", finished=False, mlflow_runs=False)
    now = time.time() + 30.0
    monkeypatch.setattr(time, "time", lambda: now)
    status = read_status(directory)
    summary = page_summary(Campaign(directory).snapshot(full=False), _cfg().dashboard)
    assert status.throughput_per_hour and status.eta_s
    assert (summary["throughput_per_hour"], summary["eta_s"]) == (pytest.approx(status.throughput_per_hour),
                                                                  pytest.approx(status.eta_s))


def test_finger_key_counts_find_the_finger_on_each_key():
    points = key_press_points()
    assert points.shape == (88, 3)
    assert np.all(np.diff(points[:, 1]) != 0)  # keys spread along the keyboard
    target = np.zeros((3, 88), dtype=bool)
    target[0, [39, 43, 46]] = True  # a C major chord
    target[1, 60] = True
    fingertips = _fingertips_over(target, points)
    counts = finger_key_counts(fingertips, target)
    assert counts.shape == (10, 88)
    assert counts.sum() == 4  # one match per key to press; nothing at the silent step
    assert counts[0, 39] == counts[1, 43] == counts[2, 46] == counts[0, 60] == 1


def test_fingering_from_the_lake_is_the_environments_ot_assignment():
    """Replay a RoboPianist rollout the way the specialist records it: the dashboard's counts
    from the recorded ``ot_fingering`` (every step), and re-run from the stored observations for
    a shard without it (every step but the last), equal the env's own ``info["ot_assignment"]``."""
    from robopianist import music

    from dashboards.fingering import RE_RUN, RECORDED, episode_finger_key_counts
    from workers.piano.env import make_env
    from workers.piano.layout import fingering_row
    from workers.lake import Episode

    cfg = configs.load()
    midi = music.load("TwinkleTwinkleRousseau").trim_silence().stretch(cfg.env.stretch_factor)
    env = make_env(midi, cfg.env, seed=0)
    rng = np.random.default_rng(0)
    (obs, _), observations, targets, expected = env.reset(), [], [], np.zeros((10, 88), dtype=np.int64)
    fingering = []
    for _ in range(40):
        observations.append(obs)
        obs, _, terminated, truncated, info = env.step(rng.uniform(env.action_low, env.action_high))
        done = terminated or truncated
        targets.append(info["target"])
        fingering.append(fingering_row(info["ot_assignment"]))
        for finger, key in info["ot_assignment"]:
            expected[finger, key] += 1
        if done:
            break
    n = len(targets)
    episode = Episode(seed=0, obs=np.stack(observations), action=np.zeros((n, 39), np.float32),
                      reward=np.zeros(n, np.float32), pressed=np.zeros((n, 88), bool), target=np.stack(targets),
                      episode_return=0.0, precision=1.0, recall=1.0, f1=1.0, ot_fingering=np.stack(fingering))
    assert expected.sum() > 20
    assert [x.tolist() for x in episode_finger_key_counts(episode)[0]] == expected.tolist()
    assert episode_finger_key_counts(episode)[1] == RECORDED
    for finger, key in info["ot_assignment"]:  # the re-run misses the last step: its next obs is not stored
        expected[finger, key] -= 1
    episode.ot_fingering = None  # as read from a shard of schema version 1
    got, how = episode_finger_key_counts(episode)
    np.testing.assert_array_equal(got, expected)
    assert how == RE_RUN


def test_focus_fingering_comes_from_the_recorded_column_without_mujoco(tmp_path, monkeypatch):
    """A shard with ``ot_fingering``: the focus unit's counts are that column's, and neither the
    OT re-run nor the piano model (MuJoCo) is touched; a shard without it is re-run."""
    from dashboards import fingering

    cfg = _cfg()
    directory = tmp_path / "c"
    directory.mkdir()
    (directory / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    spec = _spec("Twinkle", 0, cfg)
    with CampaignStore(directory / "campaign.db") as store:
        store.add_units([spec], store.put_config(cfg.to_dict(), cfg.hash()))
    episode = synthetic_episode(6, seed=0, f1=0.9)
    episode.ot_fingering = np.full((6, 10), -1, np.int8)
    episode.ot_fingering[:, 0] = 40  # the right thumb on key 40 throughout
    episode.ot_fingering[2:4, 6] = 45  # the left index on key 45 for two steps
    meta = ShardMeta(spec.unit_id, spec.song_hash, spec.song_name, 0, spec.split, spec.config_hash, 0.9)
    Lake(directory / "lake", cfg.lake).commit_shard(meta, [episode])

    def no_re_run(*args, **kwargs):
        raise AssertionError("the OT fingering was re-run although the shard records it")

    monkeypatch.setattr(fingering, "finger_key_counts", no_re_run)
    monkeypatch.setattr(fingering, "key_press_points", no_re_run)
    focus = Campaign(directory).focus(spec.unit_id)
    expected = np.zeros((10, 88), np.int64)
    expected[0, 40], expected[6, 45] = 6, 2
    np.testing.assert_array_equal(focus.finger_key, expected)
    assert focus.how == fingering.RECORDED

    old = Lake(tmp_path / "old-lake", cfg.lake.model_copy(update={"schema_version": 1}))
    shard = old.commit_shard(meta, [episode])
    with pytest.raises(AssertionError, match="re-run"):  # no column in a version 1 shard: the re-run it is
        fingering.episode_finger_key_counts(fingering.best_episode(old, shard))


def test_snapshot_reads_store_lake_and_mlflow(finished_campaign):
    s = Campaign(finished_campaign).snapshot()
    counts = timeline.state_counts(u.state for u in s.units)
    f1s = [f for _, _, f in PLAN if f != "fail"]
    assert counts == {"pending": 0, "running": 0, "succeeded": sum(f >= 0.75 for f in f1s),
                      "gated": sum(f < 0.75 for f in f1s), "failed": 1}
    failed = [u for u in s.units if u.state == "failed"]
    assert failed[0].attempts == 3 and "NaN in critic loss (attempt 3)" in failed[0].error
    # The key histogram equals the pressed keys counted straight from the Parquet files.
    expected = np.zeros(88, dtype=np.int64)
    n_rows = 0
    for path in (finished_campaign / "lake" / "data").rglob("*.parquet"):
        pressed = pq.read_table(path, columns=["pressed"]).column("pressed").to_pylist()
        n_rows += len(pressed)
        for keys in pressed:
            expected[keys] += 1
    assert s.key_counts.tolist() == expected.tolist() and s.lake_steps == n_rows == len(f1s) * EPISODES * STEPS_PER_EPISODE
    assert s.gate.passing == sum(f >= 0.75 for f in f1s) and s.gate.needed == 4
    # Learning curves of the best units by default, from their MLflow runs.
    best = sorted((u for u in s.units if u.f1 is not None), key=lambda u: -u.f1)[:5]
    assert list(s.curves) == [u.unit_id for u in best]
    steps, values = s.curves[best[0].unit_id]["eval/f1"]
    assert steps == [0, 1000, 2000, 3000, 4000, 5000] and values[-1] == pytest.approx(0.97)
    assert all(u.run_link and u.mlflow_run_id in u.run_link for u in s.units if u.mlflow_run_id)
    # The focus is the best unit's best episode (the last one written, F1 0.97).
    assert s.focus.unit_id == best[0].unit_id and s.focus.f1 == pytest.approx(0.97)
    # Fingering: one finger per key to press at every step of that rollout.
    target = _target_of_best(finished_campaign, s)
    assert s.focus.finger_key.sum() == sum(min(10, int(row.sum())) for row in target[:-1])


def _target_of_best(campaign_dir: Path, s) -> np.ndarray:
    lake = Lake(campaign_dir / "lake")
    shard = next(x for x in lake.shards() if x.unit_id == s.focus.unit_id)
    return max(lake.read_episodes(shard), key=lambda e: e.f1).target


def test_rollout_wav_is_nonsilent_and_as_long_as_the_rollout(finished_campaign, tmp_path):
    campaign = Campaign(finished_campaign)
    focus = campaign.snapshot().focus
    path = campaign.render_audio(focus)
    with wave.open(str(path)) as w:
        rate, frames = w.getframerate(), w.getnframes()
        samples = np.frombuffer(w.readframes(frames), dtype="<i2").astype(np.float64)
    dt = campaign.cfg.env.control_timestep
    assert w.getnchannels() == 1 and rate == 44100
    assert frames == round((focus.n_steps * dt + audio.TAIL_S) * rate)
    first = int(np.flatnonzero(focus.pressed.any(axis=1))[0])
    onset = int(first * dt * rate)
    assert np.sqrt(np.mean(samples[onset:onset + rate // 2] ** 2)) > 500  # audible while keys are down
    if first > 0:
        assert np.abs(samples[:onset]).max() == 0  # silent before the first key goes down


def test_synthesize_silent_and_repeated_presses():
    silent = audio.synthesize(np.zeros((20, 88), dtype=bool), 0.05)
    assert silent.shape == (round((20 * 0.05 + audio.TAIL_S) * 44100),) and not silent.any()
    pressed = np.zeros((6, 88), dtype=bool)
    pressed[[0, 1, 3, 4], 40] = True  # the same key struck twice
    events = audio.rollout_events(pressed, 0.05)
    kinds = [(type(e).__name__, round(e.time, 3)) for e in events]
    assert kinds == [("NoteOn", 0.0), ("NoteOff", 0.1), ("NoteOn", 0.15), ("NoteOff", 0.25)]


def test_page_of_a_campaign_with_only_a_store(tmp_path):
    """Right after submit: units pending, no lake, no MLflow, no config.yaml yet."""
    from dashboards.app import render_page

    cfg = _cfg()
    (tmp_path / "new").mkdir()
    with CampaignStore(tmp_path / "new" / "campaign.db") as store:
        store.add_units([_spec("Twinkle", c, cfg) for c in range(3)], store.put_config(cfg.to_dict(), cfg.hash()))
    campaign = Campaign(tmp_path / "new")
    s = campaign.snapshot()
    html = render_page(s, campaign, live=True)
    assert s.focus is None and s.curves == {} and s.lake_shards == 0 and s.key_counts.sum() == 0
    assert 'id="n-pending">3<' in html and 'class="badge waiting"' in html
    assert 'id="steps-saved"' not in html and page_summary(s, cfg.dashboard)["budgets"] is None
    assert any("config.yaml not found" in p for p in s.problems)
    assert not (tmp_path / "new" / "mlflow.db").exists() and not (tmp_path / "new" / "lake").exists()


def test_page_shows_why_units_stopped_and_the_steps_saved(tmp_path):
    """F1-driven budgets: each finished unit's stop reason and step, and the steps saved overall."""
    from dashboards.app import render_page

    cfg = _cfg()
    (tmp_path / "budgets").mkdir()
    specs = [_spec("Twinkle", c, cfg) for c in range(3)]
    with CampaignStore(tmp_path / "budgets" / "campaign.db") as store:
        store.add_units(specs, store.put_config(cfg.to_dict(), cfg.hash()))
        for spec, (reason, steps) in zip(specs, [("target", 2_000_000), ("plateau", 1_000_000)]):
            store.mark_running(spec.unit_id)
            store.mark_finished(spec.unit_id, UnitResult(
                unit_id=spec.unit_id, f1=0.8, precision=0.8, recall=0.8, episode_return=1.0, steps=steps,
                shard_path=None, seconds=10.0, eval_seconds=0.5, stop_reason=reason, stop_step=steps,
                budget_steps=8_000_000), SUCCEEDED)
    campaign = Campaign(tmp_path / "budgets")
    s = campaign.snapshot()
    shown = page_summary(s, cfg.dashboard)["budgets"]
    assert (shown["saved_steps"], shown["reasons"], shown["units"]) == (13_000_000, {"target": 1, "plateau": 1}, 2)
    html = render_page(s, campaign, live=True)
    assert 'id="steps-saved">13.00M (81%)<' in html
    assert "stopped by: target 1, plateau 1, budget 0, cap 0" in html and "evaluation: 5.0% of worker time" in html
    assert "<td>target at 2.00M</td>" in html and "<td>plateau at 1.00M</td>" in html
    assert page_summary(Campaign(tmp_path / "budgets").snapshot(full=False), cfg.dashboard)["budgets"] is not None


def _get(port: int, path: str, host: str | None) -> tuple[int, bytes]:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.putrequest("GET", path, skip_host=True)
        if host is not None:
            conn.putheader("Host", host)
        conn.endheaders()
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def test_requests_for_another_host_are_refused(tmp_path):
    """DNS rebinding: a page on evil.example whose name now resolves to 127.0.0.1 must not read the dashboard."""
    from dashboards.app import DashboardServer

    cfg = _cfg()
    (tmp_path / "c").mkdir()
    with CampaignStore(tmp_path / "c" / "campaign.db") as store:
        store.add_units([_spec("Twinkle", 0, cfg)], store.put_config(cfg.to_dict(), cfg.hash()))
    dash = cfg.dashboard.model_copy(update={"allowed_hosts": ("proxy.example",)})
    with DashboardServer(Campaign(tmp_path / "c", dash), host="127.0.0.1", port=0) as url:
        port = int(url.rstrip("/").rsplit(":", 1)[1])
        for host in (f"127.0.0.1:{port}", f"localhost:{port}", "LocalHost:9000", f"[::1]:{port}", "proxy.example"):
            status, body = _get(port, "/api/summary", host)
            assert status == 200 and json.loads(body)["counts"]["pending"] == 1, host  # any port: SSH tunnels
        for host in (f"evil.example:{port}", "evil.example", "127.0.0.1.evil.example", "10.0.0.7", "", None):
            status, body = _get(port, "/api/summary", host)
            assert status == 403 and b"not an address this dashboard serves" in body, host
            assert b"counts" not in body
        assert _get(port, "/", f"evil.example:{port}")[0] == 403


def test_allowed_host_names_follow_the_bound_address():
    import socket

    from dashboards.app import allowed_host_names

    assert allowed_host_names("10.1.2.3") == {"10.1.2.3"}  # one interface: only its address
    assert allowed_host_names("node7", ("Proxy.Example",)) == {"node7", "proxy.example"}
    assert allowed_host_names("127.0.0.2") == {"127.0.0.2", "127.0.0.1", "localhost", "::1"}
    assert allowed_host_names("0.0.0.0") >= {"localhost", socket.gethostname().lower()}


def test_campaign_is_not_finished_while_its_imitation_job_trains(tmp_path):
    """All units ended but the driver's imitation job still runs: the page keeps refreshing."""
    from orchestrator.gate import LAUNCHES_KEY

    directory = make_campaign(tmp_path, "il-running", mlflow_runs=False)
    assert Campaign(directory).snapshot(full=False).finished
    with CampaignStore(directory / "campaign.db") as store:
        store.set_meta(LAUNCHES_KEY, [{"state": "running", "passing": 5, "out_dir": str(directory / "il")}])
    s = Campaign(directory).snapshot(full=False)
    assert not s.finished and page_summary(s, _cfg().dashboard)["status"] != "finished"
    with CampaignStore(directory / "campaign.db") as store:
        store.set_meta(LAUNCHES_KEY, [{"state": "succeeded", "passing": 5, "out_dir": str(directory / "il")}])
    assert Campaign(directory).snapshot(full=False).finished


def test_campaigns_sharing_a_tracking_server_each_show_their_own_runs(tmp_path):
    """Two campaigns log to one tracking store; only the first ran an imitation job. Each page
    takes its run ids from its own store: the second shows no imitation job, nor the first's."""
    from mlflow.tracking import MlflowClient

    shared = f"sqlite:///{tmp_path / 'shared.db'}"
    first = make_campaign(tmp_path, "first", tracking_uri=shared)
    second = make_campaign(tmp_path, "second", tracking_uri=shared, imitation=False)
    client = MlflowClient(shared)
    a, b = Campaign(first).snapshot(), Campaign(second).snapshot()

    il_runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                 "tags.`pianoforge.kind` = 'imitation'")
    assert [r.info.run_id for r in il_runs] == [a.gate.il_run_id]
    assert a.gate.launched and a.il_curves and a.il_eval == {"flow": {"seen": 0.8, "held-out": 0.45}}
    assert not b.gate.launched and b.gate.il_run_id is None and not b.il_curves and not b.il_eval
    for snap, directory in ((a, first), (b, second)):
        with CampaignStore(directory / "campaign.db", readonly=True) as store:
            experiment = str(store.get_meta("mlflow_experiment_id"))
        own = {r.info.run_id for r in client.search_runs([experiment])}
        shown = {u.mlflow_run_id for u in snap.units if u.unit_id in snap.curves}
        assert shown and shown <= own
        assert page_summary(snap, _cfg().dashboard)["gate"]["il_run_id"] == snap.gate.il_run_id


def test_page_follows_a_finished_campaign_until_mlflow_has_everything(tmp_path):
    from workers.tracking import Outbox, outbox_path

    directory = make_campaign(tmp_path, "behind", mlflow_runs=False)
    before = page_summary(Campaign(directory).snapshot(full=False), _cfg().dashboard)
    assert before["finished"] and before["settled"]
    box = Outbox(outbox_path(directory), "http://127.0.0.1:9")  # the server is away: records wait
    box.start_run("campaign", "behind", "behind")
    box.close()
    after = page_summary(Campaign(directory).snapshot(full=False), _cfg().dashboard)
    assert after["finished"] and not after["settled"] and after["tracking_pending"] == 1
    assert after["version"] != before["version"]  # a page still open reloads once they arrive


def test_find_campaign_names_what_exists(tmp_path, finished_campaign):
    from dashboards.data import CampaignNotFound

    root = finished_campaign.parent
    assert find_campaign(root) == finished_campaign and find_campaign(root, "demo") == finished_campaign
    with pytest.raises(CampaignNotFound, match="campaigns under .*: demo"):
        find_campaign(root, "nope")


# --------------------------------------------------------------------------------------------
# In a real browser
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser():
    playwright = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} not installed")
    with playwright.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


def _screenshot(page, tmp_path: Path, name: str) -> Path:
    out = tmp_path / name
    page.screenshot(path=str(out), full_page=True)
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / name).write_bytes(out.read_bytes())
    assert out.stat().st_size > 10_000
    return out


def _plot_data(page, div_id: str) -> list[dict]:
    return page.evaluate(f"() => document.getElementById('{div_id}').data.map(t => ({{name: t.name, x: t.x, y: t.y, z: t.z}}))")


def test_page_of_a_finished_campaign(finished_campaign, browser, tmp_path):
    from dashboards.app import DashboardServer

    campaign = Campaign(finished_campaign)
    f1s = [f for _, _, f in PLAN if f != "fail"]
    with DashboardServer(campaign, port=0) as url:
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        requests = []
        page.on("request", lambda r: requests.append(r.url))
        page.goto(url)
        page.wait_for_function(f"() => document.querySelectorAll('.js-plotly-plot').length === {len(FIGURE_IDS)}")
        assert errors == []
        assert all(r.startswith(url) or r.startswith("data:") for r in requests)  # nothing from a CDN
        assert page.inner_text("#campaign-state") == "finished"
        assert page.inner_text("#n-succeeded") == str(sum(f >= 0.75 for f in f1s))
        assert page.inner_text("#n-failed") == "1" and page.inner_text("#eta") == "done"
        # Stacked area: at the end every unit is in an end state.
        states = {t["name"]: t["y"] for t in _plot_data(page, "fig-states")}
        assert states["succeeded"][-1] == 5 and states["gated"][-1] == 2 and states["failed"][-1] == 1
        assert states["pending"][0] == len(PLAN) and states["pending"][-1] == 0
        # F1 histogram: every finished specialist counted, in the right bins; the gate line at 0.75.
        f1_trace = _plot_data(page, "fig-f1")[0]
        assert sum(f1_trace["y"]) == len(f1s)
        assert f1_trace["y"][int(0.97 * 20)] >= 1 and f1_trace["y"][int(0.32 * 20)] == 1
        shapes = page.evaluate("() => document.getElementById('fig-f1').layout.shapes.map(s => s.x0)")
        assert shapes == [0.75]
        # Pressed keys: 88 bars equal to the snapshot's counts.
        keys = _plot_data(page, "fig-keys")[0]
        assert len(keys["y"]) == 88 and keys["y"] == campaign.snapshot().key_counts.tolist()
        # Learning curves: one line per shown unit and metric; the finger heatmap covers 10 fingers.
        curves = _plot_data(page, "fig-curves")
        assert len(curves) == 5 * 2 and max(curves[0]["y"]) == pytest.approx(0.97)
        fingers = _plot_data(page, "fig-fingers")[0]
        assert len(fingers["y"]) == 10 and sum(map(sum, fingers["z"])) > 0
        # The gate opened and the imitation job's loss and evaluation F1 are shown.
        assert "imitation job launched" in page.inner_text("#fig-gate")
        il_traces = _plot_data(page, "fig-il")  # one run; train/loss then eval/f1, as dashboard.il_metrics
        assert [len(t["x"]) for t in il_traces] == [10, 3] and il_traces[1]["y"][-1] == pytest.approx(0.9)
        il_eval = {t["name"]: t["y"] for t in _plot_data(page, "fig-il-eval")}
        assert il_eval == {"seen": [0.8], "held-out": [0.45]}  # group means only, per policy
        # Failures with their errors; links to MLflow runs.
        assert "NaN in critic loss (attempt 3)" in page.inner_text("#failures")
        links = page.eval_on_selector_all("#units a[target=_blank]", "as => as.map(a => a.href)")
        assert len(links) == len(PLAN) and all("/runs/" in h for h in links)
        # The audio element plays the server's WAV.
        duration = page.evaluate("""() => new Promise(done => {
            const a = document.getElementById('rollout-audio');
            a.addEventListener('loadedmetadata', () => done(a.duration)); a.preload = 'metadata'; a.load(); })""")
        focus = campaign.snapshot().focus
        assert duration == pytest.approx(focus.n_steps * campaign.cfg.env.control_timestep + audio.TAIL_S, abs=0.01)
        src = page.get_attribute("#rollout-audio", "src")
        wav = urllib.request.urlopen(url.rstrip("/") + src, timeout=60)
        assert wav.headers["Content-Type"] == "audio/wav" and wav.read(4) == b"RIFF"
        summary = json.loads(urllib.request.urlopen(url + "api/summary", timeout=30).read())
        assert summary["finished"] and summary["counts"]["failed"] == 1
        _screenshot(page, tmp_path, "dashboard_finished.png")
        # Pick two units in the table: the page shows exactly their learning curves.
        gated = page.eval_on_selector_all("#units tr[data-state=gated]", "rs => rs.map(r => r.dataset.unit)")
        page.eval_on_selector_all("input.pick", "xs => xs.forEach(x => { x.checked = false; })")
        for uid in gated:
            page.check(f"input.pick[value='{uid}']")
        with page.expect_navigation():
            page.click("#show-curves")
        page.wait_for_function("() => document.getElementById('fig-curves').data !== undefined")
        assert sorted({t["name"] for t in _plot_data(page, "fig-curves")}) == sorted(gated) and len(gated) == 2
        assert len(_plot_data(page, "fig-curves")) == 4
        page.close()


@pytest.mark.slow
def test_page_of_a_running_campaign_refreshes_itself(tmp_path, browser):
    from dashboards.app import DashboardServer

    directory = make_campaign(tmp_path, "live", finished=False)
    campaign = Campaign(directory, configs.load(overrides=["dashboard.refresh_s=0.3"]).dashboard)
    with DashboardServer(campaign, port=0) as url:
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.goto(url)
        assert page.inner_text("#campaign-state") == "running"
        assert page.inner_text("#n-running") == "1" and page.inner_text("#n-pending") == str(len(PLAN) - 5)
        _screenshot(page, tmp_path, "dashboard_running.png")
        # The driver finishes the running unit: the page notices by itself and reloads.
        with CampaignStore(directory / "campaign.db") as store:
            running = store.unit_ids("running")[0]
            store.mark_finished(running, UnitResult(unit_id=running, f1=0.9, precision=0.9, recall=0.9,
                                                    episode_return=1.0, steps=10, shard_path=None, seconds=1.0),
                                SUCCEEDED)
        page.wait_for_function("() => document.getElementById('n-running').textContent === '0'", timeout=20_000)
        # Then the remaining units fail: the campaign is finished and the page stops polling.
        with CampaignStore(directory / "campaign.db") as store:
            for uid in store.unit_ids("pending"):
                store.mark_running(uid)
                store.mark_attempt_failed(uid, "RuntimeError: no GPU", retry=False)
        page.wait_for_function("() => document.getElementById('campaign-state').textContent === 'finished'",
                               timeout=20_000)
        requests = []
        page.on("request", lambda r: requests.append(r.url))
        page.wait_for_timeout(1500)
        assert not [r for r in requests if "/api/summary" in r]
        page.close()


def test_static_export_opens_offline(finished_campaign, browser, tmp_path):
    from typer.testing import CliRunner

    from orchestrator.cli import app

    out = tmp_path / "campaign.html"
    result = CliRunner().invoke(app, ["dashboard", "demo", "--root", str(finished_campaign.parent), "--export", str(out)])
    assert result.exit_code == 0, result.output
    text = out.read_text()
    assert not re.search(r"<script[^>]*\bsrc=", text) and "/api/summary" not in text  # all inline, no polling
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    page.route("**/*", lambda route: route.abort() if not route.request.url.startswith("file:") else route.continue_())
    page.goto(out.as_uri())
    page.wait_for_function(f"() => document.querySelectorAll('.js-plotly-plot').length === {len(FIGURE_IDS)}")
    assert sum(_plot_data(page, "fig-f1")[0]["y"]) == len([f for _, _, f in PLAN if f != "fail"])
    assert page.get_attribute("#rollout-audio", "src").startswith("data:audio/wav;base64,")
    _screenshot(page, tmp_path, "dashboard_export.png")
    page.close()


@pytest.mark.slow
def test_page_follows_a_real_synthetic_campaign_to_its_end(tmp_path, browser):
    """The driver runs a synthetic campaign on in-process Ray while the page is open: the page
    shows it running, follows it by itself, and ends showing the store's final counts."""
    import threading

    import ray

    from dashboards.app import DashboardServer
    from orchestrator import campaign as campaign_mod
    from workers.synthetic import make_units

    cfg = configs.load(overrides=[
        "campaign.workload=synthetic", "campaign.synthetic.sleep_s=1.5", "campaign.synthetic.steps=3",
        "campaign.synthetic.episodes=2", "campaign.synthetic.steps_per_episode=30", "campaign.max_attempts=2",
        "campaign.synthetic.fail_pattern='*-c002-*'", "campaign.synthetic.fail_first_attempts=5",
        "gate.min_shards=3", "gate.launch=never", "mlflow.system_metrics=false", "mlflow.flush_interval_s=0.5",
        "dashboard.refresh_s=0.5",
    ])
    units = make_units(3, 3, cfg.hash("env", "droq", "specialist"))
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        driver = threading.Thread(target=campaign_mod.submit, args=(units, cfg, "synthetic"), kwargs={"root": tmp_path})
        driver.start()
        directory = tmp_path / "synthetic"
        deadline = time.time() + 60
        while time.time() < deadline and not ((directory / "campaign.db").exists() and read_store(directory)[0]):
            time.sleep(0.2)
        with DashboardServer(Campaign(directory), port=0) as url:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(url)
            assert page.inner_text("#campaign-state") in ("waiting", "running")
            page.wait_for_function("() => document.getElementById('campaign-state').textContent === 'finished'",
                                   timeout=120_000)
            driver.join(timeout=60)
            # MLflow may still be receiving the last records (tracking never holds units up): the
            # page follows until it has them all, then stops refreshing.
            page.wait_for_function("() => document.body.dataset.settled === 'true'", timeout=120_000)
            with CampaignStore(directory / "campaign.db", readonly=True) as store:
                counts = store.counts()
                f1s = [u.f1 for u in store.units() if u.f1 is not None]
            assert counts["failed"] == 3 and counts["succeeded"] + counts["gated"] == 6
            for state, n in counts.items():
                assert page.inner_text(f"#n-{state}") == str(n)
            states = {t["name"]: t["y"] for t in _plot_data(page, "fig-states")}
            assert {st: ys[-1] for st, ys in states.items()} == counts
            assert sum(_plot_data(page, "fig-f1")[0]["y"]) == len(f1s) == 6
            assert sum(_plot_data(page, "fig-keys")[0]["y"]) > 0
            assert "SyntheticFailure" in page.inner_text("#failures")
            curves = _plot_data(page, "fig-curves")
            assert curves and all(len(c["y"]) == 3 for c in curves)  # train/return at each checkpoint step
            _screenshot(page, tmp_path, "dashboard_synthetic.png")
            page.close()
    finally:
        if started:
            ray.shutdown()


def test_media_paths_name_the_unit_and_how_it_is_rendered():
    from dashboards.app import _media

    assert _media("/audio/song%201-c000.wav") == ("song 1-c000", "render_audio", "audio/wav")
    assert _media("/video/u.mp4") == ("u", "render_video", "video/mp4")
    assert _media("/audio/u.mp4") is None and _media("/api/summary") is None
