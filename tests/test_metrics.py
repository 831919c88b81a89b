"""Per-step precision/recall/F1: bit-identical to RoboPianist's sklearn-based evaluation."""

from __future__ import annotations

import numpy as np
import pytest
from dm_control import composer
from env_fixtures import KeyPresser, chord_song, env_config, oracle_ish_keys
from robopianist.suite.tasks.piano_with_shadow_hands import PianoWithShadowHands
from robopianist.wrappers.evaluation import MidiEvaluationWrapper
from sklearn.metrics import precision_recall_fscore_support

from workers.piano.env import make_env, robopianist_task_kwargs
from workers.piano.metrics import key_press_metrics, step_metrics


def sklearn_metrics(pressed, target) -> tuple[float, float, float]:
    p, r, f, _ = precision_recall_fscore_support(
        y_true=np.asarray(target, dtype=np.float64),
        y_pred=np.asarray(pressed, dtype=np.float64),
        average="binary",
        zero_division=1,
    )
    return p, r, f


def test_constructed_cases():
    none = np.zeros(88, dtype=bool)
    a, b, c = none.copy(), none.copy(), none.copy()
    a[[1, 2]] = True
    b[[2, 3, 4]] = True
    c[5] = True
    cases = {
        "silent, nothing pressed": (none, none, (1.0, 1.0, 1.0)),
        "silent, something pressed": (a, none, (0.0, 1.0, 0.0)),
        "notes, nothing pressed": (none, b, (1.0, 0.0, 0.0)),
        "all wrong": (c, b, (0.0, 0.0, 0.0)),
        "partly right": (a, b, (0.5, 1 / 3, 0.4)),
        "exact": (b, b, (1.0, 1.0, 1.0)),
    }
    for name, (pressed, target, expected) in cases.items():
        assert step_metrics(pressed, target) == pytest.approx(expected), name
        assert step_metrics(pressed, target) == sklearn_metrics(pressed, target), name


def test_random_masks_match_sklearn_exactly():
    rng = np.random.default_rng(0)
    pressed = rng.random((400, 88)) < rng.choice([0.0, 0.02, 0.1, 0.5], size=(400, 1))
    target = rng.random((400, 88)) < rng.choice([0.0, 0.02, 0.1, 0.5], size=(400, 1))
    target[:50] = pressed[:50]  # perfect steps
    batch = key_press_metrics(pressed, target)
    assert batch[0].shape == (400,)
    for t in range(400):
        expected = sklearn_metrics(pressed[t], target[t])
        assert step_metrics(pressed[t], target[t]) == expected
        assert (batch[0][t], batch[1][t], batch[2][t]) == expected
    with pytest.raises(ValueError, match="shape"):
        key_press_metrics(pressed[:, :80], target)


def _plain_robopianist_env(midi, env_cfg):
    """RoboPianist's own task with the same physics settings, for the evaluation wrapper."""
    task = PianoWithShadowHands(midi=midi, **robopianist_task_kwargs(env_cfg))
    return MidiEvaluationWrapper(composer.Environment(task=task, random_state=0, strip_singleton_obs_buffer_dim=True))


@pytest.fixture(scope="module")
def envs():
    cfg = env_config()
    return make_env(chord_song(), cfg, seed=0), _plain_robopianist_env(chord_song(), cfg)


@pytest.mark.parametrize("driver", ["random", "oracle-ish"])
def test_rollouts_match_robopianist_evaluation(envs, driver):
    """Step by step against sklearn; per episode against RoboPianist's evaluation wrapper.

    Both environments get the same actions (and the same keys pushed down for the
    oracle-ish driver), so they produce the same key presses.
    """
    ours, plain = envs
    rng = np.random.default_rng(11)
    pressers = [KeyPresser(ours.environment), KeyPresser(plain.environment)]
    obs, _ = ours.reset()
    plain.reset()
    done = False
    steps, silent, hits, wrong = [], 0, 0, 0
    while not done:
        keys = oracle_ish_keys(obs[:88], rng) if driver == "oracle-ish" else []
        for presser in pressers:
            presser.press(keys)
        action = rng.uniform(ours.action_low, ours.action_high)
        obs, _, terminated, done, info = ours.step(action)
        assert not terminated
        timestep = plain.step(action)
        assert timestep.last() == done
        np.testing.assert_array_equal(info["pressed"], plain.environment.task.piano.activation)
        expected = sklearn_metrics(info["pressed"], info["target"])
        assert (info["precision"], info["recall"], info["f1"]) == expected
        steps.append(expected)
        silent += not info["target"].any()
        hits += bool((info["pressed"] & info["target"]).any())
        wrong += bool((info["pressed"] & ~info["target"]).any())
    for presser in pressers:
        presser.press([])
    assert silent > 0
    if driver == "oracle-ish":
        assert hits > 10 and wrong > 0
    episode = ours.episode_metrics()
    reference = plain.get_musical_metrics()
    for name in ("precision", "recall", "f1"):
        assert episode[name] == pytest.approx(reference[name], abs=1e-12)
        assert episode[name] == pytest.approx(np.mean([s[("precision", "recall", "f1").index(name)] for s in steps]))
