"""The error of a study spec that cannot run (its own module so the spec's parts share it)."""


class SpecError(ValueError):
    """A study spec that cannot run; the message starts with the offending field."""
