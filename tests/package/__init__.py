"""Tests of the Debian package: the installed daemon in a lab (smoke.py, run by .ci/package)."""
