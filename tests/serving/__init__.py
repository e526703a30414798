"""The serving tests are a package, so that their conftest.py is ``serving.conftest`` and does not shadow
the module ``conftest`` (tests/conftest.py) that other test files import ``ROOT`` and friends from."""
