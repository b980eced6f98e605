"""A pytest plugin for the GPU suite (``-p gpu_pytest_skip``): a test file that cannot be collected
because a package it imports is not installed is reported as skipped ("<module> not installed")
instead of as a collection error, so ``pytest -m gpu`` on a bare GPU image runs every GPU test
whose packages are there."""
from __future__ import annotations

import re

import pytest

_MISSING = re.compile(r"No module named '([\w.]+)'")


@pytest.hookimpl(hookwrapper=True)  # the old-style wrapper: any pytest the image may have
def pytest_make_collect_report(collector):
    outcome = yield
    report = outcome.get_result()
    if report.failed and isinstance(collector, pytest.Module):
        found = _MISSING.search(str(report.longrepr))
        if found:
            report.outcome = "skipped"
            report.longrepr = (str(collector.path), 0,
                               f"Skipped: {found.group(1)} not installed")
