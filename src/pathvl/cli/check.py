"""Placeholder replaced by its command module in this session."""


def register(sub) -> None:
    pass
