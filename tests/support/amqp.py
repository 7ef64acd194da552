"""A plain kombu connection to a test vhost: observer queues on event exchanges, raw publishing."""
import json
import uuid

from kombu import Connection, Queue
from nameko.standalone.events import get_event_exchange

from tests.support.polling import wait_for


class AmqpClient:
    """Observer queues are named ``<queue_prefix>-<source>-<routing key>-<random>``;
    ``delivery_mode`` (e.g. 2, persistent) applies to every ``publish_event`` unless overridden."""

    def __init__(self, uri: str, queue_prefix: str = "test", delivery_mode: int | None = None):
        self.connection = Connection(uri)
        self.channel = self.connection.channel()
        self.queue_prefix = queue_prefix
        self.delivery_mode = delivery_mode

    def close(self):
        self.connection.release()

    def bind(self, source: str, routing_key: str, name: str | None = None) -> Queue:
        """A queue on ``<source>.events`` bound to ``routing_key``; bind before the event happens."""
        queue = Queue(name or f"{self.queue_prefix}-{source}-{routing_key}-{uuid.uuid4().hex[:6]}",
                      exchange=get_event_exchange(source, {}), routing_key=routing_key,
                      durable=False, auto_delete=False)
        return self.declare(queue)

    def declare(self, queue: Queue) -> Queue:
        queue(self.channel).declare()
        return queue

    def get(self, queue: Queue):
        return queue(self.channel).get(no_ack=True)

    def drain(self, queue: Queue) -> list:
        messages = []
        while (message := self.get(queue)) is not None:
            messages.append(message)
        return messages

    def wait_message(self, queue: Queue, timeout=5.0):
        return wait_for(lambda: self.get(queue), timeout=timeout, message=f"a message in {queue.name}")

    def count(self, queue: Queue) -> int:
        return queue(self.channel).queue_declare(passive=True).message_count

    def message_count(self, queue_name: str) -> int:
        return self.count(Queue(queue_name))

    def publish_event(self, source: str, event_type: str, body, **kwargs) -> None:
        """``body``: a dict (sent as JSON) or str/bytes sent as they are."""
        exchange = get_event_exchange(source, {})
        kwargs.setdefault("delivery_mode", self.delivery_mode)
        producer = self.connection.Producer(self.channel)
        producer.publish(body if isinstance(body, (str, bytes)) else json.dumps(body),
                         exchange=exchange, routing_key=event_type, declare=[exchange],
                         content_type="application/json", content_encoding="utf-8", **kwargs)
