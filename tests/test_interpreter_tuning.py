"""The interpreter settings a run makes: collector thresholds by mode, GIL switch interval."""

from __future__ import annotations

import gc
import sys

from sferp.runner import (
    GC_THRESHOLDS,
    GC_THRESHOLDS_BOUNDED,
    SWITCH_INTERVAL_S,
    tune_interpreter,
)


def test_bounded_runs_collect_less_often_than_live_runs():
    before, interval = gc.get_threshold(), sys.getswitchinterval()
    try:
        tune_interpreter(bounded=True)
        assert gc.get_threshold() == GC_THRESHOLDS_BOUNDED
        tune_interpreter(bounded=False)
        assert gc.get_threshold() == GC_THRESHOLDS
        assert GC_THRESHOLDS_BOUNDED[0] > GC_THRESHOLDS[0]
        assert sys.getswitchinterval() == SWITCH_INTERVAL_S
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
        sys.setswitchinterval(interval)
