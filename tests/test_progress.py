"""Progress in log files: complete lines at a sensible interval, not rich bars that appear at the end."""

from __future__ import annotations

import logging
import time

import pytest

from genedml import progress
from genedml.progress import EpochProgress, ExtractionProgress


@pytest.fixture
def lines(caplog):
    logger = logging.getLogger("genedml")
    old = logger.level, logger.propagate
    logger.addHandler(caplog.handler)  # directly: the CLI's logging setup stops "genedml" from propagating
    logger.setLevel(logging.INFO)
    logger.propagate = False
    yield caplog
    logger.removeHandler(caplog.handler)
    logger.level, logger.propagate = old


def test_without_a_terminal_each_epoch_is_one_complete_log_line(lines, monkeypatch):
    monkeypatch.setattr(progress, "LINE_EVERY_S", 0.0)
    assert not progress.interactive()  # pytest captures stderr: not a terminal
    with EpochProgress(3, "fit genedml") as bar:
        for epoch in range(3):
            bar(epoch, {"loss": 1.5, "regression": 0.5, "instance": 0.7}, 0.25)
    messages = [r.getMessage() for r in lines.records]
    assert len(messages) == 3
    assert messages[1].startswith("fit genedml epoch 2/3: loss=1.500 regression=0.500 instance=0.700 val_pcc=0.250 (")
    assert messages[1].endswith("s)")


def test_epoch_lines_are_throttled_but_the_last_epoch_is_always_logged(lines):
    with EpochProgress(200, "fit") as bar:
        for epoch in range(50):
            bar(epoch, {"loss": 1.0}, None)
    messages = [r.getMessage() for r in lines.records]
    assert messages[0].startswith("fit epoch 1/200") and messages[-1].startswith("fit epoch 50/200")
    assert len(messages) == 2  # 50 fast epochs: the first line, then the last at the end


def test_extraction_logs_a_line_per_sample_and_while_a_sample_runs(lines, monkeypatch):
    from genedml.extract.runner import SampleReport

    monkeypatch.setattr(progress, "EXTRACT_LINE_EVERY_S", 0.0)
    with ExtractionProgress() as bar:
        bar.start(30)
        bar.sample("A", 100)
        time.sleep(0.01)
        bar.advance(50)
        bar.sample_done(SampleReport("A", "extracted", 30, seconds=2.0))
    messages = [r.getMessage() for r in lines.records]
    assert messages[0] == "extract: 30 spots to encode"
    assert messages[1].startswith("extract A: 50/100 tiles (")
    assert messages[2] == "extract A: extracted, 30 spots (15.0 spots/s); 30/30 spots"


def test_python_warnings_become_log_records_after_the_cli_logging_setup(capsys):
    import warnings

    before = warnings.showwarning
    progress.setup_logging()
    try:
        warnings.warn("something odd", UserWarning)
    finally:
        warnings.showwarning = before
    err = capsys.readouterr().err
    assert "WARNING UserWarning: something odd (test_progress.py:" in err
    assert "warnings.warn(" not in err and len(err.strip().splitlines()) == 1
