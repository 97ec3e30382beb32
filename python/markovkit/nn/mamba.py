"""The Mamba (S6) block on markovkit's selective scan, with a one-token ``step`` for decoding."""
import math

import torch
import torch.nn.functional as F
from torch import nn

from markovkit.scan import selective_scan, selective_state_update


def _positive_int(value, name):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")


def _check_config(d_model, d_state, d_conv, expand, dt_rank, dt_min, dt_max, dt_init):
    for value, name in ((d_model, "d_model"), (d_state, "d_state"), (d_conv, "d_conv")):
        _positive_int(value, name)
    if d_state > 256:
        raise ValueError(f"d_state: expected 1 to 256 (the scan's limit), got {d_state}")
    if isinstance(expand, bool) or not isinstance(expand, (int, float)) or int(expand * d_model) < 1:
        raise ValueError(f"expand: expected a number with int(expand * d_model) >= 1, got {expand!r}")
    if dt_rank != "auto":
        _positive_int(dt_rank, "dt_rank (or 'auto')")
    if not 0 < dt_min <= dt_max:
        raise ValueError(f"dt_min, dt_max: expected 0 < dt_min <= dt_max, got {dt_min!r}, {dt_max!r}")
    if dt_init not in ("random", "constant"):
        raise ValueError(f"dt_init: expected 'random' or 'constant', got {dt_init!r}")


class Mamba(nn.Module):
    """in_proj -> causal depthwise conv1d + SiLU -> x_proj (dt, B, C) -> dt_proj -> selective scan with
    D skip and SiLU(z) gate -> out_proj. Parameters and initialisation follow the Mamba paper's block:
    A = -exp(A_log) with A_log = log(1..d_state) per channel, D = 1, dt_proj bias = softplus^-1(dt) for dt
    log-uniform in [dt_min, dt_max] (floored at dt_init_floor), dt_proj weight uniform in ±dt_scale·dt_rank^-0.5
    (dt_init "random") or constant dt_scale·dt_rank^-0.5 ("constant"). As in mamba_ssm, A_log and D are marked
    ``_no_weight_decay`` and dt_proj.bias ``_no_reinit`` (for optimizer grouping and re-initialisation code; plain
    attributes, which copy.deepcopy and to_empty do not keep). Also as in mamba_ssm, ``dtype=`` sets the linear and
    convolution weights' dtype while A_log and D are made in float32; ``.double()`` / ``.to(dtype)`` convert them too.

    The constructor takes mamba_ssm's arguments in its order; use_fast_path has no effect (one path: markovkit's
    scan), layer_idx names this block's states in an ``inference_params``.

    forward(hidden: (batch, seqlen, d_model), inference_params=None) -> (batch, seqlen, d_model). As mamba_ssm's:
    with inference_params (an object with ``key_value_memory_dict`` and ``seqlen_offset``, as mamba_ssm's
    InferenceParams), this block's states are key_value_memory_dict[layer_idx] (zero ones allocated there when
    missing); at seqlen_offset 0 forward runs the whole sequence and leaves in them the states after its last
    token (a prefill), past it hidden is one token and forward is ``step``.
    step(hidden: (batch, 1, d_model), conv_state, ssm_state) -> (out (batch, 1, d_model), conv_state, ssm_state),
    as mamba_ssm's, both states updated in place, without autograd (the decode op has no derivative);
    ``allocate_inference_cache(batch_size)`` gives zero states. Decoding token by token from zero states, or after a
    prefill, equals ``forward`` on the whole sequence.
    """

    def __init__(self, d_model, d_state=16, d_conv=4, expand=2, dt_rank="auto", dt_min=0.001, dt_max=0.1,
                 dt_init="random", dt_scale=1.0, dt_init_floor=1e-4, conv_bias=True, bias=False, use_fast_path=True,
                 layer_idx=None, device=None, dtype=None):
        super().__init__()
        _check_config(d_model, d_state, d_conv, expand, dt_rank, dt_min, dt_max, dt_init)
        kw = dict(device=device, dtype=dtype)
        self.d_model, self.d_state, self.d_conv, self.expand = d_model, d_state, d_conv, expand
        self.use_fast_path, self.layer_idx = use_fast_path, layer_idx
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else dt_rank
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=bias, **kw)
        self.conv1d = nn.Conv1d(self.d_inner, self.d_inner, d_conv, groups=self.d_inner, padding=d_conv - 1,
                                bias=conv_bias, **kw)
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False, **kw)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True, **kw)
        std = dt_scale * self.dt_rank ** -0.5
        if dt_init == "random":
            nn.init.uniform_(self.dt_proj.weight, -std, std)
        else:
            nn.init.constant_(self.dt_proj.weight, std)
        dt = torch.exp(torch.rand(self.d_inner, **kw) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_init_floor)
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt)
        self.dt_proj.bias._no_reinit = True
        A = torch.arange(1, d_state + 1, dtype=torch.float32, device=device).repeat(self.d_inner, 1)
        self.A_log = nn.Parameter(torch.log(A))
        self.D = nn.Parameter(torch.ones(self.d_inner, device=device))
        self.A_log._no_weight_decay = self.D._no_weight_decay = True
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias, **kw)

    def _A(self):
        """A = -exp(A_log) in float32 at least (the scan converts D and dt_proj.bias to its weight type)."""
        return -torch.exp(self.A_log.to(torch.promote_types(self.A_log.dtype, torch.float32)))

    def _dt_BC(self, x):
        """x: (..., d_inner) -> dt (..., d_inner) without bias, B and C (..., d_state)."""
        dt, B, C = self.x_proj(x).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        return F.linear(dt, self.dt_proj.weight), B, C

    def forward(self, hidden, inference_params=None):
        states = None
        if inference_params is not None:
            states = self._states(inference_params, hidden.shape[0])
            if inference_params.seqlen_offset > 0:
                return self.step(hidden, *states)[0]
        seqlen = hidden.shape[1]
        x, z = self.in_proj(hidden).chunk(2, dim=-1)                     # (batch, seqlen, d_inner) each
        x = x.transpose(1, 2)                                            # (batch, d_inner, seqlen)
        if states is not None:  # the last d_conv inputs, zeros before the first (the caches hold no graph)
            states[0].copy_(F.pad(x.detach(), (self.d_conv - seqlen, 0)))
        x = F.silu(self._causal_conv(x))
        dt, B, C = self._dt_BC(x.transpose(1, 2))
        y = selective_scan(x, dt.transpose(1, 2), self._A(), B.transpose(1, 2), C.transpose(1, 2), self.D,
                           z.transpose(1, 2), delta_bias=self.dt_proj.bias, delta_softplus=True,
                           return_last_state=states is not None)
        if states is not None:
            y, last_state = y
            states[1].copy_(last_state.detach())
        return self.out_proj(y.transpose(1, 2))

    def _states(self, inference_params, batch_size):
        """(conv_state, ssm_state) of this block in inference_params, zero ones put there when missing."""
        if self.layer_idx is None:
            raise ValueError("inference_params: this block needs a layer_idx (the key of its states in "
                             "inference_params.key_value_memory_dict)")
        cache = inference_params.key_value_memory_dict
        if self.layer_idx not in cache:
            cache[self.layer_idx] = self.allocate_inference_cache(batch_size)
        return cache[self.layer_idx]

    def _causal_conv(self, x):
        """x: (batch, d_inner, seqlen) -> the causal depthwise convolution, (batch, d_inner, seqlen)."""
        seqlen = x.shape[-1]
        if seqlen == 0:  # conv1d refuses an empty sequence
            return x
        if not torch.compiler.is_compiling():
            return self.conv1d(x)[..., :seqlen]
        # Compiled: the same sum as d_conv shifted products (Inductor fuses them). A convolution in a CPU graph turns
        # on Inductor's channels-last layout pass, which fails on the symbolic strides of 4-D views under dynamic
        # shapes (an attention's q, k, v beside this block; torch 2.13 and 2.14: "cannot determine truth value of
        # Relational").
        x = F.pad(x, (self.d_conv - 1, 0))
        w = self.conv1d.weight[:, 0, :, None].to(x.dtype)                # (d_inner, d_conv, 1); autocast's dtype
        y = sum(x[:, :, k:k + seqlen] * w[:, k] for k in range(self.d_conv))
        return y if self.conv1d.bias is None else y + self.conv1d.bias[:, None].to(x.dtype)

    def allocate_inference_cache(self, batch_size, max_seqlen=None, dtype=None, **kwargs):
        """Zero (conv_state (batch_size, d_inner, d_conv) in dtype (default the conv weight's), ssm_state
        (batch_size, d_inner, d_state) float32, or float64 for a float64 module), on the module's device.
        max_seqlen and kwargs are unused (the states do not grow), as in mamba_ssm's signature."""
        w = self.conv1d.weight
        ssm_dtype = torch.float64 if w.dtype == torch.float64 else torch.float32
        return (torch.zeros(batch_size, self.d_inner, self.d_conv, device=w.device, dtype=dtype or w.dtype),
                torch.zeros(batch_size, self.d_inner, self.d_state, device=w.device, dtype=ssm_dtype))

    @torch.no_grad()
    def step(self, hidden, conv_state, ssm_state):
        """One token: hidden (batch, 1, d_model) -> (out (batch, 1, d_model), conv_state, ssm_state), the states
        updated in place."""
        if hidden.dim() != 3 or hidden.shape[1] != 1:
            raise ValueError(f"hidden: expected shape (batch, 1, d_model), one token, got {tuple(hidden.shape)}")
        batch = conv_state.shape[0]
        if hidden.shape[0] != batch or ssm_state.shape[0] != batch:
            raise ValueError(f"hidden: expected the cache's batch size {batch} (conv_state) = "
                             f"{ssm_state.shape[0]} (ssm_state), got {hidden.shape[0]}")
        x, z = self.in_proj(hidden[:, 0]).chunk(2, dim=-1)               # (batch, d_inner) each
        conv_state.copy_(torch.roll(conv_state, shifts=-1, dims=-1))
        conv_state[:, :, -1] = x
        x = (conv_state * self.conv1d.weight[:, 0]).sum(-1)
        if self.conv1d.bias is not None:
            x = x + self.conv1d.bias
        x = F.silu(x).to(z.dtype)  # conv_state may hold another dtype (allocate_inference_cache's dtype)
        dt, B, C = self._dt_BC(x)
        y = selective_state_update(ssm_state, x, dt, self._A(), B, C, self.D, z, dt_bias=self.dt_proj.bias,
                                   dt_softplus=True)
        return self.out_proj(y)[:, None], conv_state, ssm_state
