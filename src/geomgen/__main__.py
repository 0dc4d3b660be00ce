"""``python -m geomgen``: the same command line as the ``geomgen`` script."""

from geomgen.cli import main

if __name__ == "__main__":
    main()
