"""Extra ``brickwork`` verbs, one module each, found by the CLI at start-up.

A verb module defines ``HELP`` (one line), ``add_arguments(parser)`` and ``run(args) -> int``;
its verb is the module name with ``_`` as ``-``. Errors a user can fix are raised as
:class:`brickwork.errors.BrickworkError` (printed on one line, exit status 2).
"""
