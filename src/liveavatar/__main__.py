"""``python -m liveavatar ...`` runs the ``liveavatar`` command."""
import sys

from liveavatar.cli import main

if __name__ == "__main__":
    sys.exit(main())
