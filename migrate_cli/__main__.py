"""`python -m migrate_cli` is the same program as `vmmig`."""

from .cli import main

if __name__ == "__main__":
    main()
