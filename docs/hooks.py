"""MkDocs hook: the site shows the version of mlxterp it documents (from the installed
package's metadata, so it never drifts from pyproject.toml)."""

from __future__ import annotations

import importlib.metadata


def on_config(config):
    try:
        version = importlib.metadata.version("mlxterp")
    except importlib.metadata.PackageNotFoundError:
        return config
    config.site_name = f"mlxterp {version}"
    config.copyright = f"mlxterp {version}"
    return config
