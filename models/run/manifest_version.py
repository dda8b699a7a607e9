"""The one manifest-version rule, for every reader of a ``manifest.json`` (``--config``,
``--resume``, ``verify``, ``export``, ``eval``, ``golden``, ...). Torch-free: ``finetune --config``
applies it before anything heavy is imported.

A manifest without ``"version"`` was written before manifests had one (version 0, same keys); a
version above :data:`MANIFEST_VERSION` comes from a newer wnconvert whose fields this one may
misread, so it is refused (one line, exit 2), never half-read.
"""

from __future__ import annotations

from wnconvert.convert.errors import UserInputError

# 1: the first versioned layout. Manifests without "version" (written before it existed) have the
# same keys, some missing (gpu_decode, newer train options); their dataclass defaults fill them.
MANIFEST_VERSION = 1


def check_manifest_version(d: dict, where: str) -> int:
    """The manifest's version; :class:`UserInputError` unless this wnconvert reads it."""
    version = d.get("version", 0)  # 0: written before manifests had a version
    if isinstance(version, bool) or not isinstance(version, int) or not 0 <= version <= MANIFEST_VERSION:
        raise UserInputError(f"{where} has manifest version {version!r}; this wnconvert reads "
                             f"versions 0 to {MANIFEST_VERSION} (a newer wnconvert wrote it: upgrade)")
    return version
