"""A restricted unpickler for annotation pickles (``refs(unc).p`` and friends).

A pickle can run arbitrary code when it is loaded: any global it names (``os.system``, ``builtins.eval``, ...)
is imported and may be called. REC annotation pickles only ever hold dicts, lists, strings and numbers, so
:func:`restricted_load` refuses every global except the builtin containers and scalars (and the few names a
Python-2 or a protocol-2 pickle uses to spell those). A refused global raises :class:`pickle.UnpicklingError`
naming it, before anything is called.

This guards against code execution, not against a file that is simply huge.
"""

from __future__ import annotations

import _compat_pickle
import io
import pickle
from collections import OrderedDict
from collections.abc import Callable
from os import PathLike
from pathlib import Path
from typing import IO, Any

__all__ = ["ALLOWED_GLOBALS", "RestrictedUnpickler", "restricted_load", "restricted_loads"]

_LATIN1_NAMES = frozenset({"latin1", "latin-1", "latin_1", "iso-8859-1", "iso8859-1", "l1"})


def _encode_latin1(text: str, encoding: str = "latin1", errors: str = "strict") -> bytes:
    """Stand-in for ``_codecs.encode``: Python 3 pickles ``bytes`` (protocol <= 2) as ``encode(str, 'latin1')``."""
    if not isinstance(text, str) or str(encoding).lower() not in _LATIN1_NAMES:
        raise pickle.UnpicklingError(
            f"Refused _codecs.encode({type(text).__name__}, {encoding!r}): only the latin-1 form that pickle uses "
            "to store bytes is allowed."
        )
    return text.encode("latin1", errors)


def _bytes_without_size(*args: Any) -> bytes:
    """``bytes(...)`` that refuses ``bytes(n)`` (a zero-filled buffer of attacker-chosen size)."""
    if args and isinstance(args[0], int):
        raise pickle.UnpicklingError("Refused bytes(<int>): a data pickle never builds a sized empty buffer.")
    return bytes(*args)


def _bytearray_without_size(*args: Any) -> bytearray:
    """``bytearray(...)`` that refuses ``bytearray(n)``."""
    if args and isinstance(args[0], int):
        raise pickle.UnpicklingError("Refused bytearray(<int>): a data pickle never builds a sized empty buffer.")
    return bytearray(*args)


# (module, name) after Python-2 names are mapped to Python-3 ones -> the object handed to the unpickler.
ALLOWED_GLOBALS: dict[tuple[str, str], Callable[..., Any]] = {
    ("builtins", "dict"): dict,
    ("builtins", "list"): list,
    ("builtins", "tuple"): tuple,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "str"): str,
    ("builtins", "int"): int,
    ("builtins", "float"): float,
    ("builtins", "complex"): complex,
    ("builtins", "bool"): bool,
    ("builtins", "bytes"): _bytes_without_size,
    ("builtins", "bytearray"): _bytearray_without_size,
    ("collections", "OrderedDict"): OrderedDict,
    ("_codecs", "encode"): _encode_latin1,
}

_HOW_TO_CONVERT = (
    "Annotation pickles should hold only dicts, lists, strings and numbers. If you trust this file, convert it "
    "once to JSON in a separate Python session (pickle.load(open(path, 'rb'), encoding='latin1') followed by "
    "json.dump) and load the JSON instead; or load it yourself with pickle if you accept that it can run code."
)


class RestrictedUnpickler(pickle.Unpickler):
    """An :class:`pickle.Unpickler` whose ``find_class`` only resolves :data:`ALLOWED_GLOBALS`.

    Args:
        file: a binary file object.
        source: a name for the file used in error messages.
        encoding: how to decode Python-2 ``str`` objects (``'latin1'`` reads every byte string losslessly).
    """

    def __init__(self, file: IO[bytes], *, source: str = "<pickle>", encoding: str = "latin1") -> None:
        super().__init__(file, encoding=encoding, fix_imports=True)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        """Return an allowed builtin for ``module.name`` or raise :class:`pickle.UnpicklingError`."""
        mapped_module, mapped_name = module, name
        if (module, name) in _compat_pickle.NAME_MAPPING:
            mapped_module, mapped_name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            mapped_module = _compat_pickle.IMPORT_MAPPING[module]
        allowed = ALLOWED_GLOBALS.get((mapped_module, mapped_name))
        if allowed is None:
            raise pickle.UnpicklingError(
                f"Refused to load the global '{module}.{name}' from {self.source}: loading it could run code. " + _HOW_TO_CONVERT
            )
        return allowed

    def persistent_load(self, pid: Any) -> Any:
        """Refuse persistent ids: a plain data pickle has none."""
        raise pickle.UnpicklingError(
            f"Refused a persistent id in {self.source}: this is not a plain data pickle. " + _HOW_TO_CONVERT
        )


def restricted_load(file: str | PathLike[str] | IO[bytes], *, encoding: str = "latin1") -> Any:
    """Unpickle ``file`` (a path or a binary file object) allowing only builtin containers and scalars.

    Python-2 pickles (like the ``refer`` toolkit's ``refs(unc).p``) load too: their byte strings are decoded with
    ``encoding``. Raises :class:`pickle.UnpicklingError` naming any other global the pickle asks for.
    """
    if isinstance(file, str | PathLike):
        path = Path(file)
        if not path.is_file():
            raise FileNotFoundError(f"Pickle file not found: {path}")
        with path.open("rb") as handle:
            return RestrictedUnpickler(handle, source=str(path), encoding=encoding).load()
    source = str(getattr(file, "name", "<pickle stream>"))
    return RestrictedUnpickler(file, source=source, encoding=encoding).load()


def restricted_loads(data: bytes, *, encoding: str = "latin1") -> Any:
    """:func:`restricted_load` for a pickle held in memory."""
    return RestrictedUnpickler(io.BytesIO(data), source="<bytes>", encoding=encoding).load()
