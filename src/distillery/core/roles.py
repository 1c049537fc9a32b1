"""The one vocabulary of model roles, read by every stage that names a model.

    teacher          the large model (trained here, or imported)
    student_scratch  the small model trained alone: what distillation is measured against
    student          the small model distilled from the teacher
    variant          a compressed model: a parent plus recipe steps (`compress.variants`)
"""

TRAINED = ("teacher", "student_scratch", "student")  # in training order
SHOWN = ("teacher", "student", "student_scratch")  # in tables: the product before its baseline
VARIANT = "variant"
SEARCHED = "searched"  # the variant a search chose (`search`), saved beside the configured ones
ROLES = (*TRAINED, VARIANT)
# What each trained model descends from, for the frontier's parent column.
PARENT = {"teacher": None, "student_scratch": "teacher", "student": "teacher"}
# The trained models a variant may start from (besides earlier variants).
VARIANT_BASES = ("student", "teacher")
# Names a variant may not take: the trained models and the served extras.
RESERVED_NAMES = (*TRAINED, SEARCHED, "auto", "server")
