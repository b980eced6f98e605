"""The one logging setup: format, rank filtering, stream split."""
import io
import logging

from dyntrain.logs import get_logger, setup_logging


def _emit(rank, stream=None, capsys=None):
    setup_logging(rank, stream=stream)
    log = get_logger("dyntrain.checkpoint.manager")
    log.info("saved step_00000004")
    log.info("[quick] step 4/8 | loss 0.1")
    log.warning("disk nearly full")


def test_rank0_info_to_stdout_warnings_to_stderr(capsys):
    _emit(0)
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert len(lines) == 2 and lines[0].endswith("[manager] saved step_00000004")
    assert lines[1].split(" ", 1)[1] == "[quick] step 4/8 | loss 0.1"  # its own tag, not tagged twice
    assert err.strip().endswith("[manager] disk nearly full") and "saved" not in err


def test_other_ranks_only_warn_and_name_their_rank():
    buf = io.StringIO()
    _emit(3, stream=buf)
    lines = buf.getvalue().splitlines()
    assert len(lines) == 1 and " rank 3 [manager] disk nearly full" in lines[0]


def test_setup_is_idempotent():
    buf = io.StringIO()
    setup_logging(0, stream=buf)
    setup_logging(0, stream=buf)
    get_logger("trainer").info("once")
    assert buf.getvalue().count("once") == 1
    assert get_logger("trainer").name == "dyntrain.trainer"
    assert not logging.getLogger("dyntrain").propagate
