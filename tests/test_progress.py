"""lab.progress: one line per bar where the output is not a terminal."""
import io

from lab.progress import tqdm


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_one_line_per_bar_when_not_a_tty():
    out = io.StringIO()
    for phase in ("unlearn npo", "eval forget"):
        bar = tqdm(total=50, desc=phase, leave=False, file=out)
        for i in range(50):
            bar.update()
            bar.set_postfix(loss=f"{i:.3f}")
        bar.close()
    for _ in tqdm(range(7), desc="generate", leave=False, file=out):
        pass
    lines = out.getvalue().splitlines()
    assert len(lines) == 3 and "\r" not in out.getvalue()
    assert lines[0].startswith("unlearn npo: 100%") and "50/50" in lines[0] and "loss=49.000" in lines[0]
    assert lines[2].startswith("generate: 100%") and "7/7" in lines[2]


def test_a_terminal_gets_the_live_bar_and_disabled_bars_print_nothing():
    term = Terminal()
    for _ in tqdm(range(5), desc="x", file=term, mininterval=0):
        pass
    assert term.getvalue().count("\r") > 1
    quiet = io.StringIO()
    for _ in tqdm(range(5), desc="x", file=quiet, disable=True):
        pass
    assert quiet.getvalue() == ""


def test_a_long_bar_prints_interim_lines():
    from lab.progress import LineBar
    out = io.StringIO()
    bar = LineBar(total=3, desc="fine-tune", file=out, line_every=0.0)   # every update is "long enough"
    for _ in range(3):
        bar.update()
    bar.close()
    lines = out.getvalue().splitlines()
    assert [ln.split("|")[0].strip() for ln in lines] == ["fine-tune:  33%", "fine-tune:  67%", "fine-tune: 100%"]
