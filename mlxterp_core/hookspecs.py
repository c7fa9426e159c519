"""The whole plugin contract of mlxterp: one function per hook.

A plugin is any module or object with functions of these names, marked with ``hookimpl``::

    from mlxterp import hookimpl

    @hookimpl
    def mlxterp_architectures():
        return [ArchitectureSchema.from_file(Path(__file__).parent / "myfamily.toml")]

and registered under the entry-point group ``mlxterp`` of its package::

    [project.entry-points.mlxterp]
    myfamily = "my_package.plugin"

mlxterp's own plugins (in ``plugins/``) are registered exactly this way.
"""

from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("mlxterp")
hookimpl = pluggy.HookimplMarker("mlxterp")


@hookspec
def mlxterp_architectures():
    """Return a list of ArchitectureSchema; each claims the mlx-lm ``model_types`` it lists."""


@hookspec
def mlxterp_recognize(model):
    """Return the ArchitectureSchema of ``model`` (an mlx.nn.Module) if this plugin recognises
    it by code, for models no schema's ``model_types`` claims; else None."""


@hookspec
def mlxterp_analyses():
    """Return {name: function(model, *args, **kwargs)}; each becomes ``InterpretableModel.name``."""


@hookspec
def mlxterp_loaders():
    """Return a list of loaders for ``mlxterp.load(source)``: each is
    ``function(source, **options) -> (module, tokenizer)``, or None when the source is not its kind.
    ``mlxterp.load(..., shard=...)`` passes ``lazy=True``: leave the weights unevaluated if you
    can (each rank of a sharded model then reads only its part)."""


@hookspec
def mlxterp_interventions():
    """Return {name: factory}; each becomes ``mlxterp.interventions.name`` (a factory returns a
    callable ``array -> array``)."""


@hookspec
def mlxterp_commands(subparsers):
    """Add ``mlxterp`` commands: ``subparsers.add_parser(name).set_defaults(handler=f)``, f(args) -> exit code."""


@hookspec
def mlxterp_bench_rows():
    """Return {key: function(repeats) -> list[mlxterp_tools.Row]}; each becomes rows of
    ``mlxterp bench`` (``--rows key`` picks them), after mlxterp_tools' own."""


@hookspec
def mlxterp_exports():
    """Return {name: object}; each becomes ``mlxterp.name`` (a plugin's public classes and
    modules, e.g. ``mlxterp.TunedLens``)."""
