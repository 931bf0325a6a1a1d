"""``python -m lit_wsss`` is the ``lit-wsss`` command."""

from lit_wsss.cli import main

if __name__ == "__main__":
    main()
