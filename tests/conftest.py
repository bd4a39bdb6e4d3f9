"""Markers for the whole suite: ``long`` tests run once per ``make test`` (``make test-long``,
Debian's libraries), not in both legs."""


def pytest_configure(config):
    config.addinivalue_line("markers", "long: minutes-long soak tests; run by make test-long, deselected in the two legs")
