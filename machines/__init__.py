"""The gateway's declared state machines: pure policy, no I/O.

Each module holds one ``GatewayMachine`` subclass. They import nothing that
touches the world (a test walks these imports); time comes from events and
actions go out as effect commands.
"""
