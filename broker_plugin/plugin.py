"""amqtt plugin: binds each MQTT session to a certificate-proven device and asks the authorization service about it.

Thin glue: it turns amqtt's sessions into connect requests and verdict requests
for ``pdp.runtime.service.AuthorizationService`` (which holds the enforcement
core). Loaded through amqtt's ``plugins:`` configuration. Under stock amqtt it
works as an auth plus topic plugin (with amqtt's holes);
``broker_plugin.broker.HardenedBroker`` calls it directly and closes them.
"""

from __future__ import annotations

from typing import Any

from broker_plugin.amqtt_compat import Action, BaseAuthPlugin, BaseTopicPlugin, Session
from pdp.core.admission import Admission, ConnectRequest
from pdp.core.enforcement import ConnId, Origin
from pdp.runtime.service import Aborter, AuthorizationService, Closer
from pdp.runtime.settings import ServiceSettings

CONN_KEY = "mqtt_pdp.conn"


def peer_certificate(session: Session) -> bytes | None:
    ssl_object = session.ssl_object
    if ssl_object is None:
        return None
    return ssl_object.getpeercert(binary_form=True) or None


def connection_of(session: Session) -> ConnId | None:
    conn = session.attributes.get(CONN_KEY)
    return conn if isinstance(conn, int) else None


class DeviceAuthorizationPlugin(BaseAuthPlugin, BaseTopicPlugin):
    Config = ServiceSettings

    def __init__(self, context: Any) -> None:
        super().__init__(context)
        self.service = AuthorizationService(self.config)
        # The hardened broker reports each connection's end itself (a resumed session outlives its connection);
        # under stock amqtt the disconnect event is all there is.
        self.broker_reports_closes = False

    # -- connect ------------------------------------------------------------------------

    def admit_session(self, session: Session, persistent: bool = False) -> tuple[Admission, list[Any]]:
        """Decide the connect from the session's verified certificate; the session now names this connection.

        Returns the admission and the Disconnects of a previous connection of the same client id.
        """
        conn = self.service.new_connection()
        session.attributes[CONN_KEY] = conn
        request = ConnectRequest(
            client_id=session.client_id or "",
            certificate_der=peer_certificate(session),
            tls=session.ssl_object is not None,
            will_topic=session.will_topic if session.will_flag else None,
        )
        return self.service.connect(conn, request, f"{session.remote_address}:{session.remote_port}", persistent)

    def admission(self, session: Session) -> Admission | None:
        conn = connection_of(session)
        return self.service.enforcer.admission_of(conn) if conn is not None else None

    async def authenticate(self, *, session: Session) -> bool:
        return self.admit_session(session, persistent=not session.clean_session)[0].allowed

    def unsubscribed(self, session: Session, topic_filter: str) -> None:
        conn = connection_of(session)
        if conn is not None:
            self.service.unsubscribed(conn, topic_filter)

    def connection_closed(self, session: Session) -> None:
        conn = connection_of(session)
        if conn is not None:
            self.service.closed(conn)

    # -- publish / subscribe / receive / will -----------------------------------------------

    def allows(self, session: Session, action: str, topic: str, origin: Origin = "live",
               publisher: Admission | None = None) -> bool:
        """Synchronous verdict for one request of the session's current connection; anything else is refused."""
        conn = connection_of(session)
        if conn is None:
            return False
        return self.service.allows(conn, action, topic, origin, publisher)

    def publish_relay(self, session: Session, topic: str) -> tuple[bool, tuple[str, str] | None]:
        """A publish that may be a gateway relaying for a child: allowed, and (child, inner topic) or None."""
        conn = connection_of(session)
        if conn is None:
            return False, None
        return self.service.publish_relay(conn, topic)

    def publisher(self, session: Session | None) -> Admission | None:
        """What a retained message remembers of its publisher: the device and the certificate it used."""
        admission = self.admission(session) if session is not None else None
        return admission if admission is not None and admission.device is not None else None

    async def topic_filtering(
        self, *, session: Session | None = None, topic: str | None = None, action: Action | None = None
    ) -> bool:
        if session is None or topic is None or action is None:
            return False
        return self.allows(session, str(action), topic)

    # -- lifecycle ------------------------------------------------------------------------

    def set_closer(self, closer: Closer, aborter: Aborter | None = None) -> None:
        """The broker's way to carry out a disconnect or a dropped session (and to drop a socket at once)."""
        self.service.closer = closer
        self.service.aborter = aborter

    async def on_broker_post_start(self) -> None:
        self.service.start()

    async def on_broker_client_disconnected(self, *, client_id: str, client_session: Session) -> None:
        if not self.broker_reports_closes:
            self.connection_closed(client_session)

    async def close(self) -> None:
        await self.service.close()
