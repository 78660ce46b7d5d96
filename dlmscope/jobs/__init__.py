"""One module per CLI verb: options, run and JSON (``train``, ``eval``, ``steer``, ``order``, ``transfer``,
``dashboard``), each adding its own subcommand (``add_parser``) and running it (``run_from_args``); ``plots``
draws every job's figures from its result dict, ``options`` holds the options several verbs share, ``sources``
resolves a text source name."""
