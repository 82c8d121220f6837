"""Which device errors are sticky: after one, the CUDA context is unusable.

A device-side assert, an illegal memory access or an uncorrectable ECC error poisons the
context: every later kernel launch, copy or synchronisation in the process fails with
the same error, and only a new process recovers. Out of memory, a bad argument or a
shape mismatch leave it usable. The CUDA runtime tells them apart only by code and
message, so this module matches both. It imports nothing heavy: no torch.
"""

from __future__ import annotations

# cudaError_t codes the CUDA runtime documents as leaving the context corrupt ("the
# process ... must be terminated and relaunched"); torch.AcceleratorError may carry one
# as `error_code`.
STICKY_CUDA_CODES = frozenset({
    214,  # cudaErrorECCUncorrectable
    220,  # cudaErrorNvlinkUncorrectable
    700,  # cudaErrorIllegalAddress
    702,  # cudaErrorLaunchTimeout
    710,  # cudaErrorAssert
    714,  # cudaErrorHardwareStackError
    715,  # cudaErrorIllegalInstruction
    716,  # cudaErrorMisalignedAddress
    717,  # cudaErrorInvalidAddressSpace
    718,  # cudaErrorInvalidPc
    719,  # cudaErrorLaunchFailure
})

# The same errors as their messages read (cudaGetErrorString, and the cuBLAS and cuDNN
# statuses a poisoned context surfaces as), lower case.
STICKY_MESSAGES = (
    "device-side assert triggered",
    "illegal memory access",
    "an illegal instruction was encountered",
    "misaligned address",
    "unspecified launch failure",
    "the launch timed out and was terminated",
    "hardware stack error",
    "uncorrectable ecc error",
    "uncorrectable nvlink error",
    "cublas_status_execution_failed",
    "cudnn_status_execution_failed",
    "cudnn_status_mapping_error",
    "cudaerrorillegaladdress",
    "cudaerrorlaunchfailure",
    "cudaerrorassert",
)

# Exception types (by name: torch stays unimported) that a device runtime raises; only
# these, and RuntimeError, which torch raised for CUDA errors before AcceleratorError.
_DEVICE_ERROR_TYPES = frozenset({"AcceleratorError", "RuntimeError", "CudaError"})


def is_sticky_device_error(err: BaseException) -> bool:
    """True when `err`, or an exception it was raised from, says the device's context is
    broken for good (see the module docstring)."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if _sticky(current):
            return True
        current = current.__cause__ or current.__context__
    return False


def _sticky(err: BaseException) -> bool:
    if not any(t.__name__ in _DEVICE_ERROR_TYPES for t in type(err).__mro__):
        return False
    if getattr(err, "error_code", None) in STICKY_CUDA_CODES:
        return True
    message = str(err).lower()
    return any(m in message for m in STICKY_MESSAGES)
