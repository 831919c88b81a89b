"""What runs on worker nodes: songs, the RP1M environment, DroQ specialists, the lake, imitation."""

import os

from workers.rl.threads import passive_openmp

# Workers never open a window; without this dm_control picks GLFW, which warns on every
# headless node that there is no DISPLAY. EGL needs no display (and works with a GPU too).
os.environ.setdefault("MUJOCO_GL", "egl")

# Idle OpenMP threads sleep instead of spinning on cores other processes need (workers/rl/threads.py).
passive_openmp()
