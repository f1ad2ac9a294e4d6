"""Effects of the rpc machine (handled by the RPC component)."""

from __future__ import annotations

from typing import Any

import attrs

from teg_fsm.engine.effects import Effect


@attrs.frozen(kw_only=True)
class RunRpc(Effect):
    """Run a handler method on a worker thread; the handler publishes the reply."""

    request_id: int
    method: str
    params: Any = None
