import torch

from distillery.measure.accuracy import distillation_gain, paired_interval, results_table, within_noise


def test_the_paired_interval_of_a_gain_counts_only_the_images_one_model_got_right():
    assert paired_interval(0, 0, 360) == (0.0, 0.0)  # same answers everywhere: no uncertainty
    lo, hi = paired_interval(5, 4, 360)  # +1 image of 360, 9 disagreements: a tie
    assert lo < 0 < hi and abs((lo + hi) / 2 - 1 / 360) < 1e-12
    lo, hi = paired_interval(40, 2, 360)  # 38 images better: a real gain
    assert 0 < lo < 38 / 360 < hi


def test_within_noise_on_the_digits_test_split():
    assert within_noise(0.9917, 0.9861, 360)  # two images apart
    assert not within_noise(0.99, 0.90, 360)
    assert within_noise(0.9, 0.9, None) and not within_noise(0.9, 0.91, None)


def test_distillation_gain_reports_its_interval_and_says_a_tie_is_a_tie():
    models = {"teacher": {"test_accuracy": 1.0}, "student_scratch": {"test_accuracy": 0.9},
              "student": {"test_accuracy": 0.92}}
    alone = torch.tensor([True] * 90 + [False] * 10)
    distilled = alone.clone()
    distilled[90:93], distilled[0] = True, False  # right on 3 more, wrong on 1 more
    gain = distillation_gain(models, {"student_scratch": alone, "student": distilled, "teacher": alone})
    assert (gain["better"], gain["worse"], gain["test_images"]) == (3, 1, 100)
    row = results_table({"models": {m: {"params": 1, "macs": 1, "weights_bytes": 1024, "val_accuracy": 0.9,
                                        **v} for m, v in models.items()},
                         "distillation": gain})
    assert "wrong on 3 and the reverse on 1 of 100 test images: a tie within the noise" in row


def test_without_the_student_alone_no_gain_is_measured_and_the_table_says_so():
    models = {"teacher": {"test_accuracy": 1.0}, "student": {"test_accuracy": 0.92}}
    assert distillation_gain(models, {m: torch.tensor([True]) for m in models}) is None
    table = results_table({"models": {m: {"params": 1, "macs": 1, "weights_bytes": 1024, "val_accuracy": 0.9,
                                          **v} for m, v in models.items()}, "distillation": None})
    assert "| student_scratch" not in table
    assert "Distillation: no gain measured (distill.baseline: false" in table
