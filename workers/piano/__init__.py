"""The piano: songs, the RP1M environment, fingering, metrics, and what a rollout looks and sounds like.

- :mod:`workers.piano.layout`: the one definition of the observation/action layout and the goal encoding;
- :mod:`workers.piano.music`: songs from MIDI and their cut into chunks (the units of work);
- :mod:`workers.piano.env`: the RP1M environment (RoboPianist's two Shadow hands, a ``gymnasium.Env``
  registered as ``pianoforge/Piano-v0`` when this package is imported) and ``make_env``;
- :mod:`workers.piano.view`: frames that show the music (coloured keys, a camera on the hands), gymnasium's render;
- :mod:`workers.piano.task`: RoboPianist's task with RP1M's settings and the environments' shared interface;
- :mod:`workers.piano.lean`: the default backend, stepping MuJoCo directly at close to its own speed;
- :mod:`workers.piano.reward`: the reward terms, each defined once for both backends;
- :mod:`workers.piano.fingering`: the optimal-transport fingering (RP1M eq. 1-2);
- :mod:`workers.piano.metrics`: key-press precision, recall and F1;
- :mod:`workers.piano.audio` and :mod:`workers.piano.render`: a rollout as WAV and as MP4 with sound.

Nothing here imports torch: the environment runs in processes that never train.
"""

import gymnasium

ENV_ID = "pianoforge/Piano-v0"
# Registered by name: MuJoCo and RoboPianist load only when gymnasium.make builds one.
if ENV_ID not in gymnasium.registry:
    gymnasium.register(ENV_ID, entry_point="workers.piano.env:make_gym_env")
