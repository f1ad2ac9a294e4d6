"""Adapters: one module per outside system (MQTT, Docker, git, SQLite files, the
file system, systemd, logging). They carry out effect commands and turn what
the outside world says into events; foreign types never travel past them.
They import the engine's vocabulary, never a machine.
"""
