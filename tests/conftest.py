"""Project-wide pytest setup: the real-service rig lives in ``tests/rig``."""

pytest_plugins = [
    "tests.rig.tls",
    "tests.rig.mosquitto",
    "tests.rig.docker_engine",
    "tests.rig.gitrepo",
    "tests.rig.hygiene",
]
