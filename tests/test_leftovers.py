"""The suite's own hygiene (``conftest._leaves_nothing_running``): a process a test starts carries
the session mark and is found while it runs, wherever it was reparented; a server started with
``server_env`` is not; a finished one is not."""
from __future__ import annotations

import shlex
import subprocess
import sys

from conftest import left_running, server_env

SLEEP = [sys.executable, "-c", "import time; time.sleep(60)"]


def test_a_process_left_by_a_test_is_found_even_in_a_new_session_and_a_server_is_not():
    # start_new_session and a shell that exits at once: the sleeper is reparented, as the ranks of a
    # launcher killed with SIGKILL are
    orphan = subprocess.run(["bash", "-c", f"setsid {shlex.join(SLEEP)} >/dev/null 2>&1 & echo $!"],
                            capture_output=True, text=True, check=True).stdout.strip()
    server = subprocess.Popen(SLEEP, env=server_env())
    done = subprocess.run([sys.executable, "-c", "pass"])
    try:
        found = {p.pid for p in left_running()}
        assert int(orphan) in found
        assert server.pid not in found
        assert done.returncode == 0 and len(found) == 1, found
    finally:
        import psutil

        for pid in (int(orphan), server.pid):
            try:
                psutil.Process(pid).kill()
            except psutil.NoSuchProcess:
                pass
        server.wait()
        psutil.wait_procs([p for p in left_running()], timeout=10)
