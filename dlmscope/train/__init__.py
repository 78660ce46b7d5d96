"""The SAE trainer: it takes a stream of ``[B, d]`` activation batches and knows no language model.

``trainer`` (:class:`~dlmscope.train.trainer.Trainer`, many SAEs per stream, any mix of Top-K, BatchTopK, JumpReLU and
Matryoshka), ``config`` (the recipe, :class:`~dlmscope.train.config.TrainConfig`), ``step`` (one grouped Top-K
forward/backward), ``arch_step`` (the other architectures' losses and thresholds), ``batches`` (the checked batch
stream), ``log``, ``schedule`` and ``geometric_median`` (the paper's recipe), ``checkpoint`` (atomic, resumable);
the latent-parallel trainer (Top-K only) for dictionaries larger than one device: ``latent_parallel``,
``latent_trainer``, ``sharded_checkpoint``.
"""
