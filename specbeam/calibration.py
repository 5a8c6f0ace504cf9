"""How good a predicted probability is: expected calibration error and the area under the ROC curve."""
import torch


def expected_calibration_error(
    probs: torch.Tensor,  # [R] predicted probabilities in [0, 1]
    outcomes: torch.Tensor,  # [R] observed outcomes in [0, 1]: 0/1, or fractions (the mean of many 0/1 outcomes)
    bins: int = 10,
) -> float:
    """ECE = sum_b (n_b / R) |mean outcome in b - mean prob in b| over `bins` equal-width bins of [0, 1]
    (a probability of exactly 1 falls in the last bin)."""
    probs, outcomes = _check_pair(probs, outcomes, "outcomes")
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    if not torch.all((probs >= 0) & (probs <= 1) & (outcomes >= 0) & (outcomes <= 1)):
        raise ValueError("probs and outcomes must lie in [0, 1]")
    which = (probs * bins).long().clamp(max=bins - 1)  # [R] bin index
    gap = torch.bincount(which, outcomes - probs, minlength=bins)  # [bins]: sum of (outcome - prob) per bin
    return (gap.abs().sum() / len(probs)).item()  # sum_b (n_b / R) |gap_b / n_b| = sum_b |gap_b| / R


def roc_auc(
    scores: torch.Tensor,  # [R] higher = more likely positive
    labels: torch.Tensor,  # [R] bool (or 0/1)
) -> float:
    """P(score of a random positive > score of a random negative), ties counting 1/2: the Mann-Whitney
    U / (n_pos n_neg), with U = (sum of the positives' ranks) - n_pos (n_pos + 1) / 2 and tied scores
    given their mean rank."""
    scores, labels = _check_pair(scores, labels.double(), "labels")
    positive = labels.bool()
    if not torch.all((labels == 0) | (labels == 1)):
        raise ValueError("labels must be 0 or 1")
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("roc_auc needs at least one positive and one negative label")
    return ((_mean_ranks(scores)[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)).item()


def _mean_ranks(x: torch.Tensor) -> torch.Tensor:  # x: [R] -> [R] ranks 1..R, ties sharing their mean rank
    values, inverse, counts = torch.unique(x, return_inverse=True, return_counts=True)
    last = counts.cumsum(0).double()  # [U] the highest rank of each distinct value
    return (last - (counts - 1) / 2)[inverse]  # mean of ranks last - count + 1 .. last


def _check_pair(a: torch.Tensor, b: torch.Tensor, b_name: str) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    if a.ndim != 1 or a.shape != b.shape or len(a) == 0:
        raise ValueError(f"need two non-empty 1-D tensors of one length, got {tuple(a.shape)} and "
                         f"{b_name} {tuple(b.shape)}")
    return a, b
