"""Effects on the access token and the provisioning exchange (handled by the MQTT component).

None of them carries a secret: the adapter reads the provisioning key and
secret from the configuration and writes the received token to the token
file itself; the outcomes only say what happened.
"""

from __future__ import annotations

import attrs

from teg_fsm.engine.effects import Effect


@attrs.frozen(kw_only=True)
class CheckToken(Effect):
    """Look at the token file; succeeds with ``{"present": bool}``."""


@attrs.frozen(kw_only=True)
class MoveTokenAside(Effect):
    """Rename a rejected token file (kept, never deleted); succeeds with ``{"moved_to": str | None}``."""


@attrs.frozen(kw_only=True)
class RequestProvisioning(Effect):
    """Publish ``/provision/request`` on the open ``provision`` session and await the answer.

    Succeeds with ``{"status", "credentialsType", "errorMsg", "token_stored"}``
    for any answer ThingsBoard gives (SUCCESS, NOT_FOUND, FAILURE); on SUCCESS
    with an access token the adapter has already written the token file
    (``token_stored`` true). Fails when the session is lost first; give it a
    ``timeout_s``.
    """
