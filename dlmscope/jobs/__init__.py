"""One module per CLI verb: options, run, JSON and plots (``train``, ``eval``, ``steer``, ``order``, ``transfer``,
``dashboard``), each adding its own subcommand (``add_parser``) and running it (``run_from_args``); ``options``
holds the options several verbs share, ``sources`` resolves a text source name."""
