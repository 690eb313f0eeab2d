"""The multi-process helpers under their earlier name: see :mod:`cleansight_analysis.distributed`.

They moved below the models, detection and defenses (which now share their calibration batches out too);
scripts that ``from cleansight_analysis.evaluation.distributed import is_main`` keep working.
"""

from ..distributed import (barrier, device, gather, is_main, launched, map_batches, my_batches, rank_and_world,
                           shared_work, sharing)

__all__ = ["barrier", "device", "gather", "is_main", "launched", "map_batches", "my_batches", "rank_and_world",
           "shared_work", "sharing"]
