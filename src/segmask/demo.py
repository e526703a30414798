"""Moved to ``experiments/demo/demo.py`` (``make demo``); ``python -m segmask.demo`` runs it, with a
``DeprecationWarning``, for one release. It needs a source checkout: the experiments are not installed."""

import importlib.util
import sys
import warnings
from pathlib import Path

_MESSAGE = "segmask.demo moved to experiments/demo/demo.py (run it with `make demo`)"
_SCRIPT = Path(__file__).resolve().parents[2] / "experiments" / "demo" / "demo.py"

# stacklevel 1 when run as `python -m segmask.demo`, so the warning is shown; 2 names the importer otherwise
warnings.warn(_MESSAGE, DeprecationWarning, stacklevel=1 if __name__ == "__main__" else 2)
if not _SCRIPT.is_file():
    raise ImportError(f"{_MESSAGE}; {_SCRIPT} is not here (an installed package has no experiments/)")
_spec = importlib.util.spec_from_file_location("segmask_experiments_demo", _SCRIPT)
_pipeline = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = _pipeline  # dataclasses look their module up by name
_spec.loader.exec_module(_pipeline)

DemoConfig = _pipeline.DemoConfig
parse_args = _pipeline.parse_args
run_demo = _pipeline.run_demo
train_config = _pipeline.train_config
smollm2_gguf = _pipeline.smollm2_gguf
main = _pipeline.main

__all__ = ["DemoConfig", "main", "parse_args", "run_demo", "smollm2_gguf", "train_config"]

if __name__ == "__main__":
    sys.exit(main())
