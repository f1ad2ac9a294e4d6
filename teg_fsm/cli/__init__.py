"""Front ends: the ``teg`` command and what only it needs (audit, status,
migration check, diagram generation)."""
