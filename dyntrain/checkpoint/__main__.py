"""``python -m dyntrain.checkpoint progress ...`` (see ``dyntrain.checkpoint.cli``)."""
import sys

from dyntrain.errors import cli_main
from dyntrain.checkpoint.cli import main

sys.exit(cli_main(main))
