"""``aepo-lite lab``: the course in JupyterLab (the launcher lives in :mod:`aepo_lite.course.lab`)."""
from aepo_lite.course.lab import register  # noqa: F401
