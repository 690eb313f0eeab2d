"""The one interface every intervention shares, re-exported from the model core.

:class:`Intervention` (an image transform and/or forward hooks) lives in
:mod:`cleansight_analysis.models.intervention`, below both the attention analyses and the interventions
(which must not import each other); importing it from here keeps working.
"""

from ..models.intervention import Compose, HookIntervention, Intervention, NoIntervention, as_intervention

__all__ = ["Compose", "HookIntervention", "Intervention", "NoIntervention", "as_intervention"]
