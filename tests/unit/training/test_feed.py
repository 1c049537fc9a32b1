import threading
import time

from distillery.training.feed import EpochFeed, following


def test_every_reported_epoch_reaches_the_driver_in_order_even_the_last_one(tmp_path):
    path = tmp_path / "feed" / "epochs.jsonl"
    path.parent.mkdir()
    seen, feed = [], EpochFeed(path)

    def report():  # as the controller does, from another thread, while fit() blocks
        for epoch in range(1, 6):
            feed.after_report(None, [{"epoch": epoch, "loss": 1.0 / epoch}, {"epoch": epoch}], checkpoint=None)
            time.sleep(0.05)

    with following(path, seen.append):
        reporter = threading.Thread(target=report)
        reporter.start()
        reporter.join()  # the body ends right after the last report: it must still arrive
    assert [m["epoch"] for m in seen] == [1, 2, 3, 4, 5] and seen[-1]["loss"] == 0.2  # rank 0's metrics
    assert not path.parent.exists()  # the feed's folder is gone with the run
