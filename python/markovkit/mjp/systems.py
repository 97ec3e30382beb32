"""Model systems and exact quantities of continuous-time Markov chains (fp64 oracles for the simulators).

Rate matrices here are generators: off-diagonal rates >= 0 and the diagonal minus the exit rate, batched over
any leading dims: Q (..., S, S).
"""
import torch


def generator(rates: torch.Tensor) -> torch.Tensor:
    """The generator with the off-diagonal rates of `rates` (..., S, S): the diagonal becomes -(row sum)."""
    eye = torch.eye(rates.shape[-1], dtype=torch.bool, device=rates.device)
    off = rates.masked_fill(eye, 0)
    return off - torch.diag_embed(off.sum(-1))


def flashing_ratchet(V: float = 1.0, r: float = 1.0, b: float = 1.0, dtype=torch.float64) -> torch.Tensor:
    """The discrete flashing ratchet (6 states; Roldán & Parrondo 2010, NeuralMJP App. J.1).

    States 0, 1, 2: potential on, energies U = (0, V, 2V), rates exp(-(U_j - U_i) / 2); states 3, 4, 5:
    potential off, rates b; switching i <-> i + 3 at rate r.
    """
    Q = torch.zeros(6, 6, dtype=torch.float64)
    for i in range(3):
        for j in range(3):
            if i != j:
                Q[i, j] = torch.exp(torch.tensor(-V * (j - i) / 2, dtype=torch.float64))
                Q[i + 3, j + 3] = b
        Q[i, i + 3] = Q[i + 3, i] = r
    return generator(Q).to(dtype)


def protein_folding(dtype=torch.float64) -> torch.Tensor:
    """Two-state protein folding (NeuralMJP's estimate on the VAMPnets toy model; folded, unfolded)."""
    return torch.tensor([[-0.028, 0.028], [0.085, -0.085]], dtype=dtype)


def stationary_distribution(Q: torch.Tensor) -> torch.Tensor:
    """pi (..., S) with pi Q = 0 and sum(pi) = 1 (Q irreducible)."""
    Q = generator(Q)
    S = Q.shape[-1]
    A = Q.transpose(-1, -2).clone()
    A[..., -1, :] = 1.0
    rhs = torch.zeros(Q.shape[:-1], dtype=Q.dtype, device=Q.device)
    rhs[..., -1] = 1.0
    return torch.linalg.solve(A, rhs.unsqueeze(-1)).squeeze(-1).reshape(Q.shape[:-2] + (S,))


def entropy_production(Q: torch.Tensor, p: torch.Tensor = None) -> torch.Tensor:
    """Entropy production rate sum_{i != j} p_i Q_ij ln(p_i Q_ij / (p_j Q_ji)) at distribution p (default:
    the stationary one). Pairs with Q_ij = 0 contribute 0; a one-way rate (Q_ij > 0 = Q_ji) gives inf."""
    Q = generator(Q)
    p = stationary_distribution(Q) if p is None else p
    eye = torch.eye(Q.shape[-1], dtype=torch.bool, device=Q.device)
    flux = (p.unsqueeze(-1) * Q).masked_fill(eye, 0)  # (..., S, S): p_i Q_ij
    back = flux.transpose(-1, -2)
    terms = torch.where(flux > 0, flux * torch.log(flux / back), torch.zeros_like(flux))
    return terms.sum((-1, -2))


def marginals(Q: torch.Tensor, p0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Exact marginals p0 expm(Q t): Q (..., S, S), p0 (..., S), t (L,) -> (..., L, S)."""
    Q = generator(Q)
    P = torch.linalg.matrix_exp(Q.unsqueeze(-3) * t.reshape(-1, 1, 1).to(Q))  # (..., L, S, S)
    return (p0.unsqueeze(-2).unsqueeze(-2) @ P).squeeze(-2)


def expected_jumps(Q: torch.Tensor, p0: torch.Tensor, T: float) -> torch.Tensor:
    """E[number of jumps on [0, T]] = int_0^T p(t) . q dt, exactly: the integral of expm(Q t) is the top-right
    block of expm([[Q, I], [0, 0]] T)."""
    Q = generator(Q)
    S = Q.shape[-1]
    big = torch.zeros(Q.shape[:-2] + (2 * S, 2 * S), dtype=Q.dtype, device=Q.device)
    big[..., :S, :S] = Q
    big[..., :S, S:] = torch.eye(S, dtype=Q.dtype, device=Q.device)
    integral = torch.linalg.matrix_exp(big * T)[..., :S, S:]
    exit_rates = -torch.diagonal(Q, dim1=-2, dim2=-1)
    return ((p0.unsqueeze(-2) @ integral).squeeze(-2) * exit_rates).sum(-1)


def mean_first_passage_times(Q: torch.Tensor) -> torch.Tensor:
    """tau (..., S, S): expected time to reach j from i (tau_ii = 0). For each target j, delete row and column j
    of Q and solve A x = -1."""
    Q = generator(Q)
    S = Q.shape[-1]
    tau = torch.zeros_like(Q)
    for j in range(S):
        keep = [i for i in range(S) if i != j]
        A = Q[..., keep, :][..., :, keep]
        ones = torch.ones(Q.shape[:-2] + (S - 1, 1), dtype=Q.dtype, device=Q.device)
        tau[..., keep, j] = torch.linalg.solve(A, -ones).squeeze(-1)
    return tau


def ion_channel(dtype=torch.float64) -> torch.Tensor:
    """A 3-state ion channel generator (s^-1) whose mean first-passage times are Köhs et al.'s (rounded) values
    for the KcvMT325 recordings; a test case derived from published summaries, not a fitted model."""
    return torch.tensor([[-29.93, 18.68, 11.25], [23.96, -69.51, 45.55], [2.84, 10.13, -12.97]], dtype=dtype)


# Vilar et al. (PNAS 2002) circadian oscillator: species DA, DA', DR, DR', MA, MR, A, R, C; (reactants,
# products, rate constant) per reaction.
_VILAR = [
    ({"A": 1, "DA": 1}, {"DA'": 1}, 1.0), ({"DA'": 1}, {"A": 1, "DA": 1}, 50.0),
    ({"A": 1, "DR": 1}, {"DR'": 1}, 1.0), ({"DR'": 1}, {"A": 1, "DR": 1}, 100.0),
    ({"DA": 1}, {"DA": 1, "MA": 1}, 50.0), ({"DA'": 1}, {"DA'": 1, "MA": 1}, 500.0),
    ({"DR": 1}, {"DR": 1, "MR": 1}, 0.01), ({"DR'": 1}, {"DR'": 1, "MR": 1}, 50.0),
    ({"MA": 1}, {"MA": 1, "A": 1}, 50.0), ({"MR": 1}, {"MR": 1, "R": 1}, 5.0),
    ({"A": 1, "R": 1}, {"C": 1}, 2.0), ({"C": 1}, {"R": 1}, 1.0),
    ({"A": 1}, {}, 1.0), ({"R": 1}, {}, 0.2), ({"MA": 1}, {}, 10.0), ({"MR": 1}, {}, 0.5),
]
_VILAR_SPECIES = ["DA", "DA'", "DR", "DR'", "MA", "MR", "A", "R", "C"]


def vilar_oscillator():
    """The Vilar circadian oscillator as a reaction network: reactants, products (16, 9), rates (16,) and the
    initial counts (9,) (one DA, one DR); species in the order of _VILAR_SPECIES."""
    index = {name: i for i, name in enumerate(_VILAR_SPECIES)}
    reactants = torch.zeros(len(_VILAR), len(index), dtype=torch.long)
    products = torch.zeros_like(reactants)
    for r, (left, right, _) in enumerate(_VILAR):
        for name, n in left.items():
            reactants[r, index[name]] = n
        for name, n in right.items():
            products[r, index[name]] = n
    rates = torch.tensor([k for _, _, k in _VILAR], dtype=torch.float64)
    x0 = torch.zeros(len(index), dtype=torch.long)
    x0[index["DA"]] = x0[index["DR"]] = 1
    return reactants, products, rates, x0
