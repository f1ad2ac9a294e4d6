"""A faithful stand-in for ThingsBoard's device MQTT API (see README.md beside this file)."""

from tools.tb_standin.api import RpcTimeout, StandIn

__all__ = ["RpcTimeout", "StandIn"]
