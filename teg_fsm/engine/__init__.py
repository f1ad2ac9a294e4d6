"""The engine: what runs the machines, and nothing about ThingsBoard, Docker or git.

Events and effect commands (the vocabulary between machines and adapters), the
machine base class, the dispatcher with its journal, timers and effect runner,
the codec that checks and converts wire data, and replay. Machines import from
here only; nothing here imports a machine or an adapter.
"""
