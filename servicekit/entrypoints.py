"""Entrypoint decorators with our defaults.

RPC replies are transient and published without publisher confirms (nameko's default is
persistent and confirmed). A caller whose broker restarts loses its connection and its reply
queue anyway, so a persisted reply only serves a caller that is gone; a reply lost to a broker
failure surfaces as the caller's timeout, exactly like a lost connection. Events are not
affected: they stay persistent and confirmed through the outbox (``servicekit.outbox``).
"""
import sys

import kombu.serialization
from kombu import Connection
from kombu.pools import producers
from nameko.constants import (
    AMQP_SSL_CONFIG_KEY, AMQP_URI_CONFIG_KEY, DEFAULT_RETRY_POLICY, DEFAULT_TRANSPORT_OPTIONS,
    LOGIN_METHOD_CONFIG_KEY, NON_PERSISTENT,
)
from nameko.exceptions import UnserializableValueError, serialize
from nameko.rpc import Rpc as _NamekoRpc, RpcConsumer as _NamekoRpcConsumer, get_rpc_exchange

from contracts.errors import TYPED_ERRORS


class ReplyPublisher:
    """Publishes RPC replies: transient, no confirms, serialized once.

    nameko's ``Responder`` builds a ``Publisher`` per reply, serializes the result twice (a
    ``dumps`` check, then the publish) and waits for a broker confirm of a persistent message.
    """

    def __init__(self, config):
        self.exchange = get_rpc_exchange(config)
        transport_options = DEFAULT_TRANSPORT_OPTIONS.copy()
        transport_options["confirm_publish"] = False
        # built once: the producer pool is keyed by the connection's parameters
        self.connection = Connection(
            config[AMQP_URI_CONFIG_KEY], transport_options=transport_options,
            ssl=config.get(AMQP_SSL_CONFIG_KEY), login_method=config.get(LOGIN_METHOD_CONFIG_KEY))

    def send_response(self, message, result, exc_info):
        """Same contract as ``nameko.rpc.Responder.send_response``: returns (result, exc_info),
        an unserializable result becoming an ``UnserializableValueError`` reply."""
        error = serialize(exc_info[1]) if exc_info is not None else None
        # reply encoded the same way as the request
        serializer = kombu.serialization.registry.type_to_name[message.properties["content_type"]]
        try:
            content_type, encoding, body = kombu.serialization.dumps(
                {"result": result, "error": error}, serializer)
        except Exception:
            exc_info = sys.exc_info()
            # guaranteed to serialize
            error = serialize(UnserializableValueError(result))
            result = None
            content_type, encoding, body = kombu.serialization.dumps(
                {"result": result, "error": error}, serializer)

        with producers[self.connection].acquire(block=True) as producer:
            producer.publish(
                body, content_type=content_type, content_encoding=encoding,
                exchange=self.exchange, routing_key=message.properties["reply_to"],
                correlation_id=message.properties.get("correlation_id"),
                delivery_mode=NON_PERSISTENT, headers={},
                retry=True, retry_policy=DEFAULT_RETRY_POLICY,
            )
        return result, exc_info


class RpcConsumer(_NamekoRpcConsumer):
    """nameko's RPC consumer, replying through a ``ReplyPublisher``."""

    reply_publisher = None

    def setup(self):
        super().setup()
        self.reply_publisher = ReplyPublisher(self.container.config)

    def handle_result(self, message, result, exc_info):
        result, exc_info = self.reply_publisher.send_response(message, result, exc_info)
        self.queue_consumer.ack_message(message)
        return result, exc_info


class Rpc(_NamekoRpc):
    rpc_consumer = RpcConsumer()


def rpc(fn=None, **options):
    """``@rpc`` whose typed domain errors are answers, not crashes, and whose replies are
    transient (see the module docstring).

    nameko logs exceptions listed in ``expected_exceptions`` as expected instead of as
    worker errors. Usable as ``@rpc`` or ``@rpc(...)``.
    """
    options.setdefault("expected_exceptions", TYPED_ERRORS)
    if fn is None:
        return Rpc.decorator(**options)
    return Rpc.decorator(**options)(fn)
