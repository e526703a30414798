"""The CLI tests are a package (as tests/serving is), so that tests/cli/test_chat.py is ``cli.test_chat`` and
does not clash with tests/test_chat.py; ``from conftest import ...`` still finds tests/conftest.py."""
