"""Progress in a log (issue 27): a tqdm bar on a terminal only; elsewhere a few plain lines, never
a '\\r'. The real verbs' logs are checked where they already run: tests/test_train.py (`train`
redirected to a file) and tests/test_own_classifier.py (`fit-prompts`' captured stderr), both with
conftest's `assert_plain_log`."""

from __future__ import annotations

import io

import pytest

from clipdistill.core import progress


class _Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def clock(monkeypatch) -> _Clock:
    c = _Clock()
    monkeypatch.setattr(progress, "_clock", c)
    return c


def _lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == progress.log.name]


def test_a_bar_in_a_log_says_where_it_is_every_10_percent_and_30_s_then_its_end(clock, caplog):
    # 1 s an image: a line every 30 s; 10 s an image: a line every 10%
    for seconds, said in ((1.0, [30, 60, 90]), (10.0, list(range(10, 100, 10)))):
        caplog.clear()
        with caplog.at_level("INFO", logger="clipdistill"):
            b = progress.bar(range(100), desc="embed test", unit="img")  # stderr is pytest's capture
            assert isinstance(b, progress.LogBar)
            for i in b:
                clock.t += seconds
                b.set_postfix(loss=f"{i / 100:.2f}")
        lines = _lines(caplog)
        assert [int(ln.split()[2].split("/")[0]) for ln in lines[:-1]] == said
        assert lines[-1] == f"embed test: 100/100 img in {progress.duration(100 * seconds)} " \
                            f"({1 / seconds:.1f} img/s), loss 0.99"
        assert not any("\r" in ln for ln in lines)
    assert _lines(caplog)[0] == ("embed test: 10/100 img (10%), 0.1 img/s, 1 min 40 s elapsed, "
                                 "about 15 min 00 s left, loss 0.09")


def test_a_bar_advanced_by_hand_and_its_switches(clock, caplog):
    with caplog.at_level("INFO", logger="clipdistill"):
        with progress.bar(total=1000, initial=400, desc="fill", unit="img", min_seconds=0) as b:
            for _ in range(6):
                clock.t += 2
                b.update(100)
        b.close()  # closing twice (the trainer does, after its loop): one end line
        progress.bar(range(3), desc="quiet", enabled=False).close()  # --no-progress: nothing
        for _ in progress.bar(range(3), desc="epoch 1/2", end_line=False):  # the caller logs its own end
            pass
        progress.bar(total=5, desc="nothing done").close()
    lines = _lines(caplog)
    assert lines[0].startswith("fill: 500/1000 img (50%), 50 img/s, 2 s elapsed, about 10 s left")
    assert len(lines) == 6 and lines[-1] == "fill: 1000/1000 img in 12 s (50 img/s)"
    assert progress.duration(59.6) == "1 min 00 s" and progress.duration(7265) == "2 h 01 min"


def test_a_terminal_gets_tqdm_as_before(monkeypatch):
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    err = Tty()
    monkeypatch.setattr("sys.stderr", err)
    b = progress.bar(range(3), desc="index pool", unit="file")
    assert type(b).__module__.startswith("tqdm")
    list(b)
    assert "\r" in err.getvalue() and "index pool" in err.getvalue()
