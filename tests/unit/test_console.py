"""The console: short on a non-interactive stdout, everything in the run's log."""

import io
import logging
from contextlib import redirect_stdout

import pytest

from distillery.core import console


@pytest.fixture
def plain(tmp_path, monkeypatch):
    console.configure(verbose=False, live=False)
    log = console.log_to(tmp_path / "logs" / "run.log")
    yield log
    console.configure(verbose=True, live=False)  # detach the file, give the libraries their loggers back
    for name in console.LIBRARY_LOGGERS:
        assert not any(getattr(h, "baseFilename", None) == str(log) for h in logging.getLogger(name).handlers)


def test_detail_lines_go_to_the_log_only_and_say_lines_to_both(plain):
    out = io.StringIO()
    with redirect_stdout(out):
        console.say("[teacher] running")
        console.detail("[teacher] epoch 1/30  loss 1.0")
        logging.getLogger("ray.serve").info("Application 'x' is ready")
        logging.getLogger("py.warnings").warning("a library's warning")
    assert out.getvalue() == "[teacher] running\n"
    log = plain.read_text()
    assert "[teacher] running" in log and "epoch 1/30" in log and "a library's warning" in log


def test_plain_progress_prints_at_most_one_line_per_interval(plain, monkeypatch):
    clock = iter(range(0, 1000, 10))  # every call 10 s later
    monkeypatch.setattr(console.time, "monotonic", lambda: next(clock))
    out = io.StringIO()
    with redirect_stdout(out), console.progress("[teacher]", 30, "epochs") as advance:
        for _ in range(30):
            advance(1, note="val 99%")
    lines = out.getvalue().splitlines()
    assert 8 <= len(lines) <= 10  # 300 s of epochs, one line per 30 s, none after the last epoch
    # The first epoch ended at 10 s; 2 more took 20 s: 27 left at 10 s each.
    assert lines[0].startswith("[teacher] 3/30 epochs (val 99%), 0:30 spent, about 4:30 left")


def test_eta_text():
    assert console.eta_text(0, 10, 5) == "0:05 spent"
    assert console.eta_text(5, 10, 60) == "1:00 spent, about 1:00 left"
    assert console.eta_text(10, 10, 60) == "1:00 spent"
    # A slow first epoch (40 s of Ray starting) does not count: 4 epochs in 4 s after it.
    assert console.eta_text(5, 30, 44, since_first=(4.0, 4)) == "0:44 spent, about 0:25 left"
    assert console.eta_text(1, 30, 40, since_first=(0.0, 0)) == "0:40 spent"  # no rate to go by yet


def test_verbose_brings_every_line_back(tmp_path):
    console.configure(verbose=True, live=False)
    out = io.StringIO()
    try:
        with redirect_stdout(out):
            console.detail("[teacher] epoch 1/30")
        assert "epoch 1/30" in out.getvalue()
    finally:
        console.configure(verbose=False, live=False)


def test_the_live_display_shows_labels_as_written_and_prints_lines_above_it():
    import rich.console

    screen = rich.console.Console(file=io.StringIO(), force_terminal=True, width=150)
    console.configure(verbose=False, live=True, screen=screen)
    try:
        with console.progress("[compress] building", 2, "variants") as advance:
            advance(1, note="[slim]")
            console.say("[compress] recommended: slim")
            console._state.bars.refresh()
        shown = screen.file.getvalue()
        assert "[compress] building" in shown and "[slim]" in shown and \
            "[compress] recommended: slim" in shown
        assert "1/2" in shown and console._state.bars is None  # stopped with its last bar
    finally:
        console.configure(verbose=False, live=False)
