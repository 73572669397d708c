"""`opdgeo study`: the whole study end to end.

``run_study(preset, out)`` builds the preset's stages (`opdgeo.study.pipeline`) and runs
them with caching and resume (`opdgeo.study.stages`); ``plan_text(preset, out)`` is the
``--dry-run`` view (`opdgeo.study.plan`).
"""

from opdgeo.study.presets import PRESETS, StudyPreset, get_preset
from opdgeo.study.run import StudyResult, plan_text, run_study

__all__ = ["PRESETS", "StudyPreset", "get_preset", "run_study", "plan_text", "StudyResult"]
