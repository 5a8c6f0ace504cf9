"""Python numbers to tensors. numpy reads a list of ints or floats 4-6x faster than `torch.tensor` does, and the
engine's hot paths turn a few lists into tensors per request per step."""
import numpy as np
import torch


def as_tensor(values: list, device: torch.device | str, dtype: type = np.int64) -> torch.Tensor:
    """A list of Python numbers (or of equal-length lists of them) as a tensor on `device`, int64 unless `dtype`
    (a numpy type) says otherwise; floats are rounded to it as `torch.tensor` rounds them."""
    return torch.from_numpy(np.array(values, dtype=dtype)).to(device)
