"""The command lines, together: each module parses and checks its options, then calls the stages' libraries.

Nothing below this package imports it. Where people type a command (``python -m ahnet.train``, ``python -m
ahnet.predict``, ...), a four-line entry module at that name calls the command's ``main`` here; the console
scripts (``ahnet-train``, ...) point here directly.
"""
