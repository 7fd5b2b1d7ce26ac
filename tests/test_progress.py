import io
import re

from rich.console import Console

from atmpipe.progress import Progress


def test_outside_a_terminal_each_update_is_one_whole_line_however_narrow_the_console():
    out = io.StringIO()
    console = Console(file=out, force_terminal=False, width=30)
    with Progress(console, unit=" tokens", speed_unit=" tok/s", log_seconds=0.0) as bar:
        task = bar.add_task("harvest cache/some/long/path/l9.zarr", total=3_000, info="0.00 GB written")
        for i in range(3):
            bar.update(task, advance=1_000, info=f"{i + 1}.00 GB written")
    lines = out.getvalue().splitlines()
    assert len(lines) == 3  # one per update; the final one is not repeated when the bar stops
    line = r"harvest cache/some/long/path/l9\.zarr  {done}/3,000 tokens  (\S+ tok/s  )?\d+:\d\d:\d\d elapsed  ETA (\d+:\d\d:\d\d|-:--:--)  {gb}\.00 GB written"  # fmt: skip
    for i, text in enumerate(lines):
        assert re.fullmatch(line.format(done=f"{i + 1},000", gb=i + 1), text), text
    assert lines[-1].endswith("ETA 0:00:00  3.00 GB written")
    assert "…" not in out.getvalue()


def test_outside_a_terminal_lines_come_every_log_seconds_and_at_the_end():
    out = io.StringIO()
    console = Console(file=out, force_terminal=False, width=80)
    with Progress(console, log_seconds=3600.0) as bar:
        task = bar.add_task("train", total=10)
        for _ in range(4):
            bar.advance(task)
        bar.update(task, rate="123 tok/s", info="loss 0.5")
        assert out.getvalue() == ""  # not finished, and less than log_seconds since the start
    lines = out.getvalue().splitlines()
    assert len(lines) == 1  # the state when the bar stopped
    assert re.fullmatch(r"train  4/10  123 tok/s  \d+:\d\d:\d\d elapsed  ETA \S+  loss 0\.5", lines[0])


def test_on_a_terminal_the_live_bar_is_the_display_and_no_lines_are_logged():
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=200)
    with Progress(console, log_seconds=0.0) as bar:
        task = bar.add_task("eval", total=2)
        bar.advance(task)
        bar.advance(task)
    text = out.getvalue()
    assert "\x1b[" in text  # drawn as a live (ANSI) bar
    assert "eval" in text and "2/2" in text
    assert " elapsed  ETA " not in text  # the plain log line is for logs only
