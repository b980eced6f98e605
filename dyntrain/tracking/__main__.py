"""``python -m dyntrain.tracking sync DIR [--uri URI]``: deliver the metric values a run left unsent in
its checkpoint folder DIR (``dyntrain.tracking.pending``) to the tracking store (``--uri``, else
MLFLOW_TRACKING_URI). Exit 2 with one line for a missing folder or URI or an unreadable file."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Optional

from dyntrain.errors import DyntrainError, cli_main
from dyntrain.redaction import mlflow_uri, redact_uri
from dyntrain.tracking.pending import PENDING_FILE, count_pending, pending_path, sync_pending


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dyntrain.tracking",
                                     description="Deliver tracking records a run left unsent.")
    sub = parser.add_subparsers(dest="command", required=True)
    sync = sub.add_parser("sync", help=f"send the metric values waiting in DIR/{PENDING_FILE}")
    sync.add_argument("dir", type=Path, help="the run's checkpoint folder (checkpoint.dir)")
    sync.add_argument("--uri", default=None, help="tracking URI (default: MLFLOW_TRACKING_URI)")
    a = parser.parse_args(argv)
    if not a.dir.is_dir():
        raise DyntrainError(f"sync: no folder {a.dir}")
    uri = a.uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise DyntrainError("sync: no tracking URI (give --uri or set MLFLOW_TRACKING_URI)")
    try:
        waiting = count_pending(a.dir)
    except ValueError as exc:
        raise DyntrainError(f"sync: {exc}") from exc
    if not waiting:
        print(f"sync: nothing waits in {a.dir}")
        return 0
    # lazy: mlflow is needed only where tracking is on (the GPU image has none)
    from mlflow.tracking import MlflowClient

    uri = mlflow_uri(uri)
    sent = sync_pending(a.dir, MlflowClient(tracking_uri=uri))
    print(f"sync: {sent} of {waiting} metric values sent to {redact_uri(uri)} "
          f"({waiting - (sent or 0)} were there already); {pending_path(a.dir).name} removed")
    return 0


if __name__ == "__main__":
    sys.exit(cli_main(main))
