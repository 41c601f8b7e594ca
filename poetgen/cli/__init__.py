"""The `poetgen` command line: one module per command, the shared rendering in `common`, the app in `app`."""


def main() -> None:
    """The `poetgen` entry point (``poetgen.cli:main``). The import is here, not above: package files import
    nothing, so importing any part of poetgen never loads more than that part."""
    from poetgen.cli.app import main as run

    run()
