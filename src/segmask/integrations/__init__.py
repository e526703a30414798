"""Adapters that plug segmask into other tools' interfaces (lm-evaluation-harness: :mod:`.lm_eval`)."""
