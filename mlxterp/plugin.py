"""What a plugin may use: the one documented import place for plugin authors.

mlxterp's own plugins import from here (and from each other's public names), exactly as a
third party's plugin does, so this surface is always exercised; ``mlxterp_core`` behind it can
move without breaking plugins. docs/plugins.md describes every name.

    from mlxterp.plugin import hookimpl, Hooks, Serialisable, Display

Sections: registering (``hookimpl``, other plugins' benchmark rows), errors, loading and
running the model (loading, trace hooks, stopping a forward early, module probes, the backend),
names and sites, options, token windows and corpora, the activation stream and datasets, files,
progress, distributed helpers, the result kit (serialisation, layer mappings), the view kit (HTML
views, figures, token text).
"""

from mlxterp_core import interventions, options
from mlxterp_core.architecture import Architecture, read_attribute
from mlxterp_core.backend import describe as describe_backend
from mlxterp_core.backend import on_cpu
from mlxterp_core.corpus import TokenizedCorpus, Windows, default_corpus, read_documents, token_windows, tokenize
from mlxterp_core.dataset import ActivationDataset, DatasetError
from mlxterp_core.distributed import launch_mode, map_rows
from mlxterp_core.sharding import Sharding, ShardingError
from mlxterp_core.errors import (
    CorpusError,
    FileFormatError,
    InputError,
    InterventionError,
    MlxterpError,
    OptionError,
    ResultIndexError,
    TraceError,
    UnknownNameError,
    WriteError,
    did_you_mean,
)
from mlxterp_core.figures import figure_text, finish, pyplot, token_label
from mlxterp_core.files import read_json, read_safetensors, read_text, write_atomic, write_json
from mlxterp_core.hookspecs import hookimpl
from mlxterp_core.interventions import Intervention
from mlxterp_core.load import DEFAULT_MODEL, LoadError
from mlxterp_core.model import InterpretableModel, load
from mlxterp_core.names import StandardName, is_raw, parse, transformerlens_name
from mlxterp_core.plugins import bench_rows
from mlxterp_core.module_probes import probes_installed
from mlxterp_core.progress import progress_bar, progress_over
from mlxterp_core.results import LayerMapping, Serialisable, index_of
from mlxterp_core.schema import ArchitectureSchema
from mlxterp_core.sites import (
    INPUT_PORT,
    NameSet,
    canonical_site,
    is_glob,
    layer_of,
    locate_module,
    matches,
    module_part,
    stop_name,
)
from mlxterp_core.stream import (
    ArrayRows,
    Batches,
    DatasetRows,
    MixingBuffer,
    RowSource,
    Site,
    SiteReader,
    TextRows,
    resolve_sites,
    site_batches,
    stop_for,
    take_rows,
    trainable,
    trainable_stored,
)
from mlxterp_core.text import ids_text, token_ids, token_text
from mlxterp_core.trace import MODEL_OUTPUT, Activations, Hooks
from mlxterp_core.training import Run, load_checkpoint, save_checkpoint, train_steps
from mlxterp_core.views import (
    Display,
    Rounded,
    attention_html,
    encode_ids,
    encode_unit,
    encode_values,
    graph_html,
    heatmap_html,
    lens_html,
    percent,
    short,
    summary_html,
    token_heatmap_html,
    write_html,
)

__all__ = [
    # registering
    "hookimpl", "bench_rows",
    # errors
    "MlxterpError", "InputError", "OptionError", "FileFormatError", "UnknownNameError", "TraceError",
    "InterventionError", "CorpusError", "DatasetError", "LoadError", "WriteError", "ResultIndexError", "did_you_mean",
    # loading and running the model
    "load", "DEFAULT_MODEL", "InterpretableModel", "Hooks", "Activations", "MODEL_OUTPUT", "probes_installed",
    "interventions", "Intervention", "on_cpu", "describe_backend",
    # names, sites, architectures
    "Architecture", "ArchitectureSchema", "StandardName", "parse", "is_raw", "transformerlens_name",
    "read_attribute", "INPUT_PORT", "NameSet", "canonical_site", "is_glob", "layer_of", "locate_module",
    "matches", "module_part", "stop_name",
    # options
    "options",
    # corpora, windows, datasets
    "Windows", "token_windows", "tokenize", "TokenizedCorpus", "read_documents", "default_corpus",
    "ActivationDataset",
    # the activation stream
    "Site", "resolve_sites", "stop_for", "SiteReader", "site_batches", "take_rows", "trainable",
    "trainable_stored", "RowSource", "TextRows", "DatasetRows", "ArrayRows", "MixingBuffer", "Batches",
    # the training loop: steps, progress, checkpoints, resume
    "train_steps", "Run", "save_checkpoint", "load_checkpoint",
    # files, progress, distributed
    "read_text", "read_json", "read_safetensors", "write_atomic", "write_json", "progress_bar", "progress_over", "map_rows",
    "launch_mode", "Sharding", "ShardingError",
    # the result kit
    "Serialisable", "LayerMapping", "index_of",
    # the view kit
    "Display", "short", "percent", "Rounded", "summary_html", "encode_unit", "encode_values", "encode_ids",
    "token_heatmap_html", "heatmap_html", "graph_html", "lens_html", "attention_html", "write_html", "pyplot", "finish",
    "token_label", "figure_text",
    "token_text", "ids_text", "token_ids",
]
