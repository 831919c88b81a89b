"""What runs on worker nodes: songs, the RP1M environment, DroQ specialists, the lake, imitation."""

import os

# Workers never open a window; without this dm_control picks GLFW, which warns on every
# headless node that there is no DISPLAY. EGL needs no display (and works with a GPU too).
os.environ.setdefault("MUJOCO_GL", "egl")
