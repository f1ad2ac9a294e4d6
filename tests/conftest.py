"""Project-wide pytest setup: the real-service rig lives in ``tests/rig``."""

pytest_plugins = [
    "tests.rig.tls",
    "tests.rig.mosquitto",
    "tests.rig.docker_engine",
    "tests.rig.gitrepo",
    "tests.rig.hygiene",
    "tests.rig.protocol",
]


def pytest_configure(config) -> None:  # type: ignore[no-untyped-def]
    """Hypothesis keeps its example database and caches in a temporary home, not in the checkout."""
    import tempfile

    from hypothesis import configuration

    config._teg_hypothesis_home = tempfile.mkdtemp(prefix="teg-hypothesis-")
    configuration.set_hypothesis_home_dir(config._teg_hypothesis_home)


def pytest_unconfigure(config) -> None:  # type: ignore[no-untyped-def]
    import shutil

    home = getattr(config, "_teg_hypothesis_home", None)
    if home:
        shutil.rmtree(home, ignore_errors=True)
