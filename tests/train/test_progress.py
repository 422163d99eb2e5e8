"""Progress output: a tqdm bar on a terminal, whole plain lines in a redirected log (no carriage returns)."""

from __future__ import annotations

import io

import pytest

from fastmae.cli import main
from fastmae.train.log import LineProgress, progress
from tests.helpers.cli import make_fmnist, tiny_args


class TTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_redirected_stream_gets_lines_not_a_bar():
    out = io.StringIO()
    bar = progress(range(5), total=5, enabled=True, desc="epoch 1/2", stream=out)
    assert isinstance(bar, LineProgress)
    for _ in bar:
        bar.set_postfix(loss="0.5000")
    bar.close()
    text = out.getvalue()
    assert "\r" not in text and text.endswith("\n")
    assert text.splitlines() == [text.splitlines()[0]]  # interval 60 s: only the closing line
    assert text.startswith("epoch 1/2: 5/5 (100%)") and "loss=0.5000" in text and "left" not in text


def test_interval_zero_writes_a_line_per_step_with_time_left():
    out = io.StringIO()
    bar = LineProgress(range(4), total=4, desc="e", interval=0.0, stream=out)
    for _ in bar:
        pass
    bar.close()
    lines = out.getvalue().splitlines()
    assert [l.split(" ")[1] for l in lines] == ["1/4", "2/4", "3/4", "4/4"]
    assert all("left" in l for l in lines[:-1]) and "left" not in lines[-1]


def test_consumer_that_breaks_at_the_last_item_is_counted_done():
    """The training loop breaks inside its last batch (before asking for more): close() still says total/total."""
    out = io.StringIO()
    bar = LineProgress(range(10), total=3, stream=out)
    for i, _ in enumerate(bar):
        if i + 1 >= 3:
            break
    bar.close()
    bar.close()  # idempotent
    assert out.getvalue().splitlines() == [out.getvalue().splitlines()[0]]
    assert out.getvalue().startswith("3/3 (100%)")


def test_terminal_gets_tqdm_and_disabled_gets_the_iterable():
    from tqdm import tqdm

    items = [1, 2]
    assert progress(items, total=2, enabled=False) is items
    bar = progress(items, total=2, enabled=True, stream=TTY())
    assert isinstance(bar, tqdm)
    assert list(bar) == items
    bar.close()


def test_pretrain_with_progress_into_a_captured_stream_writes_whole_lines(tmp_path, capsys):
    data = make_fmnist(tmp_path)
    args = [a for a in tiny_args(data, tmp_path / "run", epochs=1) if a != "--run.no_progress"]
    assert main(args + ["--knn_every", "-1", "--figure_every", "0"]) == 0
    err = capsys.readouterr().err
    assert "\r" not in err
    assert "epoch 1/1: 3/3 (100%)" in err and "loss=" in err


def test_epoch_line_names_the_log_keys_and_the_time_left():
    from fastmae.train.log import clock, epoch_line

    entry = {"epoch": 2, "step": 1874, "loss": 0.9930087, "lr": 0.0005, "images_per_s": 128.76, "epoch_seconds": 465.7,
             "top1": 81.06, "knn_pool": "tokens"}
    line = epoch_line(entry, 30, left_s=13043.0)
    assert line == "epoch 2/30 done: loss 0.99301, lr 0.0005, top1 81.06, knn_pool tokens | 466 s, 129 img/s, ~3:37:23 left"
    assert epoch_line(entry, 2).endswith("| 466 s, 129 img/s")
    assert (clock(59.6), clock(61), clock(3600)) == ("1:00", "1:01", "1:00:00")


def test_time_left_leaves_out_a_slow_first_step(monkeypatch):
    """The first step of a compiled run takes minutes; the time left is read from the steps after it."""
    import fastmae.train.log as log

    now = {"t": 0.0}
    monkeypatch.setattr(log.time, "monotonic", lambda: now["t"])
    out = io.StringIO()
    bar = LineProgress(range(10), total=10, interval=0.0, stream=out)
    for i, _ in enumerate(bar):
        now["t"] += 100.0 if i == 0 else 1.0  # this step's time, seen when the next item is asked for
    bar.close()
    lines = out.getvalue().splitlines()
    assert "~15:00 left" in lines[0]  # one step known: nothing better than its own time
    assert "~0:08 left" in lines[1] and "~0:07 left" in lines[2]  # 1 s a step after the first (not 102 s / 3 x 7)


def test_epoch_line_of_a_tiny_run_keeps_digits():
    from fastmae.train.log import epoch_line

    entry = {"epoch": 1, "step": 3, "loss": 0.5, "images_per_s": 0.4321, "epoch_seconds": 9.26}
    assert epoch_line(entry, 1).endswith("| 9.3 s, 0.43 img/s")


def test_run_time_left_counts_batches_not_epochs():
    """An epoch resumed at batch 651 of 937 took 118 s for 286 batches: the eight epochs left need ~3 h at that
    rate, not 8 x 118 s; once a second epoch is timed, the first (compile warm-up, the resume) is left out."""
    from fastmae.train.log import run_time_left

    assert run_time_left([(118.0, 286)], 8 * 937) == pytest.approx(118.0 / 286 * 8 * 937)
    assert run_time_left([(900.0, 937), (420.0, 937)], 2 * 937) == pytest.approx(840.0)
    assert run_time_left([(600.0, 100), (42.0, 100), (44.0, 100)], 100) == pytest.approx(43.0)
    assert run_time_left([], 100) == 0.0
    assert run_time_left([(5.0, 0)], 100) == 0.0  # no batches timed: no estimate, not a division by zero


def test_position_and_duration_count_epochs_from_one():
    from fastmae.train.runtime import Progress, duration, position

    assert position(21, 651) == "in epoch 22 after batch 651"
    assert position(21, 0) == "after epoch 21" and position(0, 0) == "at the start"
    assert duration(3809.4, Progress(epoch=30)) == "3809 s"
    resumed = Progress(epoch=30, resumed_from="runs/x/checkpoint-00020328.pt", resumed_at=(21, 651))
    assert duration(3809.4, resumed) == "3809 s (since resuming in epoch 22 after batch 651)"
