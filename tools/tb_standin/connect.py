"""Reading a CONNECT of either protocol version, and answering it.

ThingsBoard's Netty decoder reads MQTT 3.1, 3.1.1 and 5 on one port and keeps
the version per session (``MqttTransportHandler.processConnect``, MTH:1062-1066).
The stand-in frames the first packet itself, looks at the protocol level, and
hands the bytes to the codec of that version: ``mqtt5`` for level 5, amqtt's
``ConnectPacket`` for levels 3 and 4. Neither codec reads the other version.
"""

from __future__ import annotations

from dataclasses import dataclass

import mqtt5
from amqtt.adapters import BufferReader, ReaderAdapter, WriterAdapter
from amqtt.errors import NoDataError
from amqtt.mqtt.connack import ConnackPacket
from amqtt.mqtt.connect import ConnectPacket
from amqtt.mqtt.packet import CONNECT, MQTTFixedHeader

from tools.tb_standin.model import MAX_PAYLOAD_SIZE

# ReturnCodeResolver.getConnectionReturnCode (ReturnCodeResolver.java:27-43): an MQTT 5 CONNACK code
# as a 3.1.1 client sees it.
_V311_CONNACK = {0x00: 0x00, 0x01: 0x01, 0x85: 0x02, 0x86: 0x05, 0x87: 0x05, 0x88: 0x03, 0x9F: 0x03}


@dataclass(frozen=True)
class Connect:
    """What the stand-in needs from a CONNECT, whatever the codec that read it."""

    version: int  # protocol level: 3 (3.1), 4 (3.1.1), 5; -1 for a protocol name TB does not know
    client_id: str  # "" when the client sent none
    username: str | None
    password: str | None
    clean_session: bool  # cleanSession (3.1.1) or cleanStart (5)


def v311_connack_code(code: int) -> int:
    return _V311_CONNACK.get(code, code)


async def read_connect(reader: ReaderAdapter) -> Connect | None:
    """The first packet, which must be a CONNECT; None at EOF."""
    header = await MQTTFixedHeader.from_stream(reader)
    if header is None:
        return None
    if header.packet_type != CONNECT or header.remaining_length > MAX_PAYLOAD_SIZE:
        raise ValueError("the first packet is not a CONNECT of an acceptable size")
    body = await reader.read(header.remaining_length)
    if len(body) != header.remaining_length:
        raise NoDataError("connection closed inside the CONNECT")
    name_length = int.from_bytes(body[0:2], "big")
    level = body[2 + name_length]
    if level == 5:
        packet, _ = mqtt5.read(memoryview(header.to_bytes() + body))
        assert isinstance(packet, mqtt5.ConnectPacket)
        password = packet.password.decode("utf-8") if packet.password is not None else None
        return Connect(5, packet.client_id, packet.username, password, packet.clean_start)
    connect = await ConnectPacket.from_stream(BufferReader(body), fixed_header=header)
    known = connect.proto_name in ("MQTT", "MQIsdp")
    return Connect(connect.proto_level if known else -1, "" if connect.client_id_is_random else connect.client_id,
                   connect.username, connect.password, bool(connect.clean_session_flag))


async def write_v5(writer: WriterAdapter, packet: mqtt5.Packet) -> None:
    writer.write(packet.write())
    await writer.drain()


def disconnect_bytes(code: int) -> bytes:
    """An MQTT 5 DISCONNECT with ``code`` and no properties.

    After a refused CONNECT TB repeats the CONNACK code in the DISCONNECT (``closeCtx(ctx,
    MqttConnectReturnCode)``, MTH:227-233, 1361-1362), also 0x85 and 0x86, which MQTT 5 does
    not define for DISCONNECT. The ``mqtt5`` codec rightly refuses to encode those, so for
    them alone the three bytes are written as TB's Netty encoder writes them.
    """
    try:
        return mqtt5.DisconnectPacket(reason_code=mqtt5.DisconnectReasonCode(code)).write()
    except ValueError:
        return bytes((0xE0, 0x01, code))


async def write_connack(writer: WriterAdapter, v5: bool, session_present: bool, code: int,
                        receive_maximum: int | None = None) -> None:
    """CONNACK with ``code`` (MQTT 5 value) and no properties, as TB's ``createMqttConnAckMsg`` (MTH:1151-1157).

    ``receive_maximum`` (a test knob, ``StandIn.set_receive_maximum``; TB sends none) adds that property.
    """
    if v5:
        extra = {"receive_max": receive_maximum} if receive_maximum else {}
        await write_v5(writer, mqtt5.ConnAckPacket(session_present=session_present,
                                                   reason_code=mqtt5.ConnAckReasonCode(code), **extra))
    else:
        await ConnackPacket.build(int(session_present), v311_connack_code(code)).to_stream(writer)
