"""``python -m graphdelta`` (and ``torchrun ... -m graphdelta``): the ``graphdelta`` command."""
import sys

from graphdelta.cli import main

sys.exit(main())
