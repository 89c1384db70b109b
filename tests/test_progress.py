"""Progress bars without a terminal: one plain line per refresh (few), not ``\\r`` redraws piling up into one line."""
import io

from xmodal import progress


class _Pipe(io.StringIO):
    def isatty(self):
        return False


def test_without_a_terminal_each_refresh_is_its_own_short_line(monkeypatch):
    clock = iter(range(0, 10_000, 7))  # each tqdm time look-up: 7 s later
    monkeypatch.setattr(progress, "NON_TTY_INTERVAL_S", 30.0)
    out = _Pipe()
    bar = progress.tqdm(total=200, desc="pretrain", unit="step", file=out, dynamic_ncols=True)
    bar._time = lambda: next(clock)  # tqdm reads its clock through this attribute
    bar.start_t = bar.last_print_t = 0
    for _ in range(200):
        bar.update(1)
    bar.close()
    text = out.getvalue()
    lines = text.splitlines()
    assert "\r" not in text and "\x1b" not in text
    assert all(len(line) <= 100 for line in lines), lines  # ncols=100: no line grows with the run
    assert lines[0].startswith("pretrain:   0%") and lines[-1].startswith("pretrain: 100%") and "200/200" in lines[-1]
    # at most one line per 30 s of (fake) time: 200 updates 7 s apart take ~1,400 s → ~47 lines, not 200
    assert 3 < len(lines) < 80, len(lines)


def test_on_a_terminal_it_is_tqdm_as_usual():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    out = Tty()
    bar = progress.tqdm(total=3, desc="x", file=out)
    for _ in range(3):
        bar.update(1)
    bar.close()
    assert "\r" in out.getvalue()  # a live bar redraws in place
