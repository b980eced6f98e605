"""``python -m dyntrain.checkpoint progress ...`` (see ``dyntrain.checkpoint.cli``)."""
import sys

from .cli import main

sys.exit(main())
