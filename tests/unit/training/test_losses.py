"""The distillation loss against values computed by hand (plain `math`, not torch), so a
wrong T^2 factor, KL direction, alpha or reduction fails here."""

import math

import pytest
import torch
import torch.nn.functional as F

from distillery.training.losses import cross_entropy, distillation, kd_loss, pack_target, unpack_target


def _softmax(z):
    e = [math.exp(v) for v in z]
    return [v / sum(e) for v in e]


def _kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q))


S, T_LOGITS, Y = torch.tensor([[0.0, 0.0]]), torch.tensor([[2.0, 0.0]]), torch.tensor([0])


def test_soft_term_is_t_squared_times_kl_of_teacher_to_student():
    # T = 2: teacher softmax([1, 0]) = [0.731, 0.269] against the student's [0.5, 0.5].
    kl = _kl(_softmax([1.0, 0.0]), [0.5, 0.5])
    assert kl == pytest.approx(0.110944, abs=1e-6)
    assert kd_loss(S, T_LOGITS, Y, temperature=2.0, alpha=1.0).item() == pytest.approx(4 * kl, rel=1e-5)


def test_temperature_one_has_no_scaling():
    assert kd_loss(S, T_LOGITS, Y, 1.0, 1.0).item() == \
        pytest.approx(_kl(_softmax([2.0, 0.0]), [0.5, 0.5]), rel=1e-5)


def test_kl_direction_is_teacher_first():
    teacher_first = _kl(_softmax([2.0, 0.0]), [0.5, 0.5])  # 0.3278
    student_first = _kl([0.5, 0.5], _softmax([2.0, 0.0]))  # 0.4338
    assert abs(teacher_first - student_first) > 0.1  # the case tells the two apart
    assert kd_loss(S, T_LOGITS, Y, 1.0, 1.0).item() == pytest.approx(teacher_first, rel=1e-5)


def test_alpha_zero_is_plain_cross_entropy():
    s = torch.tensor([[2.0, 0.0]])
    assert kd_loss(s, torch.tensor([[0.0, 5.0]]), Y, 4.0, 0.0).item() == \
        pytest.approx(math.log(1 + math.exp(-2)), rel=1e-5)


def test_alpha_mixes_the_two_terms():
    soft = 9 * _kl(_softmax([2 / 3, 0.0]), [0.5, 0.5])
    hard = math.log(2)  # the student's uniform logits on label 0
    assert kd_loss(S, T_LOGITS, Y, 3.0, 0.25).item() == pytest.approx(0.25 * soft + 0.75 * hard, rel=1e-5)


def test_identical_logits_give_zero_kl():
    logits = torch.randn(8, 5, generator=torch.Generator().manual_seed(0))
    assert kd_loss(logits, logits, torch.zeros(8, dtype=torch.long), 4.0, 1.0).item() == \
        pytest.approx(0.0, abs=1e-6)


def test_the_soft_term_is_a_mean_over_the_batch_not_a_sum():
    one = kd_loss(S, T_LOGITS, Y, 2.0, 1.0)
    two = kd_loss(S.repeat(2, 1), T_LOGITS.repeat(2, 1), Y.repeat(2), 2.0, 1.0)
    assert two.item() == pytest.approx(one.item(), rel=1e-6)


def test_no_gradient_reaches_the_teacher():
    student, teacher = S.clone().requires_grad_(True), T_LOGITS.clone().requires_grad_(True)
    kd_loss(student, teacher, Y, 2.0, 0.9).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None


def test_packed_targets_round_trip_and_the_packed_loss_is_the_same():
    labels, logits = torch.tensor([3, 0, 7]), torch.randn(3, 10, generator=torch.Generator().manual_seed(1))
    packed = pack_target(labels, logits)
    assert packed.shape == (3, 11)
    back_labels, back_logits = unpack_target(packed)
    assert torch.equal(back_labels, labels) and torch.equal(back_logits, logits)
    student = torch.randn(3, 10, generator=torch.Generator().manual_seed(2))
    assert distillation(4.0, 0.9)(student, packed).item() == pytest.approx(
        kd_loss(student, logits, labels, 4.0, 0.9).item(), rel=1e-6)


def test_cross_entropy_applies_label_smoothing():
    logits, y = torch.tensor([[2.0, 0.0]]), torch.tensor([0])
    # smoothing 0.2 over 2 classes: target [0.9, 0.1]
    p = _softmax([2.0, 0.0])
    expected = -(0.9 * math.log(p[0]) + 0.1 * math.log(p[1]))
    assert cross_entropy(0.2)(logits, y).item() == pytest.approx(expected, rel=1e-5)
    assert cross_entropy()(logits, y).item() == pytest.approx(F.cross_entropy(logits, y).item())


def test_the_soft_term_alone_never_reads_a_label():
    """alpha 1 (a soft-only student, data without labels stored as -1): the labels are not used."""
    unlabeled = torch.tensor([-1])
    assert kd_loss(S, T_LOGITS, unlabeled, 2.0, 1.0).item() == \
        pytest.approx(kd_loss(S, T_LOGITS, Y, 2.0, 1.0).item())
    with pytest.raises(IndexError):  # the premise: with any weight on the labels, -1 is no label
        kd_loss(S, T_LOGITS, unlabeled, 2.0, 0.9)
