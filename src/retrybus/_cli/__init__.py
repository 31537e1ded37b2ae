"""The ``retrybus`` command line: run the demo, run a worker, inspect and act on
the retry queue and the dead letter queue.

Its entry point is ``retrybus._cli.app:main``. Rich is imported only by the
commands that draw tables or progress, so that ``retrybus worker`` stays small.
"""
