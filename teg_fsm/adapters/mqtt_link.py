"""The MQTT link to ThingsBoard: one paho client per session, no automatic reconnect.

Theory of operation
-------------------
The connection machine decides when to connect; this adapter only carries
out one ``connect`` at a time. Each connect builds a fresh paho 2.x client
(``CallbackAPIVersion.VERSION2``, MQTT 3.1.1 or 5 as configured,
``reconnect_on_failure=False``)
and a session number. TCP/TLS set-up runs on a short-lived thread; then the
session's network thread (ours, named ``paho-mqtt-client-`` as paho's own was)
runs paho's external-loop API until the connection ends, and exits. A new
connect first closes the previous session, so at most one session is live.

The network loop
----------------
Paho's ``loop_start`` thread wakes from ``select`` once a second whatever
happens (``loop_forever(timeout=1.0)``): at one controller row a second that
alone is one wake-up per row (issue #16). Our loop ``select``s on the socket
and on a wake-up socketpair of the session, with a timeout that ends when
paho's keepalive check is next due, so an idle session wakes only to send a
PINGREQ and read its PINGRESP:

- the deadline is ``min(last packet out, last byte in, PINGREQ sent) +
  keepalive``, read from paho's clock fields just before each ``select``:
  ``loop_misc`` then sends the PINGREQ on time (a broker drops a session after
  1.5 x keepalive of silence), and one keepalive after an unanswered PINGREQ it
  closes the session (paho's check, unchanged);
- a TLS socket may hold decrypted bytes that ``select`` cannot see: when
  ``pending()`` says so the loop reads without waiting, as paho's loop does;
- other threads never touch the socket. With ``on_socket_register_write`` set
  and no paho thread, paho's ``_packet_queue`` only appends the packet to its
  deque and calls that callback (it writes straight to the socket only when
  neither is there: the reason the old code needed ``loop_start``); our callback
  writes one byte to the wake-up pair, and the loop writes the packet. Paho
  calls the callback only when its ``_registered_write`` flag is down, and
  publishing threads test and raise that flag unlocked, so the loop never
  trusts the flag. ``loop_write`` ends by lowering it unless ``want_write()``,
  and the loop calls it after a wake, when ``select`` found the socket writable,
  and whenever nothing is queued (free then: it only lowers the flag), so a
  pass never ends with the flag up and the queue empty; the writable set of
  each ``select`` is ``want_write()`` asked afresh. A publisher that finds the
  flag down wakes the loop; one that finds it still up appended its packet
  before the loop's next ``want_write()``, which sees it. (Writing only when
  ``want_write()`` would lose a wake: a flag left up with nothing queued
  swallows the next publisher's wake until the keepalive timeout. Writing on
  every pass costs: a TLS write into a full socket after each PUBACK read
  halved the throughput of 63 KiB packets in ``tools/bench_mqtt_link.py``);
- a close (``_close``, the gateway stopping) queues the DISCONNECT and wakes the
  loop at once; if the peer does not take it, the loop shuts the socket down
  itself ``CLOSE_GRACE_S`` later (a deadline in its own timeout, no timer thread).
  Other threads only ``shutdown`` a session's socket (which wakes ``select``),
  never close it: a descriptor closed under ``select`` would not wake it.

Sessions are ``device`` (username = the token read from the token file at
connect time) or ``provision`` (username ``provision``). Only device sessions
post ``mqtt_connected`` / ``mqtt_disconnected``; the provisioning exchange is
private to the provisioning effects.

Publishing (``publish_async``; thread-safe, for hot paths that must not put
payloads into journaled effects)::

    link.publish_async(topic, payload_bytes, qos, on_done)

``on_done(ok: bool, error: str | None)`` is called exactly once: on PUBACK
(QoS 1) or when the packet was written (QoS 0) from the network thread, with
``False`` when the session is lost first, or at once (in the caller's thread)
when there is no device session or paho refuses the message (queue full,
payload too large). Keep ``on_done`` short: it runs on the network thread.

MQTT 5 (``protocol="5"``) differs in three places, all turned into the same
plain data as on 3.1.1:
- CONNACK: the reason codes 0x86/0x87 are "not authorized" exactly as the
  3.1.1 return codes 4/5 (paho 2 reports those as 0x86/0x87 too), every other
  refusal is a failed connect the machine retries with backoff.
- PUBACK with a reason code >= 0x80 (ThingsBoard: 0x99 payload format invalid,
  0x90 topic name invalid, 0x83 ...): the packet reached ThingsBoard and was
  turned down, so sending it again cannot help. ``on_done`` gets ``False`` and
  a ``Refused`` error (a ``str`` carrying ``reason`` and ``code``), distinct from
  a packet lost with its session; callers drop or dead-letter it.
- CONNACK's Receive Maximum bounds the QoS 1 publishes in flight: paho's own
  window is lowered to it and ``mqtt_connected`` carries ``receive_maximum`` so
  the uplink caps its window too. A server DISCONNECT's reason is logged and
  ends the session like any lost connection.

Paho quirks handled here (see aiomqtt's client for the same ideas):
- ``on_publish`` may run before ``publish()`` has returned the mid to us; an
  unmatched mid is parked in ``early`` and picked up when we register it. Every
  mid gets exactly one ``on_publish`` (QoS 0 included), so the park never leaks.
- ``on_publish`` runs with paho's ``_out_message_mutex`` held, so we never
  call into paho while holding our own lock (no lock-order deadlock).
- ``on_connect`` may be called twice and ``on_disconnect`` may come more than
  once or late for an old client: both are idempotent per session.
- Without a paho thread and without ``on_socket_register_write``, paho writes to
  the socket from the publishing thread, unsynchronised with the network thread:
  every client gets the callback before its ``connect``.
- Callbacks that raise propagate out of ``loop_read`` (``suppress_exceptions`` is
  off): the loop logs them and ends the session instead of dying silently.
"""

from __future__ import annotations

import itertools
import logging
import select
import socket
import ssl
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from teg_fsm.adapters import tokens
from teg_fsm.adapters.mqtt_inbound import Inbound

log = logging.getLogger(__name__)

OnDone = Callable[[bool, "str | None"], None]
Post = Callable[[str, dict[str, Any]], None]

DEVICE = "device"
PROVISION = "provision"
CLOSE_GRACE_S = 3.0  # after a DISCONNECT we asked for, the socket is cut if the session has not ended
THREAD_NAME = "paho-mqtt-client-"  # the network thread keeps the name paho's own thread had
KEEPALIVE_SLACK_S = 0.01  # wake this much after paho's keepalive check is due, never just before it
# CONNACK codes the connection machine treats as a rejected token: MQTT 3.1.1's 4 (bad user
# name or password) and 5 (not authorized), which paho 2 reports as MQTT 5's 0x86 and 0x87, and
# those two on MQTT 5 (ThingsBoard: MTH:1346-1362). Others (0x85 client id, 0x9F rate, 0x88
# unavailable, ...) are a failed connect, retried with backoff, as 3.1.1's 2 and 3 are.
_NOT_AUTHORIZED = {4, 5, 134, 135}
PROTOCOLS = {"3.1.1": mqtt.MQTTv311, "5": mqtt.MQTTv5}


class Refused(str):
    """The ``on_done`` error of a packet ThingsBoard refused with a reason code (MQTT 5 PUBACK >= 0x80).

    A ``str`` so every existing ``on_done`` still reads it as an error message; callers
    that must tell a refused packet from a lost one test ``isinstance(error, Refused)``.
    """

    reason: str
    code: int

    def __new__(cls, reason: str, code: int) -> Refused:
        text = super().__new__(cls, f"refused by ThingsBoard: {reason} (0x{code:02X})")
        text.reason, text.code = reason, code
        return text


class Session:
    """One paho client, what is pending on it, and its network loop's wake-up pair."""

    def __init__(self, number: int, purpose: str, client: mqtt.Client, on_connected: Any) -> None:
        self.number = number
        self.purpose = purpose
        self.client = client
        self.on_connected = on_connected  # the Connect effect's Completion
        self.connected = False
        self.ended = threading.Event()
        self.reason = ""
        self.pending: dict[int, OnDone] = {}
        self.receive_maximum: int | None = None  # MQTT 5 CONNACK property, when the server sent one
        self.early: dict[int, Any] = {}  # mid -> reason code, acknowledged before registration
        self.cut_at: float | None = None  # paho's clock: shut the socket down if still open then
        self.loop_thread: threading.Thread | None = None
        self._waker, self._wakee = socket.socketpair()
        self._waker.setblocking(False)
        self._wakee.setblocking(False)
        self._wake_lock = threading.Lock()  # a wake never meets a closed (or reused) descriptor
        self._wake_closed = False

    def wake(self) -> None:
        """Make the network loop's ``select`` return (any thread; one byte, or none if one waits)."""
        with self._wake_lock:
            if self._wake_closed:
                return
            try:
                self._waker.send(b"\0")
            except OSError:  # BlockingIOError: the pair is full, so the loop wakes anyway
                pass

    def wake_fileno(self) -> int:
        return self._wakee.fileno()

    def drain_wakes(self) -> None:
        try:
            while self._wakee.recv(4096):
                pass
        except OSError:  # BlockingIOError: drained
            pass

    def close_wakes(self) -> None:
        with self._wake_lock:
            self._wake_closed = True
            self._waker.close()
            self._wakee.close()


class MqttLink:
    """Sessions, publishes matched to PUBACKs, inbound messages turned into events."""

    def __init__(
        self,
        *,
        host: str,
        port: int,
        tls: bool,
        ca_cert: Path | None,
        token_path: Path,
        post: Post,
        keepalive: int = 60,
        max_inflight: int = 100,
        max_queued: int = 1000,
        protocol: str = "3.1.1",
    ) -> None:
        self.host, self.port, self.tls, self.ca_cert = host, port, tls, ca_cert
        self.protocol = PROTOCOLS[protocol]
        self.token_path = token_path
        self.keepalive = keepalive
        self.max_inflight, self.max_queued = max_inflight, max_queued
        self._lock = threading.Lock()
        self._numbers = itertools.count(1)
        self._current: Session | None = None
        self._closed = False  # after close(): the gateway is stopping, so no new session
        self.inbound = Inbound(post=post, token_path=token_path)
        self._post = post

    # -- sessions ---------------------------------------------------------

    @property
    def session(self) -> Session | None:
        return self._current

    def device_session(self) -> Session | None:
        session = self._current
        if session is None or not session.connected or session.purpose != DEVICE:
            return None
        return session

    def connect(self, purpose: str, completion: Any) -> None:
        """Open a session; ``completion`` succeeds on CONNACK 0 with ``{"session": n}``."""
        self.close_current("replaced by a new connect")
        if purpose == PROVISION:
            username = PROVISION
        else:
            try:
                username = tokens.read_token(self.token_path)
            except OSError as exc:
                completion.fail(f"cannot read the token file {self.token_path}: {exc.strerror}", {"no_token": True})
                return
            if username is None:
                completion.fail(f"no access token in {self.token_path}", {"no_token": True})
                return
        session = Session(next(self._numbers), purpose, self._make_client(username), completion)
        session.client.user_data_set(session)
        with self._lock:
            closed = self._closed
            if not closed:
                self._current = session
        if closed:  # the machines keep running while the other components stop
            session.close_wakes()
            completion.fail("the gateway is stopping", {"network": True})
            return
        threading.Thread(target=self._open, args=(session,), name=f"teg-mqtt-connect-{session.number}", daemon=True).start()

    def _make_client(self, username: str) -> mqtt.Client:
        # MQTT 5 has no clean_session (paho refuses it); its clean start is on for a
        # client's first connect, and every session here is a new client.
        clean = {"clean_session": True} if self.protocol != mqtt.MQTTv5 else {}
        client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id="",
            protocol=self.protocol,
            reconnect_on_failure=False,
            **clean,
        )
        client.username_pw_set(username)
        if self.tls:
            client.tls_set(ca_certs=str(self.ca_cert) if self.ca_cert else None, cert_reqs=ssl.CERT_REQUIRED)
        client.max_inflight_messages_set(self.max_inflight)
        client.max_queued_messages_set(self.max_queued)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        # The external-loop callbacks: set before connect(), so paho never writes from our caller.
        client.on_socket_open = _on_socket_open
        client.on_socket_register_write = _on_socket_register_write
        client.on_socket_close = _on_socket_register_write  # a close by another thread must wake the loop
        return client

    def _open(self, session: Session) -> None:
        """TCP + TLS (blocking, bounded by paho's connect_timeout) and CONNECT queued, then the network loop."""
        try:
            session.client.connect(self.host, self.port, keepalive=self.keepalive)
        except (OSError, ssl.SSLError, ValueError) as exc:
            # ssl.SSLError is an OSError; name it so certificate problems read clearly.
            kind = "TLS" if isinstance(exc, ssl.SSLError) else "network"
            session.on_connected.fail(f"cannot connect to {self.host}:{self.port} ({kind}): {exc}", {"network": True})
            self._ended(session, f"{kind} error: {exc}")
            session.close_wakes()
            return
        if session.ended.is_set() or self._current is not session:
            _close_socket(session.client)  # closed while we were connecting; no loop runs yet
            self._ended(session, "closed while connecting")
            session.close_wakes()
            return
        session.loop_thread = threading.Thread(target=self._run, args=(session,), name=THREAD_NAME, daemon=True)
        session.loop_thread.start()

    def close_current(self, reason: str) -> None:
        with self._lock:
            session, self._current = self._current, None
        if session is not None:
            self._close(session, reason)

    def _close(self, session: Session, reason: str) -> None:
        if not session.reason:
            session.reason = reason
        # A stuck peer may never let the DISCONNECT out; the machines must still hear the end.
        session.cut_at = mqtt.time_func() + CLOSE_GRACE_S
        session.client.disconnect()  # queued; the network loop sends it, then paho closes the socket
        session.wake()  # at once, even if paho thought the loop already knew there is a packet to write
        if not session.connected:
            session.on_connected.fail(f"connect abandoned: {reason}", {"network": True})
            self._ended(session, reason)

    def close(self, timeout: float = 3.0) -> None:
        """Disconnect cleanly; a dead network is cut off after ``timeout`` s."""
        with self._lock:
            self._closed = True
            session, self._current = self._current, None
        if session is None:
            return
        self._close(session, "gateway stopping")
        if not session.ended.wait(timeout):
            _cut_off(session)
            session.ended.wait(2.0)
        self._ended(session, "gateway stopping")
        thread = session.loop_thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(2.0)  # it exits once paho has closed the socket; stopping leaves no thread behind

    # -- the network loop (the session's network thread) -------------------

    def _run(self, session: Session) -> None:
        """The session's network thread: the loop, then whatever it left open is closed and ended."""
        try:
            self._network_loop(session)
        except Exception:  # a raising callback (paho re-raises them) must not leave the session hanging
            log.exception("MQTT %s session %d: the network loop failed", session.purpose, session.number)
        finally:
            _close_socket(session.client)  # open only after a cut-off or a failure of the loop itself
            self._ended(session, "network loop ended")
            session.close_wakes()

    def _network_loop(self, session: Session) -> None:
        """``select`` on the socket and the wake-up pair until paho has closed the socket (module docstring)."""
        client, wakee = session.client, session.wake_fileno()
        while (sock := client.socket()) is not None:
            buffered = _tls_pending(sock)
            timeout = 0.0 if buffered else self._select_timeout(session)
            writable = [sock] if client.want_write() else []
            try:
                readable, ready_w, _ = select.select([sock, wakee], writable, [], timeout)
            except (OSError, ValueError) as exc:  # the descriptor was closed under us
                self._ended(session, f"socket closed: {exc}")
                return
            if wakee in readable:
                session.drain_wakes()  # before loop_write: a wake that comes after it stays pending
            if sock in readable or buffered:
                client.loop_read()
                if client.socket() is None:
                    return  # paho closed it and has called on_disconnect
            if ready_w or wakee in readable or not client.want_write():
                client.loop_write()  # see the module docstring for when, and why not on every pass
            if client.socket() is None:
                return
            client.loop_misc()  # keepalive: PINGREQ when due, the end of a session whose PINGRESP never came
            cut_at = session.cut_at  # set by the closing thread
            if cut_at is not None and mqtt.time_func() >= cut_at and client.socket() is not None:
                _shutdown(sock)  # the DISCONNECT did not get out in time
                client.loop_read()  # reads the end of the stream: paho closes and calls on_disconnect
                return

    def _select_timeout(self, session: Session) -> float | None:
        """Until paho's keepalive check is due, or the close's cut-off if sooner (None: no deadline)."""
        deadlines = [d for d in (_keepalive_due(session.client, self.keepalive), session.cut_at) if d is not None]
        if not deadlines:
            return None
        return max(0.0, min(deadlines) - mqtt.time_func())

    # -- paho callbacks (the network thread) -------------------------------

    def _on_connect(self, client: mqtt.Client, session: Session, flags: Any, reason: Any, properties: Any) -> None:
        if session.connected or session.ended.is_set():
            return  # paho may call on_connect twice; the first one counts
        code = int(getattr(reason, "value", reason))
        if getattr(reason, "is_failure", code != 0):
            session.on_connected.fail(
                f"CONNACK refused: {reason} ({code})",
                {"reason_code": code, "not_authorized": code in _NOT_AUTHORIZED},
            )
            return
        session.connected = True
        self._take_receive_maximum(client, session, properties)
        if not session.on_connected.succeed({"session": session.number}):
            client.disconnect()  # the Connect effect already timed out or was cancelled
            return
        if session.purpose == DEVICE:
            connected: dict[str, Any] = {"session": session.number}
            if session.receive_maximum is not None:
                connected["receive_maximum"] = session.receive_maximum
            self._post("mqtt_connected", connected)
        log.info("MQTT %s session %d connected to %s:%d", session.purpose, session.number, self.host, self.port)

    def _take_receive_maximum(self, client: mqtt.Client, session: Session, properties: Any) -> None:
        """MQTT 5: at most Receive Maximum QoS 1 publishes unacknowledged (absent: 65,535).

        Paho 2.2 ignores the property and its ``max_inflight_messages`` setter refuses
        once connected, so the window is set on the attribute it reads before each
        send. Safe here: a fresh client has nothing in flight before its CONNACK.
        """
        maximum = getattr(properties, "ReceiveMaximum", None)
        if not isinstance(maximum, int) or maximum <= 0:
            return
        session.receive_maximum = maximum
        if maximum < self.max_inflight:
            client._max_inflight_messages = maximum
            log.info("ThingsBoard's Receive Maximum is %d: at most %d publishes in flight", maximum, maximum)

    def _on_disconnect(self, client: mqtt.Client, session: Session, flags: Any, reason: Any, properties: Any) -> None:
        if getattr(flags, "is_disconnect_packet_from_server", False):
            # MQTT 5: the server says why (ThingsBoard: 0x8E session taken over, 0x98 token
            # changed, 0x99 payload, 0x83 rate limit, ...). A loss like any other, but say why.
            code = int(getattr(reason, "value", 0) or 0)
            log.warning("MQTT %s session %d: ThingsBoard sent DISCONNECT %s (0x%02X)",
                        session.purpose, session.number, reason, code)
            self._ended(session, f"DISCONNECT from ThingsBoard: {reason} (0x{code:02X})")
            return
        self._ended(session, str(reason))

    def _ended(self, session: Session, reason: str) -> None:
        """Idempotent end of a session: fail what is pending, tell the machines once."""
        with self._lock:
            if session.ended.is_set():
                return
            session.ended.set()
            if self._current is session:
                self._current = None
            pending, session.pending = session.pending, {}
        reason = session.reason or reason
        session.on_connected.fail(f"connection closed before CONNACK: {reason}", {"network": True})
        for on_done in pending.values():
            on_done(False, f"session lost before the acknowledgement: {reason}")
        self.inbound.session_lost(session.number, reason)
        if session.connected and session.purpose == DEVICE:
            self._post("mqtt_disconnected", {"session": session.number, "reason": reason})
        if session.connected:
            # A close we asked for is routine; a lost connection is worth a warning.
            level = logging.INFO if session.reason else logging.WARNING
            log.log(level, "MQTT %s session %d ended: %s", session.purpose, session.number, reason)

    def _on_publish(self, client: mqtt.Client, session: Session, mid: int, reason: Any, properties: Any) -> None:
        with self._lock:
            on_done = session.pending.pop(mid, None)
            if on_done is None:
                session.early[mid] = reason  # publish() has not returned this mid to us yet
        if on_done is not None:
            _finish(on_done, reason)

    def _on_subscribe(self, client: mqtt.Client, session: Session, mid: int, codes: Any, properties: Any) -> None:
        self._on_publish(client, session, mid, _first_failure(codes), properties)

    def _on_message(self, client: mqtt.Client, session: Session, message: mqtt.MQTTMessage) -> None:
        try:
            self.inbound.handle(session.number, message.topic, bytes(message.payload))
        except Exception:  # a bug in one message must not stop the network thread
            log.exception("handling an MQTT message on %s failed", message.topic)

    # -- outbound ---------------------------------------------------------

    def publish_async(self, topic: str, payload: bytes, qos: int, on_done: OnDone, session: Session | None = None) -> None:
        """Publish on the device session (or ``session``); see the module docstring."""
        session = session or self.device_session()
        if session is None or not session.connected:
            on_done(False, "not connected to ThingsBoard")
            return
        try:
            info = session.client.publish(topic, payload, qos=qos)
        except (ValueError, RuntimeError) as exc:  # oversize payload, bad topic
            on_done(False, f"publish refused: {exc}")
            return
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            on_done(False, f"publish refused: {mqtt.error_string(info.rc)}")
            return
        self._register(session, info.mid, on_done)

    def subscribe(self, topics: tuple[str, ...], on_done: OnDone, session: Session | None = None) -> None:
        """Subscribe at QoS 1; ``on_done`` on SUBACK (failure if any filter is refused)."""
        session = session or self._current
        if session is None or not session.connected:
            on_done(False, "not connected to ThingsBoard")
            return
        rc, mid = session.client.subscribe([(t, 1) for t in topics])
        if rc != mqtt.MQTT_ERR_SUCCESS or mid is None:
            on_done(False, f"subscribe refused: {mqtt.error_string(rc)}")
            return
        self._register(session, mid, on_done)

    def _register(self, session: Session, mid: int, on_done: OnDone) -> None:
        with self._lock:
            early = mid in session.early  # acknowledged even if the session ended since
            reason = session.early.pop(mid, None)
            lost = not early and session.ended.is_set()
            if not lost and not early:
                session.pending[mid] = on_done
        if lost:
            on_done(False, f"session lost before the acknowledgement: {session.reason or 'connection closed'}")
        elif early:
            _finish(on_done, reason)


def _finish(on_done: OnDone, reason: Any) -> None:
    """A PUBACK or SUBACK arrived: success, or (MQTT 5, code >= 0x80) a refusal."""
    if reason is not None and getattr(reason, "is_failure", False):
        on_done(False, Refused(str(reason), int(getattr(reason, "value", 0x80))))
    else:
        on_done(True, None)


def _cut_off(session: Session) -> None:
    """Shut the socket of a session that did not end by itself; the network loop then ends it."""
    if session.ended.is_set():
        return
    sock = session.client.socket()
    if sock is not None:
        _shutdown(sock)  # wakes the loop's select with the end of the stream


def _shutdown(sock: Any) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _close_socket(client: mqtt.Client) -> None:
    """Close a socket paho still holds, on the thread that owns it (no loop reads it any more)."""
    sock = client.socket()
    if sock is not None:
        try:
            sock.close()
        except OSError:
            pass


def _tls_pending(sock: Any) -> bool:
    """Decrypted bytes the SSL object holds: ``select`` cannot see them (paho's loop checks too)."""
    pending = getattr(sock, "pending", None)
    return pending is not None and pending() > 0


def _keepalive_due(client: mqtt.Client, keepalive: int) -> float | None:
    """When paho's ``loop_misc`` must next run, on paho's clock (``mqtt.time_func``).

    Its keepalive check sends a PINGREQ once ``keepalive`` has passed since the last
    packet out or the last byte in, and closes the session ``keepalive`` after an
    unanswered PINGREQ. Paho keeps those times in private fields: if they are gone
    (another paho version), fall back to the one-second poll of ``loop_forever``.
    """
    if keepalive <= 0:
        return None
    try:
        last = min(client._last_msg_out, client._last_bytes_received)
        ping = client._ping_t
    except AttributeError:
        return mqtt.time_func() + 1.0
    if ping > 0:
        last = min(last, ping)
    return last + keepalive + KEEPALIVE_SLACK_S


def _on_socket_open(client: mqtt.Client, session: Session, sock: Any) -> None:
    _no_delay(sock)  # before the CONNECT goes out


def _on_socket_register_write(client: mqtt.Client, session: Session, sock: Any) -> None:
    """Paho queued a packet (or closed the socket): wake the loop, unless this is the loop itself."""
    thread = session.loop_thread
    if thread is None or thread.ident != threading.get_ident():
        session.wake()


def _first_failure(codes: Any) -> Any:
    """SUBACK: one reason code per filter; report the first refused one."""
    for code in codes or ():
        if getattr(code, "is_failure", False):
            return code
    return None


def _no_delay(sock: Any) -> None:
    """TCP_NODELAY: paho does not set it. Without it an RPC reply, written by the
    dispatcher thread just after paho's thread wrote the request's PUBACK, waits for
    the broker's delayed ACK of that PUBACK (Nagle): about 40 ms per RPC on Linux."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (AttributeError, OSError):  # no socket (closed meanwhile) or not TCP
        pass
