"""One module per CLI verb: options, run, JSON and plots (``train``, ``steer``, ``order``, ``dashboard``)."""
