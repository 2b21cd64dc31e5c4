"""The ``liveavatar`` command line (``liveavatar.cli.main``)."""
from liveavatar.cli.main import main

__all__ = ["main"]
