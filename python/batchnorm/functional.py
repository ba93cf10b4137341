"""``torch.nn.functional.batch_norm`` and its backward, for callers with their own autograd."""

from batchnorm._core import batch_norm, batch_norm_backward

__all__ = ["batch_norm", "batch_norm_backward"]
