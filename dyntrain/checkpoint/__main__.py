"""``python -m dyntrain.checkpoint progress ...`` (see ``dyntrain.checkpoint.cli``)."""
import sys

from dyntrain.checkpoint.cli import main
from dyntrain.errors import cli_main


sys.exit(cli_main(main))
