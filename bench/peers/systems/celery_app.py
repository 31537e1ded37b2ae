"""Celery on Redis (kombu's Redis transport, every key under the phase's
``global_keyprefix``) or RabbitMQ (py-amqp, publisher confirms on), no result
backend, library defaults otherwise (acks on receipt, prefetch multiplier 4).

Consumer: ``celery -A celery_app worker --pool threads --concurrency 16 -Q NS``
(READY from the ``worker_ready`` signal; ``--without-mingle --without-gossip``
so that one worker asks no other). Publisher: ``python celery_app.py MODE COUNT``
(``task.delay``). Fail-once: ``self.retry(countdown=0, max_retries=1)``.
"""

from __future__ import annotations

from typing import Any

from _common import AMQP_URL, BROKER, KIND, NS, REDIS_URL, FailOnce, handle, run_publisher
from celery import Celery
from celery.signals import worker_ready

if BROKER == "redis":
    app = Celery("peers", broker=REDIS_URL)
    app.conf.broker_transport_options = {"global_keyprefix": f"{NS}:"}
elif BROKER == "rabbitmq":
    app = Celery("peers", broker=AMQP_URL.replace("amqp://", "pyamqp://", 1))
    app.conf.broker_transport_options = {"confirm_publish": True}
else:
    raise SystemExit(f"Celery has no {BROKER} broker")
app.conf.task_default_queue = NS
app.conf.task_ignore_result = True
app.conf.worker_hijack_root_logger = False
app.conf.broker_connection_retry_on_startup = True


@worker_ready.connect
def _ready(**_: Any) -> None:
    import _probe

    _probe.ready()


@app.task(name="peers.plain")
def plain(data: dict[str, Any]) -> None:
    handle(data)


@app.task(name="peers.failonce", bind=True)
def failonce(self: Any, data: dict[str, Any]) -> None:
    try:
        handle(data)
    except FailOnce as exc:
        raise self.retry(exc=exc, countdown=0, max_retries=1) from exc


if __name__ == "__main__":
    task = failonce if KIND == "failonce" else plain

    def send(n: int, data: dict[str, Any]) -> None:
        task.delay(data)

    run_publisher(send)
