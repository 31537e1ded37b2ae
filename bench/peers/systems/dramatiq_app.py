"""Dramatiq on Redis (its Redis broker, keys under the phase's namespace) or
RabbitMQ (``confirm_delivery=True``, as retrybus's publish waits for the
broker's confirm), one actor per handler kind on the phase's queue.

Consumer: ``dramatiq dramatiq_app --processes 1 --threads 16`` (READY from a
middleware's ``after_worker_boot``). Publisher: ``python dramatiq_app.py MODE COUNT``
(``actor.send``). Fail-once: ``max_retries=1, min_backoff=1, max_backoff=1`` (ms).
"""

from __future__ import annotations

from typing import Any

import dramatiq
from _common import AMQP_URL, BROKER, NS, REDIS_URL, handle, run_publisher
from dramatiq.middleware import Middleware


class Ready(Middleware):
    def after_worker_boot(self, broker: Any, worker: Any) -> None:
        import _probe

        _probe.ready()


if BROKER == "redis":
    from dramatiq.brokers.redis import RedisBroker

    broker = RedisBroker(url=REDIS_URL, namespace=NS)
elif BROKER == "rabbitmq":
    from dramatiq.brokers.rabbitmq import RabbitmqBroker

    broker = RabbitmqBroker(url=AMQP_URL, confirm_delivery=True)
else:
    raise SystemExit(f"Dramatiq has no {BROKER} broker")
broker.add_middleware(Ready())
dramatiq.set_broker(broker)


@dramatiq.actor(queue_name=NS, actor_name="plain")
def plain(data: dict[str, Any]) -> None:
    handle(data)


@dramatiq.actor(queue_name=NS, actor_name="failonce", max_retries=1, min_backoff=1, max_backoff=1)
def failonce(data: dict[str, Any]) -> None:
    handle(data)


if __name__ == "__main__":
    import os

    actor = failonce if os.environ.get("PEERS_KIND") == "failonce" else plain

    def send(n: int, data: dict[str, Any]) -> None:
        actor.send(data)

    run_publisher(send, close=broker.close)
