"""The detector core: one definition of every piece of CleanSight's detection and pruning.

- :mod:`.features`: query rows -> group masses -> the feature (``ratio`` / ``log_ratio`` / ``masses``);
- :mod:`.whitening`: the whitened distance (``diagonal`` / ``ledoit_wolf``);
- :mod:`.detector`: :class:`DetectorSettings`, :func:`fit_detector` (threshold, ``threshold_fit``);
- :mod:`.pruning`: the pruning set Omega;
- :mod:`.masking`: the pre-softmax key-mask hook factory;
- :mod:`.passes`: reading the rows inside a forward / generate call (scoring, masking in flight);
- :mod:`.tables`: tidy tables of group masses and features back from them (the detection sweeps);
- :mod:`.measure`: the feature x whitening measurement behind the defaults (docs/detector.md).

Imports only models (with ``models.rows``) and inputs; CleanSight (``defenses``) and the sweeps (``evaluation``)
build on it.
"""

from .detector import (DEFAULT_FEATURE, DEFAULT_THRESHOLD_FIT, DEFAULT_WHITENING, THRESHOLD_FITS, Detector,
                       DetectorSettings, fit_detector, least_samples)
from .features import (FEATURES, MASS_COLUMNS, MASS_GROUPS, TEXT_GROUPS, TEXT_KEYS, feature_values, group_masses,
                       image_text_masses, stealing_features, table_masses)
from .masking import drop_keys, key_mask_hook, key_mask_hooks, positions_mask
from .passes import MASK_SCOPES, Armed, QueryPass, batch_masses, sample_masses, scoring_pass
from .tables import mass_table, table_features
from .pruning import attention_pruning_positions, auto_tau, image_mask, image_token_peaks, omega, omega_positions
from .whitening import WHITENINGS, Whitener, whitened_distance

__all__ = ["Armed", "DEFAULT_FEATURE", "DEFAULT_THRESHOLD_FIT", "DEFAULT_WHITENING", "Detector", "DetectorSettings",
           "FEATURES", "MASK_SCOPES", "MASS_COLUMNS", "MASS_GROUPS", "QueryPass", "TEXT_GROUPS", "TEXT_KEYS",
           "THRESHOLD_FITS", "WHITENINGS", "Whitener", "attention_pruning_positions", "auto_tau", "batch_masses", "drop_keys",
           "feature_values", "fit_detector", "least_samples", "group_masses", "image_mask", "image_text_masses", "image_token_peaks",
           "key_mask_hook", "key_mask_hooks", "mass_table", "table_features", "omega", "omega_positions", "positions_mask", "sample_masses",
           "scoring_pass", "stealing_features", "table_masses", "whitened_distance"]
