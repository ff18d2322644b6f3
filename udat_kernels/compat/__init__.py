"""Drop-in replacements for the margin losses of other training libraries (docs/compat.md).

- `udat_kernels.compat.pml`: pytorch-metric-learning's `ArcFaceLoss` and `CosFaceLoss`, same
  constructor, parameters, state_dict, `forward` and `get_logits`, computed by the fused op.
  Importing it imports pytorch-metric-learning (its classes subclass that package's own).
- `udat_kernels.compat.insightface`: arcface_torch's `CombinedMarginLoss(s, m1, m2, m3)` for
  ArcFace and CosFace, and its margins handed to the fused op; `PartialFC_V2`, its
  class-parallel head, over `udat_kernels.distributed` (same shard rule and checkpoints).

Nothing here is imported by `import udat_kernels`: each module loads only when named.
"""
