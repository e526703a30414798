"""Moved to :mod:`segmask.integrations.lm_eval`; this path keeps working for one release.

``python -m segmask.lm_eval_backend`` still runs the ``lm_eval`` command line with the backend registered.
"""

import sys
import warnings

from segmask.integrations.lm_eval import NAME, SegmaskLM, main, register

warnings.warn(
    "segmask.lm_eval_backend moved to segmask.integrations.lm_eval", DeprecationWarning, stacklevel=2
)

__all__ = ["NAME", "SegmaskLM", "main", "register"]

if __name__ == "__main__":
    sys.exit(main())
