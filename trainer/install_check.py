"""Whether this ``trainer`` (and ``methods``) package is Rankwright's own, not mixed with another distribution's.

The repository keeps ``methods/`` and ``trainer/`` as top-level packages. Installed with ``pip install .`` they
land in site-packages under those names, where another distribution may install a package of the same name (PyPI
has a ``trainer``): pip then writes both into one folder and the files of the two mix. :func:`check_installation`
runs when ``trainer`` is imported and refuses such a mixture with a message that says what to do. It reads only
the ``*.dist-info`` records next to the package, so from a checkout or an editable install (``pip install -e .``,
the recommended way) it finds none and costs nothing.
"""

from __future__ import annotations

from pathlib import Path

DISTRIBUTION = "rankwright"
TOP_LEVEL = ("methods", "trainer")


class InstallationConflict(ImportError):
    """Another distribution installed a package named like ours into the same folder."""


def conflicting_distributions(site: Path) -> dict[str, list[str]]:
    """Top-level package name → the other distributions in ``site`` that install it (name and version)."""
    found: dict[str, list[str]] = {}
    for info in sorted(site.glob("*.dist-info")):
        name, _, version = info.name.removesuffix(".dist-info").partition("-")
        if name.lower().replace("_", "-") == DISTRIBUTION:
            continue
        packages = set()
        top_level = info / "top_level.txt"
        if top_level.is_file():
            packages = set(top_level.read_text(encoding="utf-8", errors="replace").split())
        elif (info / "RECORD").is_file():  # wheels built without top_level.txt (hatch, flit, poetry)
            record = (info / "RECORD").read_bytes()
            packages = {package for package in TOP_LEVEL
                        if record.startswith(f"{package}/".encode()) or f"\n{package}/".encode() in record}
        for package in TOP_LEVEL:
            if package in packages:
                found.setdefault(package, []).append(f"{name} {version}".strip())
    return found


def check_installation(package_dir: Path | None = None) -> None:
    """Raise :class:`InstallationConflict` when another distribution shares our top-level packages' folder."""
    package_dir = package_dir or Path(__file__).resolve().parent
    conflicts = conflicting_distributions(package_dir.parent)
    if not conflicts:
        return
    lines = [f"'{package}' is also installed by {', '.join(owners)}" for package, owners in conflicts.items()]
    first_owner = next(iter(conflicts.values()))[0].split()[0]
    raise InstallationConflict(
        f"Rankwright's top-level packages share {package_dir.parent} with another distribution: {'; '.join(lines)}. "
        "Their files are mixed and neither works reliably. Uninstall the other one (pip uninstall "
        f"{first_owner}) and reinstall Rankwright, or install Rankwright in its own virtual environment "
        "(python -m venv .venv && .venv/bin/pip install -e .).")
