"""The one exception type for user mistakes.

Anything the user can fix (a bad config, a missing file, a corrupt artifact) raises
`UserError` with a message naming what is wrong; the CLI prints it as one line and exits
non-zero instead of showing a traceback. Bugs stay ordinary exceptions.
"""


class UserError(Exception):
    """A mistake in the user's input: config, data, artifact or request."""


class NotApplicable(UserError):
    """A compression step that cannot apply to this model (its architecture, not the recipe):
    the variant is refused and the frontier says why; the other variants go on."""


class TrainingFailed(Exception):
    """A training stage that failed on every attempt Ray Train was allowed (`ray.max_failures`)."""
