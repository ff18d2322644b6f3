"""Class-parallel angular-margin loss over torch.distributed (docs/distributed.md).

    from udat_kernels.distributed import ShardedAngularMarginLoss
    head = ShardedAngularMarginLoss(num_classes, embedding_size, scale=64.0, margin=0.5)
    loss = head(local_embeddings, local_labels)   # the loss of the global batch, on every rank

Each rank holds a contiguous shard of the class centres (Partial FC's rule, `shard_range`);
`shard_mode.shard_forward` / `shard_backward` are the one dispatch point of the shard mode
(docs/math.md, "Class shards"). Importing this package imports torch.distributed, not the
training application.
"""

from ._comm import DEFAULT_TIMEOUT_S, DistributedLossError
from .loss import ShardedAngularMarginLoss, shard_range
from .shard_mode import shard_backward, shard_forward

__all__ = ["DEFAULT_TIMEOUT_S", "DistributedLossError", "ShardedAngularMarginLoss",
           "shard_backward", "shard_forward", "shard_range"]
