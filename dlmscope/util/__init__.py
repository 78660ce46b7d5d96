"""Small leaves the rest of dlmscope shares; they import nothing of dlmscope.

``atomic`` (durable, atomic file and directory writes), ``choices`` (one error for a bad choice),
``distributed`` (torch.distributed helpers that are no-ops alone), ``bootstrap`` (intervals).
"""
