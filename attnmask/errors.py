"""The one exception type users see: the CLI prints its message on one line and exits non-zero."""


class AttnmaskError(Exception):
    """A problem with the user's input (paths, stores, arguments), reported without a traceback."""


class UnreachableTau(AttnmaskError):
    """compile's tau exceeds what the row guarantee leaves prunable; `largest` is the largest reachable tau."""

    def __init__(self, message: str, largest: float):
        super().__init__(message)
        self.largest = largest


def weights_refused(e: Exception) -> str:
    """One line for a weights file torch.load(weights_only=True) refused (pickle.UnpicklingError): it holds
    objects other than tensors and plain values, which could run code when unpickled."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    why = next((line for line in lines if "WeightsUnpickler error" in line), lines[0] if lines else type(e).__name__)
    return (f"a weights file (pytorch_model.bin or similar) was refused unread: {why[:200]} (it holds objects other "
            "than tensors and plain values, which could run code); use a model.safetensors from a trusted source")
