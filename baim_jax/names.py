"""The rule for task names, which become directory names in run directories, model stores and
edge toolboxes: a name can never reach outside the directory that holds it."""

from __future__ import annotations

import re

_TASK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def check_task_name(name, where: str = "task") -> str:
    """Returns ``name`` if it is a safe task name, else raises ``ValueError`` naming ``where``.

    A safe name is 1 to 64 characters of letters, digits, ``_``, ``.`` and ``-``, starting with
    a letter or digit: no separators, no ``..``, no absolute paths, no hidden names.
    """
    if not isinstance(name, str) or not _TASK_NAME.fullmatch(name) or ".." in name:
        raise ValueError(f"{where}: {name!r} is not a safe task name (1-64 letters, digits, "
                         f"'_', '.', '-', starting with a letter or digit, no '..')")
    return name
