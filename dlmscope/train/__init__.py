"""The SAE trainer: it takes a stream of ``[B, d]`` activation batches and knows no language model.

``trainer`` (:class:`~dlmscope.train.trainer.Trainer`, many SAEs per stream), ``step`` (one grouped forward/backward),
``batches`` (the checked batch stream), ``log``, ``schedule`` and ``geometric_median`` (the paper's recipe),
``checkpoint`` (atomic, resumable); the latent-parallel trainer for dictionaries larger than one device:
``latent_parallel``, ``latent_trainer``, ``sharded_checkpoint``.
"""
