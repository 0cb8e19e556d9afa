"""`python -m mtlrec` works like the `mtlrec` command."""

from mtlrec.cli import main

if __name__ == "__main__":
    main()
