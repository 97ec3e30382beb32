"""Checks of the ops' Python side: the kernels' device checks for the fake kernels (a real call with one argument on
the meta device is dispatched to the op's fake kernel, meta having no kernel of its own: without them it handed back
uninitialised tensors on the other arguments' device), and the refusal of forward-mode AD."""
import torch
import torch.autograd.forward_ad as fwAD


def check_devices(ref: str, **tensors) -> None:
    """Every tensor (None: an absent optional) on the device of tensors[ref], as the kernels' glue checks it (in
    its words); also the Python wrappers' check."""
    device = tensors[ref].device
    for name, t in tensors.items():
        if t is not None and t.device != device:
            raise RuntimeError(f"{name}: expected a tensor on {device} (the device of {ref}), got one on {t.device}")


def check_host(ref: torch.Tensor, **tensors) -> None:
    """Coefficient tensors the kernel reads on the host: CPU ones, unless ref is on meta (shapes only)."""
    if ref.device.type == "meta":
        return
    for name, t in tensors.items():
        if t is not None and t.device.type != "cpu":
            raise RuntimeError(f"{name}: expected a CPU tensor (the simulator's coefficients are kernel arguments), "
                               f"got a tensor on {t.device}")


def refuse_forward_ad(fn: str, **tensors) -> None:
    """fn has no forward-mode derivative: tangents on its inputs (torch.func.jvp, forward_ad.dual_level) are refused;
    the ops of torch.library.register_autograd drop them without a word (the output's tangent came out zero)."""
    if fwAD._current_level < 0 or torch.compiler.is_compiling():  # no dual level open: no tangent anywhere
        return
    for name, t in tensors.items():
        if t is not None and fwAD.unpack_dual(t).tangent is not None:
            raise RuntimeError(f"{fn}: forward-mode AD is not implemented (a tangent came with {name}); use reverse "
                               "mode (torch.autograd.grad or .backward())")
