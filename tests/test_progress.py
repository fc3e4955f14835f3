"""Progress in a log: plain lines at a steady pace when stdout is not a terminal, rich's bar when it is."""

from __future__ import annotations

import io
import re
import time

import pytest

from mlipops.errors import MlipopsError
from mlipops.report import Heartbeat, _hms, progress

LINE = re.compile(r"^(?P<d>[^:]+): (?P<n>\d+)/(?P<t>\d+) \((?P<p>\d+) %\), (?P<el>\S+) elapsed(?:, (?P<rest>.*))?$")


class FakeClock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


class TTY(io.StringIO):
    def isatty(self):
        return True


def test_hms():
    assert [_hms(s) for s in (0, 4.6, 59, 60, 125, 3599, 3600, 3725)] == \
        ["0s", "5s", "59s", "1m00s", "2m05s", "59m59s", "1h00m", "1h02m"]


def test_heartbeat_lines_at_the_interval_with_a_fake_clock():
    clock, out = FakeClock(), io.StringIO()
    hb = Heartbeat("coexistence runs (MD steps)", 120, out, interval_s=30.0, clock=clock)
    hb.start()
    lines = out.getvalue().splitlines()
    assert lines == ["coexistence runs (MD steps): 0/120 (0 %), 0s elapsed"]
    written = []
    for second in range(1, 200):  # one advance per second; the timer thread would tick about as often
        clock.t += 1.0
        if second <= 120:
            hb.update()
        if hb.tick():
            written.append(second)
    assert written == [30, 60, 90, 120, 150, 180]  # never more often than the interval, and a beat when idle
    lines = out.getvalue().splitlines()
    assert lines[1] == "coexistence runs (MD steps): 30/120 (25 %), 30s elapsed, ~1m30s left"
    m = LINE.match(lines[3])
    assert (m["n"], m["p"], m["el"], m["rest"]) == ("90", "75", "1m30s", "~30s left")
    assert lines[4] == "coexistence runs (MD steps): 120/120 (100 %), 2m00s elapsed"  # finished: no estimate
    assert lines[6] == "coexistence runs (MD steps): 120/120 (100 %), 3m00s elapsed"  # idle beats go on
    clock.t += 5.0
    hb.finish()
    assert out.getvalue().splitlines()[-1] == "coexistence runs (MD steps): 120/120 (100 %), 3m24s elapsed, done"


def test_heartbeat_absolute_position_new_total_note_and_estimate_from_the_first_update():
    clock, out = FakeClock(), io.StringIO()
    hb = Heartbeat("active campaign (MD steps)", 900, out, interval_s=10.0, clock=clock)
    hb.start()
    hb.update(completed=0)  # a poll before any work: not the start of the rate
    clock.t += 50.0  # setup before the first step (a resumed campaign starts at step 300)
    hb.update(completed=300)
    clock.t += 10.0
    hb.update(completed=400, note="iteration 1")
    assert hb.tick()
    # rate since the first update: 100 steps / 10 s -> 500 steps left ~ 50 s (not 400 steps / 60 s)
    assert out.getvalue().splitlines()[-1] == ("active campaign (MD steps): 400/900 (44 %), 1m00s elapsed, "
                                               "~50s left, iteration 1")
    hb.update(0, total=1200)  # a rerun added work
    clock.t += 10.0
    assert hb.tick()
    assert "400/1200 (33 %)" in out.getvalue().splitlines()[-1]
    hb.finish(ok=False)
    assert out.getvalue().splitlines()[-1].endswith("elapsed, stopped, iteration 1")


def test_progress_to_a_log_beats_while_idle_and_ends_with_a_last_line():
    out = io.StringIO()
    with progress("liquid MD", 10, stream=out, interval_s=0.05) as advance:
        advance(3)
        time.sleep(0.4)  # a long step with no advance: the timer thread still writes lines
        advance(7)
    lines = out.getvalue().splitlines()
    assert lines[0] == "liquid MD: 0/10 (0 %), 0s elapsed"
    assert lines[-1].startswith("liquid MD: 10/10 (100 %)") and lines[-1].endswith(", done")
    beats = lines[1:-1]
    assert 3 <= len(beats) <= 9, lines  # 0.4 s at 0.05 s: about 8, never flooded
    assert all(b.startswith("liquid MD: 3/10 (30 %)") for b in beats)


def test_progress_reports_a_stop_and_reraises():
    out = io.StringIO()
    with pytest.raises(RuntimeError):
        with progress("nve MD", 5, stream=out, interval_s=60) as advance:
            advance(2)
            raise RuntimeError("boom")
    assert out.getvalue().splitlines() == ["nve MD: 0/5 (0 %), 0s elapsed", "nve MD: 2/5 (40 %), 0s elapsed, stopped"]


def test_interval_from_the_environment(monkeypatch):
    monkeypatch.setenv("MLIPOPS_PROGRESS_INTERVAL_S", "0.05")
    out = io.StringIO()
    with progress("train", 2, stream=out):
        time.sleep(0.3)
    assert len(out.getvalue().splitlines()) >= 4  # start, >= 2 beats, end (30 s default: 2 lines)
    monkeypatch.setenv("MLIPOPS_PROGRESS_INTERVAL_S", "0")
    with pytest.raises(MlipopsError, match="MLIPOPS_PROGRESS_INTERVAL_S"):
        with progress("train", 2, stream=io.StringIO()):
            pass


def test_terminal_gets_the_rich_bar_not_log_lines():
    out = TTY()
    with progress("training ensemble (member-epochs)", 4, stream=out, interval_s=0.01) as advance:
        with progress("liquid MD", 3, stream=out) as inner:  # nested: a second bar of the same live display
            inner(3)
        advance(2)
        advance(completed=4, note="member 3")
        time.sleep(0.05)
    text = out.getvalue()
    assert "elapsed" not in text and not any(LINE.match(x) for x in text.splitlines())
    assert "\x1b[" in text  # the terminal's bar (cursor control), removed at the end (transient)
