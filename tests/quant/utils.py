"""Shared problem generators for the tests of pt2pass.quant."""
import torch


def correlated_inputs(N: int, m: int, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    """Activations X (N, m) with correlated features, uneven scales and a shared offset, the way
    LLM activations look (a Gaussian mixing matrix, log-normal column scales, a common mode)."""
    g = torch.Generator().manual_seed(seed)
    Z = torch.randn(N, m, generator=g, dtype=torch.float64)
    mix = torch.randn(m, m, generator=g, dtype=torch.float64)
    A = torch.eye(m, dtype=torch.float64) + 2 * mix / m ** 0.5
    scales = torch.exp(0.5 * torch.randn(m, generator=g, dtype=torch.float64))
    X = (Z @ A) * scales + torch.randn(N, 1, generator=g, dtype=torch.float64)
    return X.to(dtype)


def hessian_of(X: torch.Tensor) -> torch.Tensor:
    """H = (2/N) X^T X, as HessianAccumulator computes it."""
    return 2.0 / X.shape[0] * X.t() @ X


def gaussian_weight(n: int, m: int, seed: int = 1, dtype=torch.float32, std: float = 0.02):
    g = torch.Generator().manual_seed(seed)
    return (std * torch.randn(n, m, generator=g, dtype=torch.float64)).to(dtype)
