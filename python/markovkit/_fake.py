"""The device checks of the kernels, for the fake kernels. A real call with one argument on the meta device is
dispatched to the op's fake kernel (meta has no kernel of its own): without these checks it handed back
uninitialised tensors on the other arguments' device."""
import torch


def check_devices(ref: str, **tensors) -> None:
    """Every tensor (None: an absent optional) on the device of tensors[ref], as the kernels' glue checks it."""
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
