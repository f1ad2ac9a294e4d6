"""The test rig: real services (mosquitto, dockerd, git, TLS material) as fixtures.

Registered from ``tests/conftest.py`` via ``pytest_plugins``. When a real service
cannot start, the fixture fails the test with the reason: an integration suite
that silently skips is a defect, not a convenience.
"""
