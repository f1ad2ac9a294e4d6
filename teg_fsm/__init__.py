"""TEG-FSM: a state-machine edge gateway for ThingsBoard."""

__version__ = "0.1.0"
