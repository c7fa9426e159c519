"""matplotlib figures of the analyses' results.

Every function returns the Figure. With ``path`` it is also written there (PNG by the
extension) and closed, so scripts do not accumulate open figures; in a Jupyter notebook a
returned figure shows inline.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mlxterp.plugin import figure_text, finish, pyplot, token_label

if TYPE_CHECKING:
    from .results import AttentionPatterns, DLAResult, LogitLensResult, PatchingResult, ResidComponents, SteeringVector


def lens_heatmap(result: LogitLensResult, path, max_display_tokens: int, figsize):
    """Layers x positions; each cell shows the top predicted token, coloured by its probability."""
    plt = pyplot()
    positions = list(range(len(result.tokens)))[-max_display_tokens:]
    layers = result.layers
    probs = [[result[layer][p][0][1] for p in positions] for layer in layers]
    fig, ax = plt.subplots(figsize=figsize)
    image = ax.imshow(probs, aspect="auto", cmap="viridis", vmin=0, vmax=1, origin="lower")
    for i, layer in enumerate(layers):
        for j, p in enumerate(positions):
            token_id, prob, text = result[layer][p][0]
            ax.text(j, i, token_label(text, 9), ha="center", va="center", fontsize=7,
                    color="white" if prob < 0.6 else "black")
    ax.set_xticks(range(len(positions)))
    ax.set_xticklabels([token_label(result.tokens[p], 12) for p in positions], rotation=45, ha="right")
    ax.set_yticks(range(len(layers)))
    ax.set_yticklabels([str(layer) for layer in layers])
    ax.set_xlabel("input token (position)")
    ax.set_ylabel("layer")
    ax.set_title(figure_text(f"Logit lens: top prediction after each layer\n{result.text!r}"))
    fig.colorbar(image, ax=ax, label="probability of the top token")
    return finish(fig, path)


def patching_plot(result: PatchingResult, path, figsize):
    """A bar per layer, or a layers x positions/heads heatmap, of recovery (%)."""
    plt = pyplot()
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
        ax.set_xticklabels([token_label(t, 12) for t in result.labels], rotation=45, ha="right")
        ax.set_yticks(range(len(result.layers)))
        ax.set_yticklabels([str(layer) for layer in result.layers])
        ax.set_xlabel("corrupted-prompt token (position)" if result.axis == "position" else "head")
        ax.set_ylabel("layer")
        fig.colorbar(image, ax=ax, label="recovery (%)")
    ax.set_title(figure_text(f"{title}\n{result.corrupted_text!r}"))
    return finish(fig, path)


def steering_plot(result: SteeringVector, path, figsize):
    """Each prompt's projection onto the (unit) steering vector."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=figsize)
    ax.scatter(result.positive_projections, [1] * len(result.positive_projections), label="positive", color="tab:green")
    ax.scatter(result.negative_projections, [0] * len(result.negative_projections), label="negative", color="tab:red")
    ax.set_yticks([0, 1])
    ax.set_yticklabels(["negative", "positive"])
    ax.set_xlabel(f"projection on the steering vector at {result.name} ({result.position} position)")
    ax.set_title(f"Steering vector, norm {result.norm:.1f}")
    ax.legend(loc="best")
    return finish(fig, path)


def attention_plot(result: AttentionPatterns, path, columns: int, cell: float):
    """One heatmap per head, query tokens down the side, key tokens along the bottom."""
    plt = pyplot()
    rows = -(-len(result.heads) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(cell * columns, cell * rows), squeeze=False)
    labels = [token_label(t, 10) for t in result.tokens]
    for k, ax in enumerate(axes.flat):
        if k >= len(result.heads):
            ax.axis("off")
            continue
        ax.imshow(result.patterns[k], cmap="Blues", vmin=0, vmax=1)
        layer = "" if result.layer is None else f"layer {result.layer} "  # None: a pattern given without its layer
        ax.set_title(f"{layer}head {result.heads[k]}", fontsize=9)
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, rotation=90, fontsize=7)
        ax.set_yticks(range(len(labels)))
        ax.set_yticklabels(labels, fontsize=7)
    fig.suptitle(figure_text(f"Attention patterns (rows attend to columns)\n{result.text!r}"))
    fig.tight_layout()
    return finish(fig, path)


def dla_plot(result: DLAResult, path, figsize):
    """Per-layer attention and MLP contributions as bars, and per-head contributions as a heatmap."""
    plt = pyplot()
    panels = 2 if result.n_heads else 1
    fig, axes = plt.subplots(1, panels, figsize=figsize, squeeze=False)
    layers = sorted({int(lab[1:].split(" ")[0].split("H")[0]) for lab in result.labels if lab.startswith("L")})
    attn = [sum(v for lab, v in zip(result.labels, result.values)
                if lab.startswith(f"L{i}H") or lab in (f"L{i} attn", f"L{i} attn bias")) for i in layers]
    mlp = [result[f"L{i} mlp"] for i in layers]
    ax = axes[0][0]
    width = 0.4
    ax.bar([i - width / 2 for i in layers], attn, width, label="attention")
    ax.bar([i + width / 2 for i in layers], mlp, width, label="MLP")
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xlabel("layer")
    ax.set_ylabel(figure_text(f"contribution to logit {result.answers[0]!r} - {result.answers[1]!r}"))
    ax.legend()
    ax.set_title(f"Direct logit attribution (total {result.logit_diff:.2f}, embed {result['embed']:+.2f})")
    if result.n_heads:
        matrix = result.head_matrix()
        bound = max(1e-6, max(abs(v) for row in matrix for v in row))
        image = axes[0][1].imshow(matrix, aspect="auto", cmap="RdBu", vmin=-bound, vmax=bound, origin="lower")
        axes[0][1].set_xlabel("head")
        axes[0][1].set_ylabel("layer")
        axes[0][1].set_title("per head")
        fig.colorbar(image, ax=axes[0][1])
    fig.tight_layout()
    return finish(fig, path)


def resid_norms_plot(result: ResidComponents, path, position: int, figsize):
    """The norm of each component (or of the accumulated stream) at one position."""
    plt = pyplot()
    import mlx.core as mx

    norms = mx.linalg.norm(result.array[:, position], axis=-1).tolist()
    fig, ax = plt.subplots(figsize=figsize)
    ax.bar(range(len(norms)), norms)
    ax.set_xticks(range(len(norms)))
    ax.set_xticklabels(result.labels, rotation=90, fontsize=7)
    ax.set_ylabel("L2 norm")
    ax.set_title(figure_text(f"Residual stream, {result.kind}, at {result.tokens[position]!r} ({result.text!r})"))
    fig.tight_layout()
    return finish(fig, path)
