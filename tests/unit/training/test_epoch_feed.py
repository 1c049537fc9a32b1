import threading
import time

from distillery.training.epoch_feed import EpochFeed, epochs_and_failures, following, one_line


def test_every_reported_epoch_reaches_the_driver_in_order_even_the_last_one(tmp_path):
    path = tmp_path / "feed" / "epochs.jsonl"
    path.parent.mkdir()
    seen, feed = [], EpochFeed(path)

    def report():  # as the controller does, from another thread, while fit() blocks
        for epoch in range(1, 6):
            feed.after_report(None, [{"epoch": epoch, "loss": 1.0 / epoch}, {"epoch": epoch}],
                              checkpoint=None)
            time.sleep(0.05)

    with following(path, seen.append):
        reporter = threading.Thread(target=report)
        reporter.start()
        reporter.join()  # the body ends right after the last report: it must still arrive
    assert [m["epoch"] for m in seen] == [1, 2, 3, 4, 5] and seen[-1]["loss"] == 0.2  # rank 0's metrics
    assert not path.parent.exists()  # the feed's folder is gone with the run


def test_a_worker_failure_reaches_the_driver_and_is_recorded_with_the_epoch_that_resumes(tmp_path):
    """As Ray Train reports a node lost mid-epoch: epochs 1-2, the failed workers (their errors
    wrapped, tracebacks in the message), then the restarted group's epochs from 3."""
    path = tmp_path / "feed" / "epochs.jsonl"
    path.parent.mkdir()
    seen, restarts, feed = [], {}, EpochFeed(path)
    with following(path, epochs_and_failures("teacher", 3, seen.append, restarts)):
        for epoch in (1, 2):
            feed.after_report(None, [{"epoch": epoch}], checkpoint=None)
        feed.after_exception(None, {0: RuntimeError("Traceback ...\n  File x\nConnection reset by peer"),
                                    1: ConnectionError("the actor's node died")})
        for epoch in (3, 4):
            feed.after_report(None, [{"epoch": epoch, "resumed_from": 2} if epoch == 3 else {"epoch": epoch}],
                              checkpoint=None)
    assert [m["epoch"] for m in seen] == [1, 2, 3, 4]
    failures = ["ConnectionError: the actor's node died", "RuntimeError: Connection reset by peer"]
    assert restarts == {3: {"worker_failures": failures, "last_epoch_before": 2}}
    assert seen[2]["worker_failures"] == failures and "worker_failures" not in seen[3]


def test_one_line_keeps_the_type_and_the_last_line_of_a_wrapped_error():
    class Wrapped(Exception):  # a RayTaskError carries the worker's exception as `cause`
        cause = ValueError("first\nlast line")

    assert one_line(Wrapped("outer")) == "ValueError: last line"
    assert one_line(KeyError()) == "KeyError: "

