"""The settings of the authorization service, as written under the plugin's section of the broker config.

One dataclass is the schema: amqtt fills it from the ``plugins:`` section, the CLI
checks a config file against its fields, and the service is built from it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from pdp.core.admission import AdmissionSettings
from pdp.core.identity import IdentitySettings
from pdp.runtime.decision_point import PdpSettings


@dataclass(frozen=True)
class BrokerLimits:
    """What one client may cost the broker; every limit is on by default (see ServiceSettings)."""

    connect_timeout: float
    packet_timeout: float
    max_packet_size: int
    max_connections: int
    offline_queue_messages: int
    offline_queue_bytes: int
    max_inflight_messages: int
    session_queue_messages: int
    session_queue_bytes: int
    connect_rate: float
    connect_burst: int
    max_retained_messages: int
    max_retained_bytes: int
    max_retained_per_device: int
    max_retained_bytes_per_device: int


@dataclass
class ServiceSettings:
    model: str = "policies/model.conf"
    policy: str = "policies/policy.csv"
    registry: str = "policies/devices.yaml"  # or redis://host:port/db: the shared registry (pdp.registry.redis_registry)
    trust_domain: str = "example.org"
    identity_source: str = "uri-san"
    client_id: str = "{device_id}"
    require_client_certificate: bool = True
    allow_plain_tcp: bool = False
    reload_interval: float = 0.25
    settle_interval: float = 0.05  # a changed file must hold still this long (two equal reads) to be applied
    # Parse changed files in a separate loader process (message latency stays flat during a reload); false:
    # in a thread of the broker (one process less; messages wait on the parse at 10,000 rules).
    reload_process: bool = True
    crl: list[str] = field(default_factory=list)  # PEM or DER CRL files of the device CA; reloaded on change
    verify_with_casbin: bool = False
    l1_size: int = 100_000
    redis_url: str = ""
    redis_prefix: str = "mqtt-pdp"
    l2_ttl: int = 3600
    # File holding the secret that authenticates L2 entries (>= 16 bytes; same file on every broker sharing
    # the Redis). Without it, L2 is off (decisions and reload announcements still work): Redis is not trusted.
    l2_key_file: str = ""
    # Names this broker in assertion records and their hash chain; default: host name plus a random suffix kept
    # in spool_dir/node_id. With redis_url, a node id already recording on that Redis refuses to start.
    node_id: str = ""
    assertions: bool = True
    assertion_db: str = "var/assertions.db"  # "" for none
    assertion_stream: bool = False  # also append to a Redis Stream (needs redis_url)
    spool_dir: str = "var/spool"
    # Records the writer may keep stored as whole batches, not yet indexed for queries; it indexes them while
    # the broker uses less than half a core. Past it, batches are indexed as they are stored. 0: always so.
    assertion_index_backlog: int = 200_000
    retention_days: float = 0  # prune the SQLite store of records older than this; 0 keeps everything
    # Signed chain heads outside the database (mqtt-pdp log keygen; verify with --anchors and --public-key).
    anchor_key_file: str = ""  # Ed25519 private key; "" signs nothing
    anchor_dir: str = "var/anchors"  # <node>.heads, append-only, one signed head per line
    anchor_every: int = 1000  # sign after this many records...
    anchor_interval: float = 5.0  # ...or this many seconds after the first unsigned one, whichever comes first
    # When records can be neither stored nor spooled (full disk): "alarm" keeps deciding (CRITICAL logs, the
    # batch waits in memory); "refuse" denies every new connect and request until records are durable again.
    on_log_failure: str = "alarm"
    # Identical refusals (TLS handshakes, connects: same peer address, client id, reason, certificate) within
    # this many seconds of the first are one record with a count, written when the window ends.
    refusal_window: float = 60.0
    # -- what one client may cost the broker (the hardened broker; stock amqtt ignores these) --
    # TLS handshake, then the whole CONNECT packet, each within this many seconds of the previous step.
    connect_timeout: float = 10.0
    # A packet that has started to arrive must be complete within this many seconds (a stalled half-packet
    # would otherwise hold its connection forever; keep-alive only bounds the gap between packets).
    packet_timeout: float = 30.0
    # Largest packet accepted, in bytes (fixed header excluded); a larger one closes the connection
    # before its body is read.
    max_packet_size: int = 262_144
    # Connections per listener when the listener sets no max_connections; when full, new connections are
    # closed at once (amqtt would queue them, unbounded).
    max_connections: int = 10_000
    # Messages queued for one offline persistent session: at most this many, and this many payload bytes;
    # beyond either, the oldest queued message is dropped (counted, logged once per client per offline spell).
    offline_queue_messages: int = 1000
    offline_queue_bytes: int = 1_048_576
    # A live session: at most this many QoS 1/2 messages sent and not yet acknowledged (the rest wait, in order)...
    max_inflight_messages: int = 20
    # ...and at most this many messages and payload bytes held for it in all (waiting and in flight). Beyond
    # either, its oldest waiting QoS 0 message is dropped; with only QoS 1/2 left, the slow consumer is
    # disconnected (a persistent session keeps what was held, within the offline queue limits).
    session_queue_messages: int = 1000
    session_queue_bytes: int = 1_048_576
    # New connections per source address: a burst of connect_burst, then connect_rate per second (token
    # bucket); beyond, a connection is closed before its TLS handshake (counted, logged once per address).
    connect_rate: float = 50.0
    connect_burst: int = 200
    # The retained store: at most this many topics and bytes (payloads and topic names) in all, and of them for
    # one device (as admitted when it published). A retained PUBLISH beyond any is delivered but not retained,
    # and the topic's earlier retained message is removed (a stale one would pass for the newest); counted,
    # logged once per device until it retains again. amqtt kept every retained message without limit.
    max_retained_messages: int = 100_000
    max_retained_bytes: int = 268_435_456
    max_retained_per_device: int = 1_000
    max_retained_bytes_per_device: int = 16_777_216
    # -- shared certificates (pdp.core.sharing): one fingerprint on two live connections with different client
    # ids, or from two source addresses within the window: a warning, a 'shared-certificate' record and a count;
    # 'refuse' also refuses the second connection; 'off' tracks nothing.
    shared_certificate: str = "warn"
    shared_certificate_window: float = 60.0  # seconds
    # -- operating it (issue 11) --
    # Unix socket for mqtt-pdp status / sessions / kick / log-level (mode 0600, the broker's user or root
    # only); "" for none. deploy/broker.yaml sets ../var/admin.sock.
    admin_socket: str = ""
    # Prometheus metrics over HTTP at host:port, e.g. "127.0.0.1:9883" (port 0: any free port, logged);
    # "" for none. Keep it on loopback or a management interface: it is not authenticated.
    metrics: str = ""
    log_format: str = "text"  # or "json": one JSON object per line (mqtt-pdp broker)

    def broker_limits(self) -> BrokerLimits:
        """The limits, checked: each must be positive (a limit of 0 would refuse everything)."""
        limits = BrokerLimits(**{f.name: getattr(self, f.name) for f in fields(BrokerLimits)})
        for f in fields(BrokerLimits):
            value = getattr(limits, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"{f.name} must be a positive number, got {value!r}")
        return limits

    def pdp_settings(self) -> PdpSettings:
        if self.reload_interval <= 0:
            raise ValueError(f"reload_interval must be positive, got {self.reload_interval}")
        if not 0 <= self.settle_interval <= 5:
            raise ValueError(f"settle_interval must be between 0 and 5 seconds, got {self.settle_interval}")
        return PdpSettings(
            model_path=self.model,
            policy_path=self.policy,
            registry_path=self.registry,
            admission=AdmissionSettings(
                identity=IdentitySettings(trust_domain=self.trust_domain, source=self.identity_source),  # type: ignore[arg-type]
                client_id_pattern=self.client_id,
                allow_plain_tcp=self.allow_plain_tcp,
            ),
            verify_with_casbin=self.verify_with_casbin,
            l1_size=self.l1_size,
            crl_paths=tuple([self.crl] if isinstance(self.crl, str) and self.crl else self.crl or ()),
            settle=self.settle_interval,
            redis_prefix=self.redis_prefix,
        )
