"""``python -m aepo_lite`` is the ``aepo-lite`` command."""
import sys

from aepo_lite.cli import main

sys.exit(main())
