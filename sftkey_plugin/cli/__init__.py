"""The ``sftkey`` command: preview, convert, eval, demo (entry point ``sftkey_plugin.cli.main:main``)."""
