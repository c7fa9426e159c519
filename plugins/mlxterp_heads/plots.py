"""matplotlib figure of head scores (returned; written to ``path`` when given)."""

from __future__ import annotations

from mlxterp.plugin import figure_text, finish, pyplot


def head_scores_plot(result, path, figsize):
    """Layers x heads heatmap, the five best heads annotated."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=figsize)
    image = ax.imshow(result.scores, aspect="auto", cmap="viridis", origin="lower")
    for layer, head, value in result.top(5):
        ax.text(head, result.layers.index(layer), f"{value:.2f}", ha="center", va="center", fontsize=7, color="white")
    ax.set_xticks(range(result.n_heads))
    ax.set_yticks(range(len(result.layers)))
    ax.set_yticklabels([str(layer) for layer in result.layers], fontsize=7)
    ax.set_xlabel("query head")
    ax.set_ylabel("layer")
    ax.set_title(figure_text(f"{result.kind.replace('_', '-')} scores ({result.error_measure})\n{result.source}"), fontsize=9)
    fig.colorbar(image, ax=ax, label="score")
    return finish(fig, path)
