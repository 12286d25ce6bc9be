"""The default configuration files, shipped inside the package.

``configs/`` at the top of the repository holds the documented, editable files; the package
reaches them through ``sf_daq_broker/configs`` (a link to it in a checkout, real files in a
built wheel: ``[tool.setuptools.package-data]``). Reading them through ``importlib.resources``
makes an installed wheel find its defaults wherever it is installed, not only in a checkout.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

#: The shipped configuration files (the names in ``configs/``).
BROKER_CONFIG = "sf-daq-broker.toml"
SIMULATION_CONFIG = "simulation.toml"
GEOMETRY_CONFIG = "geometry.toml"


def default_config(name: str) -> Path:
    """The path of a shipped configuration file.

    The package is always installed as files (a wheel, or a checkout), never zipped, so the
    resource is a real path that messages can name and users can open.
    """
    resource = resources.files(__package__) / "configs" / name
    if not isinstance(resource, Path):  # a zip import: not how this package is installed
        raise FileNotFoundError(f"{name}: the package's configs/ is not on a file system")
    return resource
