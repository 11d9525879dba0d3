"""The application shell: the ``turnfleet`` command and what only it uses.

Installed as ``turnfleet.shell``. The command line (:mod:`turnfleet.shell.cli`), the demo, the
terminal rendering, the HTTP app assembly (:mod:`turnfleet.shell.server`), ``turnfleet health``,
the fleet's child processes and the embedded Redis. It sits on top of the contract
(``turnfleet``) and the components (``turnfleet.producer``, ``.workers``, ``.telemetry``); nothing
below imports it.
"""
