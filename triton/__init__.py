"""Keeps this deployment folder from shadowing the Triton compiler package of the same import name.

The scripts here run as ``python triton/<script>.py`` and import their siblings directly; nothing imports this
folder as a package. But with the repository root on ``sys.path`` (any script run from the root, pytest), Python
would find this folder for ``import triton``, and torch (``torch.utils._triton.has_triton_package``,
``importlib.util.find_spec("triton")`` in inductor) and transformers would take it for the compiler. So, imported
as the top-level ``triton``, this file loads the real compiler package from the other ``sys.path`` entries in its
place; when there is none, it raises ``ModuleNotFoundError`` and hides the folder from later lookups, so that
``find_spec("triton")`` answers None, as if the folder were not there.
"""
import importlib.machinery
import importlib.util
import os
import sys

_FOLDER = os.path.dirname(os.path.realpath(__file__))
_ROOT = os.path.dirname(_FOLDER)


def _is_root(entry: str) -> bool:
    """Whether a ``sys.path`` entry is the repository root (``""`` is the working directory)."""
    try:
        return os.path.realpath(entry or os.getcwd()) == _ROOT
    except (TypeError, ValueError, OSError):
        return False


class _HideFolder:
    """A path-entry finder wrapper that finds nothing named ``triton`` under the repository root."""

    def __init__(self, finder: object) -> None:
        self._finder = finder

    def find_spec(self, fullname: str, target: object = None) -> "importlib.machinery.ModuleSpec | None":
        if fullname == "triton" or fullname.startswith("triton."):
            return None
        return self._finder.find_spec(fullname, target)

    def invalidate_caches(self) -> None:
        if hasattr(self._finder, "invalidate_caches"):
            self._finder.invalidate_caches()

    def __getattr__(self, name: str) -> object:
        return getattr(self._finder, name)


def _hide_folder() -> None:
    """Wrap the path-entry finders of every ``sys.path`` entry that is the repository root."""
    for entry in list(sys.path):
        if not isinstance(entry, str) or not _is_root(entry):
            continue
        key = entry or os.getcwd()  # PathFinder caches the working directory's finder under its absolute path
        finder = sys.path_importer_cache.get(key)
        if finder is None:
            finder = importlib.machinery.FileFinder(key, *_loaders())
        if not isinstance(finder, _HideFolder):
            sys.path_importer_cache[key] = _HideFolder(finder)


def _loaders() -> list[tuple[type, list[str]]]:
    """The (loader, suffixes) pairs of the default path hook, for a FileFinder built here."""
    return [(importlib.machinery.ExtensionFileLoader, importlib.machinery.EXTENSION_SUFFIXES),
            (importlib.machinery.SourceFileLoader, importlib.machinery.SOURCE_SUFFIXES),
            (importlib.machinery.SourcelessFileLoader, importlib.machinery.BYTECODE_SUFFIXES)]


def _load_real_package() -> None:
    """Import the compiler package found on the other ``sys.path`` entries as ``sys.modules["triton"]``."""
    search = [entry for entry in sys.path if isinstance(entry, str) and not _is_root(entry)]
    spec = importlib.machinery.PathFinder.find_spec("triton", search)
    if spec is None:
        _hide_folder()
        sys.modules.pop("triton", None)
        raise ModuleNotFoundError("No module named 'triton' (the repository's triton/ folder holds the Triton "
                                  "Inference Server deployment scripts, not the Triton compiler)", name="triton")
    module = importlib.util.module_from_spec(spec)
    sys.modules["triton"] = module  # the import system returns whatever sys.modules holds once this file ends
    try:
        if spec.loader is not None:
            spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop("triton", None)
        raise


if __name__ == "triton":
    _load_real_package()
