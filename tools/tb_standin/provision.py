"""Device provisioning decisions, as ``DeviceProvisionServiceImpl.provisionDevice`` makes them (§4)."""

from __future__ import annotations

from typing import Any

from tools.tb_standin.model import (
    ALLOW_CREATE,
    CHECK_PRE_PROVISIONED,
    PROVISION_FAILURE,
    PROVISION_NOT_FOUND,
    Device,
    ProvisionProfile,
    random_token,
)


class Registry:
    """Devices by name and by credentials, and provisioning profiles by key."""

    def __init__(self) -> None:
        self.devices: dict[str, Device] = {}
        self.tokens: dict[str, str] = {}  # access token -> device name
        self.profiles: dict[str, ProvisionProfile] = {}  # provisionDeviceKey -> profile

    def add_device(self, name: str, token: str | None = None, profile: str = "default",
                   basic: tuple[str | None, str | None, str | None] | None = None) -> Device:
        """Create a device; a token is generated unless given or basic credentials are used."""
        if name in self.devices:
            raise ValueError(f"device {name!r} already exists")
        if token is None and basic is None:
            token = random_token()
        if token is not None and token in self.tokens:
            raise ValueError(f"token {token!r} is already used by {self.tokens[token]!r}")
        device = Device(name=name, token=token, profile=profile, basic=basic)
        self.devices[name] = device
        if token is not None:
            self.tokens[token] = name
        return device

    def by_token(self, token: str) -> Device | None:
        name = self.tokens.get(token)
        return self.devices.get(name) if name is not None else None

    def by_basic(self, client_id: str | None, username: str | None, password: str | None) -> Device | None:
        """MQTT_BASIC credentials: clientId and/or userName identify, the password must match if set."""
        for device in self.devices.values():
            if device.basic is None:
                continue
            b_client, b_user, b_password = device.basic
            if not b_client and not b_user:
                continue
            if (b_client and b_client != client_id) or (b_user and b_user != username):
                continue
            if b_password and b_password != password:
                continue
            return device
        return None

    def provision(self, request: dict[str, Any]) -> dict[str, Any]:
        """The response payload for a ``/provision/request`` (SUCCESS / NOT_FOUND / FAILURE)."""
        key = request.get("provisionDeviceKey") or ""
        secret = request.get("provisionDeviceSecret") or ""
        profile = self.profiles.get(str(key)) if key else None
        if not key or not secret or profile is None or profile.secret != secret:
            return dict(PROVISION_NOT_FOUND)  # a wrong secret also falls through to NOT_FOUND
        raw_name = request.get("deviceName")
        name = random_token() if raw_name is None else str(raw_name).strip()
        if not name:
            return dict(PROVISION_FAILURE)
        if profile.strategy == CHECK_PRE_PROVISIONED:
            return self._pre_provisioned(profile, name)
        if profile.strategy != ALLOW_CREATE or name in self.devices:
            return dict(PROVISION_FAILURE)  # ALLOW_CREATE: an existing name is a FAILURE
        return self._create(profile, name, request)

    def _pre_provisioned(self, profile: ProvisionProfile, name: str) -> dict[str, Any]:
        device = self.devices.get(name)
        if device is None or device.profile != profile.name or device.server.get("provisionState") == "provisioned":
            return dict(PROVISION_FAILURE)
        device.server["provisionState"] = "provisioned"
        return _success(device)

    def _create(self, profile: ProvisionProfile, name: str, request: dict[str, Any]) -> dict[str, Any]:
        credentials_type = request.get("credentialsType") or "ACCESS_TOKEN"
        try:
            if credentials_type == "MQTT_BASIC":
                basic = (request.get("clientId"), request.get("username"), request.get("password"))
                device = self.add_device(name, profile=profile.name, basic=basic)
            elif credentials_type == "X509_CERTIFICATE":
                device = Device(name=name, token=None, profile=profile.name)
                device.server["x509"] = request.get("hash")
                self.devices[name] = device
            else:
                device = self.add_device(name, token=request.get("token") or None, profile=profile.name)
        except ValueError:
            return dict(PROVISION_FAILURE)  # e.g. a duplicate token
        device.server["provisionState"] = "provisioned"
        return _success(device)


def _success(device: Device) -> dict[str, Any]:
    """SUCCESS payload in the key order TB's JsonConverter writes."""
    if device.basic is not None:
        client_id, username, password = device.basic
        value: Any = {"clientId": client_id, "userName": username, "password": password}
        return {"credentialsValue": value, "credentialsType": "MQTT_BASIC", "status": "SUCCESS"}
    if "x509" in device.server:
        return {"credentialsValue": device.server["x509"], "credentialsType": "X509_CERTIFICATE", "status": "SUCCESS"}
    return {"credentialsValue": device.token, "credentialsType": "ACCESS_TOKEN", "status": "SUCCESS"}
