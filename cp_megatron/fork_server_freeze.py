"""Imported last by the fork server that ranks are forked from (the end of
:data:`cp_megatron.launcher.PRELOAD`): freezes the garbage collector's view of everything the
server imported (torch, megatron-core, the engine).  Import it nowhere else.

This is Python's recipe for a process that forks without exec (``gc.freeze``): the ranks'
collections never walk those objects (nor touch, and so copy, their pages), and the server,
which exits with its launcher, skips them in the interpreter's final collections: with
megatron-core loaded its exit takes ~0.3 s instead of ~1.9 s on the 2-core CI box, and a job
run with captured output waits for it (the server holds the job's stderr).

Source: Python documentation, ``gc.freeze``.
"""

import gc

gc.freeze()
