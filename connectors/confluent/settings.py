"""kafka-python client settings in librdkafka's names, for configs written for kafka-python.

Only settings with one clear equivalent are translated (security, identity, timeouts, batching); any
other key is refused with its name, so a setting is never silently dropped (a SASL password that does not
reach the client would be an outage, not a detail).

>>> to_librdkafka({"security_protocol": "SASL_SSL", "sasl_mechanism": "PLAIN", "linger_ms": 5})
{'security.protocol': 'SASL_SSL', 'sasl.mechanism': 'PLAIN', 'linger.ms': 5}
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# Settings the connectors set themselves, which a client_config may not change (setting -> why): the
# sources and sinks refuse them, and the run config refuses them at load (engine/runtime/config.py).
CONSUMER_RESERVED = {
    "bootstrap.servers": "pass bootstrap=...",
    "group.id": "pass group_id=...",
    "enable.auto.commit": "offsets are committed only by the source's commit()",
    "enable.auto.offset.store": "offsets are committed only by the source's commit()",
    "error_cb": "the source watches client errors (a refused login)",
    "auto.offset.reset": "a source reads from its checkpoint's positions and restarts one that retention "
    "passed at the oldest record left (the join stage's source also counts what was deleted unread)",
}
PRODUCER_RESERVED = {
    "bootstrap.servers": "pass bootstrap=...",
    "acks": "the sink always waits for all in-sync replicas",
    "enable.idempotence": "the sink is always idempotent",
    "partitioner": "the sink uses the Java client's murmur2 partitioner",
    "on_delivery": "the sink handles delivery reports",
    "error_cb": "the sink handles client errors",
}

KAFKA_PYTHON_TO_LIBRDKAFKA = {
    "client_id": "client.id",
    "security_protocol": "security.protocol",
    "sasl_mechanism": "sasl.mechanism",
    "sasl_plain_username": "sasl.username",
    "sasl_plain_password": "sasl.password",
    "sasl_kerberos_service_name": "sasl.kerberos.service.name",
    "ssl_cafile": "ssl.ca.location",
    "ssl_certfile": "ssl.certificate.location",
    "ssl_keyfile": "ssl.key.location",
    "ssl_password": "ssl.key.password",
    "ssl_crlfile": "ssl.crl.location",
    "ssl_ciphers": "ssl.cipher.suites",
    "ssl_check_hostname": "ssl.endpoint.identification.algorithm",
    "request_timeout_ms": "request.timeout.ms",
    "metadata_max_age_ms": "metadata.max.age.ms",
    "reconnect_backoff_ms": "reconnect.backoff.ms",
    "reconnect_backoff_max_ms": "reconnect.backoff.max.ms",
    "connections_max_idle_ms": "connections.max.idle.ms",
    "linger_ms": "linger.ms",
    "compression_type": "compression.type",
    "batch_size": "batch.size",
    "retry_backoff_ms": "retry.backoff.ms",
    "max_request_size": "message.max.bytes",
}


def to_librdkafka(settings: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    unknown = []
    for key, value in settings.items():
        name = KAFKA_PYTHON_TO_LIBRDKAFKA.get(key)
        if name is None:
            unknown.append(key)
            continue
        if key == "ssl_check_hostname":
            value = "https" if value else "none"
        out[name] = value
    if unknown:
        raise ValueError(
            f"kafka-python settings without a librdkafka equivalent here: {sorted(unknown)}; give the "
            "confluent client its own settings (librdkafka names) or use the kafka-python client"
        )
    return out
