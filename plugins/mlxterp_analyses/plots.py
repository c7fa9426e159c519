"""matplotlib figures of the analyses' results.

Every function returns the Figure. With ``path`` it is also written there (PNG by the
extension) and closed, so scripts do not accumulate open figures; in a Jupyter notebook a
returned figure shows inline.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .results import LogitLensResult, PatchingResult, SteeringVector


def _pyplot():
    import matplotlib

    if matplotlib.get_backend().lower() not in ("agg",) and not _display_available():
        matplotlib.use("Agg")  # no screen: draw to files
    import matplotlib.pyplot as plt

    return plt


def _display_available() -> bool:
    import os
    import sys

    return "ipykernel" in sys.modules or sys.platform == "darwin" or bool(os.environ.get("DISPLAY"))


def _finish(fig, path: str | Path | None):
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120, bbox_inches="tight")
        _pyplot().close(fig)
    return fig


def _label(text: str, width: int = 10) -> str:
    """A token as a readable label: whitespace-only tokens shown quoted, '$' escaped for mathtext."""
    shown = repr(text) if not text.strip() else text.replace("\n", "\\n")
    shown = shown.replace("$", r"\$")
    return shown if len(shown) <= width else shown[: width - 1] + "…"


def lens_heatmap(result: LogitLensResult, path, max_display_tokens: int, figsize):
    """Layers x positions; each cell shows the top predicted token, coloured by its probability."""
    plt = _pyplot()
    positions = list(range(len(result.tokens)))[-max_display_tokens:]
    layers = result.layers
    probs = [[result[layer][p][0][1] for p in positions] for layer in layers]
    fig, ax = plt.subplots(figsize=figsize)
    image = ax.imshow(probs, aspect="auto", cmap="viridis", vmin=0, vmax=1, origin="lower")
    for i, layer in enumerate(layers):
        for j, p in enumerate(positions):
            token_id, prob, text = result[layer][p][0]
            ax.text(j, i, _label(text, 9), ha="center", va="center", fontsize=7,
                    color="white" if prob < 0.6 else "black")
    ax.set_xticks(range(len(positions)))
    ax.set_xticklabels([_label(result.tokens[p], 12) for p in positions], rotation=45, ha="right")
    ax.set_yticks(range(len(layers)))
    ax.set_yticklabels([str(layer) for layer in layers])
    ax.set_xlabel("input token (position)")
    ax.set_ylabel("layer")
    ax.set_title(f"Logit lens: top prediction after each layer\n{result.text!r}")
    fig.colorbar(image, ax=ax, label="probability of the top token")
    return _finish(fig, path)


def patching_plot(result: PatchingResult, path, figsize):
    """A bar per layer, or a layers x positions/heads heatmap, of recovery (%)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=figsize)
    title = (f"Activation patching of {result.component}: clean {result.clean_answer!r} vs "
             f"corrupted {result.corrupted_answer!r}")
    if result.axis == "layer":
        values = [row[0] for row in result.recovery]
        ax.bar(range(len(values)), values, color=["tab:blue" if v >= 0 else "tab:red" for v in values])
        ax.set_xticks(range(len(values)))
        ax.set_xticklabels([str(layer) for layer in result.layers])
        ax.set_xlabel("layer")
        ax.set_ylabel("recovery (%)")
        ax.axhline(0, color="black", linewidth=0.8)
    else:
        bound = max(100.0, max(abs(v) for row in result.recovery for v in row))
        image = ax.imshow(result.recovery, aspect="auto", cmap="RdBu", vmin=-bound, vmax=bound, origin="lower")
        ax.set_xticks(range(len(result.labels)))
        ax.set_xticklabels([_label(t, 12) for t in result.labels], rotation=45, ha="right")
        ax.set_yticks(range(len(result.layers)))
        ax.set_yticklabels([str(layer) for layer in result.layers])
        ax.set_xlabel("corrupted-prompt token (position)" if result.axis == "position" else "head")
        ax.set_ylabel("layer")
        fig.colorbar(image, ax=ax, label="recovery (%)")
    ax.set_title(f"{title}\n{result.corrupted_text!r}")
    return _finish(fig, path)


def steering_plot(result: SteeringVector, path, figsize):
    """Each prompt's projection onto the (unit) steering vector."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=figsize)
    ax.scatter(result.positive_projections, [1] * len(result.positive_projections), label="positive", color="tab:green")
    ax.scatter(result.negative_projections, [0] * len(result.negative_projections), label="negative", color="tab:red")
    ax.set_yticks([0, 1])
    ax.set_yticklabels(["negative", "positive"])
    ax.set_xlabel(f"projection on the steering vector at {result.name} ({result.position} position)")
    ax.set_title(f"Steering vector, norm {result.norm:.1f}")
    ax.legend(loc="best")
    return _finish(fig, path)
