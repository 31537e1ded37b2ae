"""``python -m retrybus``: the same command line as the ``retrybus`` script."""

from ._cli.app import main

if __name__ == "__main__":
    main()
