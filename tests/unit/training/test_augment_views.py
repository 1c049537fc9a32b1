import torch

from distillery.config import TrainConfig
from distillery.training.augment_views import (
    apply_views,
    draw_views,
    identity_view,
    logits_of_every_view,
    random_shift,
    view_count,
)
from distillery.training.loop import fit, shown_views
from distillery.training.losses import distillation, unpack_target


def test_each_view_is_a_known_shift_and_the_identity_view_is_the_image():
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    assert torch.equal(apply_views(x, torch.tensor([identity_view()])), x)
    # dy = dx = 0 of 0..2: the image moves one pixel down and right
    down_right = apply_views(x, torch.tensor([0]))
    assert torch.equal(down_right[0, 0, 1:, 1:], x[0, 0, :3, :3])
    assert down_right[0, 0, 0].abs().sum() == 0 and down_right[0, 0, :, 0].abs().sum() == 0  # zero fill
    up_left = apply_views(x, torch.tensor([8]))
    assert torch.equal(up_left[0, 0, :3, :3], x[0, 0, 1:, 1:])


def test_flipped_views_mirror_the_shifted_ones():
    x = torch.randn(3, 2, 5, 5)
    assert view_count(flip=True) == 2 * view_count() == 18
    for v in range(9):
        views = torch.full((3,), v)
        assert torch.equal(apply_views(x, views + 9), apply_views(x, views).flip(-1))


def test_random_shift_is_a_random_view_drawn_as_before():
    x = torch.randn(40, 1, 6, 6)
    views = draw_views(40, torch.Generator().manual_seed(5), flip=True)
    assert torch.equal(random_shift(x, torch.Generator().manual_seed(5), flip=True), apply_views(x, views))
    assert views.min() >= 0 and views.max() < 18 and len(views.unique()) > 9


def test_the_teacher_logits_of_every_view_are_those_of_the_shifted_images():
    teacher = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(36, 4))
    x = torch.randn(10, 1, 6, 6)
    logits = logits_of_every_view(teacher, x, batch_size=3)
    assert logits.shape == (9, 10, 4)
    with torch.no_grad():
        for v in (0, 4, 7):
            assert torch.allclose(logits[v], teacher(apply_views(x, torch.full((10,), v))), atol=1e-6)


def test_a_student_is_shown_the_teachers_answer_for_the_very_image_it_sees():
    teacher = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(36, 4))
    x, y = torch.randn(20, 1, 6, 6), torch.randint(0, 4, (20,))
    logits = logits_of_every_view(teacher, x)
    shown, target = shown_views((x, y), logits, True, torch.Generator().manual_seed(0), False)
    labels, teacher_logits = unpack_target(target)
    assert torch.equal(labels, y) and not torch.equal(shown, x)
    with torch.no_grad():
        assert torch.allclose(teacher_logits, teacher(shown), atol=1e-5)
    plain, target = shown_views((x, y), logits, False, torch.Generator().manual_seed(0), False)
    assert torch.equal(plain, x) and torch.allclose(unpack_target(target)[1], logits[identity_view()])


def test_fit_distils_from_the_logits_of_every_view():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(128, 1, 6, 6, generator=g)
    teacher = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(36, 3))
    y = teacher(x).argmax(1).detach()
    student = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(36, 3))
    history = fit(student, (x, y), (x, y), TrainConfig(epochs=15, batch_size=32, lr=0.05), seed=0,
                  loss_fn=distillation(2.0, 1.0), view_logits=logits_of_every_view(teacher, x))
    assert history[-1]["loss"] < history[0]["loss"]
    assert history[-1]["val_accuracy"] > 0.8  # it learned the teacher's answers
