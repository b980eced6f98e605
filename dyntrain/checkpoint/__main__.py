"""``python -m dyntrain.checkpoint progress ...`` (see ``dyntrain.checkpoint.cli``)."""
import sys

from ..errors import cli_main
from .cli import main

sys.exit(cli_main(main))
