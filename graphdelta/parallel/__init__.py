"""Tensor parallelism on torch.distributed: ``parallelize`` shards a hybrid model by heads
(``plan.py``, with the styles of ``styles.py``), ``load`` builds one from a checkpoint reading
only each rank's slices (``load.py``); ``sharding.py`` gives graphdelta's ops DTensor strategies."""
from graphdelta.parallel import sharding
from graphdelta.parallel.load import load
from graphdelta.parallel.plan import TensorParallel, parallelize, tensor_parallel

sharding.register()

__all__ = ["TensorParallel", "load", "parallelize", "tensor_parallel"]
