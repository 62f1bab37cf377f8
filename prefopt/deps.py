"""The libraries a run needs: their version floors, checked before any work, and optional ones kept
out of runs that do not use them.

Each floor is the first release with an API prefopt uses (docs/scale.md, "Dependency floors";
pyproject.toml declares the same, tests/test_deps.py keeps them equal). A run checks the core ones
at start and an optional one when the config uses it, and stops with one message naming the
package, the installed and the required version, and the pip command.
"""

from __future__ import annotations

import sys
from importlib import metadata

from prefopt.errors import DependencyError

# package: (floor, the API that needs it, the pyproject extra that installs it, if optional)
FLOORS: dict[str, tuple[str, str, str | None]] = {
    "torch": (
        "2.12",
        "torchrun's TORCH_ELASTIC_SHUTDOWN_TIMEOUT, the preemption grace of slurm/train.sbatch "
        "(earlier releases kill the ranks 30 s after SIGTERM)",
        None,
    ),
    "transformers": ("5.0", "the 5.x model, attention and mask interfaces", None),
    "peft": ("0.18", "the first release that works with transformers 5 (LoRA)", None),
    "accelerate": ("1.1", "transformers 5's floor (meta-device model building)", None),
    "torchao": ("0.10", "torchao.optim (optimizer=adamw8bit, optimizer=adamw_bf16_sr)", "lowmem"),
    "bitsandbytes": ("0.46.1", "transformers 5's 4/8-bit loading (model.quantize)", "bnb"),
}
CORE = ("torch", "transformers", "peft", "accelerate")


def installed(package: str) -> str | None:
    """The installed version of ``package`` (from its metadata: nothing is imported)."""
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def check(*packages: str) -> None:
    """Raise :class:`DependencyError` for the first package missing or older than its floor."""
    from packaging.version import Version

    for package in packages:
        floor, why, extra = FLOORS[package]
        have = installed(package)
        if have is not None and Version(have) >= Version(floor):
            continue
        fix = f"pip install -U '{package}>={floor}'"
        if extra:
            fix += f" (or: pip install -e '.[{extra}]')"
        found = "is not installed" if have is None else f"{have} is installed"
        raise DependencyError(
            f"{package} {found}; prefopt needs {package}>={floor}: {why}", fix=fix
        )


def keep_torchao_out(lora: bool) -> None:
    """For a run that uses no torchao optimizer: tell transformers (and peft, with ``lora``) that
    torchao is absent. Installed, it is imported by transformers' quantizer registry on the first
    model import, which takes a second and prints warnings about kernels such a run never needs
    (``Failed to load ..._C_mxfp8...so``, ``Detected no triton``, Enum deprecations)."""
    if "torchao" in sys.modules:  # already imported: nothing left to keep out
        return
    import transformers.utils
    import transformers.utils.import_utils

    def absent(*args: object, **kwargs: object) -> bool:
        return False

    transformers.utils.is_torchao_available = absent
    transformers.utils.import_utils.is_torchao_available = absent
    if lora:  # peft asks for each layer it adapts
        import peft.import_utils
        import peft.tuners.lora.torchao

        peft.import_utils.is_torchao_available = absent
        peft.tuners.lora.torchao.is_torchao_available = absent
