from distillery.pipeline.report import restart_text
from distillery.training.stage import restarts


def test_the_report_says_why_and_where_a_training_run_resumed():
    history = [{"epoch": 1}, {"epoch": 2}, {"epoch": 3, "resumed_from": 2, "last_epoch_before": 2,
                                            "worker_failures": ["ActorDiedError: the actor's node died"]},
               {"epoch": 4}, {"epoch": 5, "resumed_from": 4}]
    node_lost, driver = restarts(history)
    assert node_lost == {"epoch": 3, "resumed_from": 2, "last_epoch_before": 2,
                         "worker_failures": ["ActorDiedError: the actor's node died"]}
    assert restart_text(node_lost) == (
        "resumed at epoch 3 from the checkpoint of epoch 2 after a worker failure (ActorDiedError: the "
        "actor's node died): Ray Train restarted as many workers on the live nodes; 0 finished epoch(s) "
        "redone, plus the one in progress")
    assert restart_text(driver) == \
        "resumed at epoch 5 from the checkpoint of epoch 4, after the job's driver was restarted"
