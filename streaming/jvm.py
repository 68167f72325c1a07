"""Where the JVM side lives: the jars that `make install` resolved with Maven into jvm/lib/."""

from __future__ import annotations

import shutil
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_LIB_DIR = REPO_ROOT / "jvm" / "lib"


class JvmSetupError(RuntimeError):
    """The JVM dependencies are missing: tell the user the one command that fixes it."""


def jars(lib_dir: Path, group: str) -> list[Path]:
    folder = lib_dir / group
    found = sorted(folder.glob("*.jar"))
    if not found:
        raise JvmSetupError(
            f"no jars in {folder}: run 'make install' (or 'mvn -B -q -f jvm/pom.xml package') to resolve them"
        )
    return found


def java_executable() -> str:
    java = shutil.which("java")
    if java is None:
        raise JvmSetupError("java was not found on PATH: cxr-stream needs Java 17")
    return java
