"""Result objects of the tuned lens (attrs values with the kit of mlxterp_core.results)."""

from __future__ import annotations

from pathlib import Path

import attrs

from mlxterp_analyses import LogitLensResult
from mlxterp.plugin import Display, Rounded, Serialisable


@attrs.frozen(repr=False)
class TunedLensResult(LogitLensResult):
    """The logit lens's result (``result[layer][position]`` is the top-k list of
    ``(token_id, probability, token_text)``), read through a tuned lens, plus per layer and
    position: ``kl[layer][p]`` = KL(final || lens) in nats, ``entropy[layer][p]`` of the lens's
    distribution (nats), and ``final_rank[layer][p]``, the rank (0 = top) that the lens gives the
    model's final top-1 token."""

    kl: dict[int, list[float]] = attrs.field(factory=dict)
    entropy: dict[int, list[float]] = attrs.field(factory=dict)
    final_rank: dict[int, list[int]] = attrs.field(factory=dict)
    lens: str = "tuned"

    def mean_kl(self) -> dict[int, float]:
        """layer -> KL(final || lens) averaged over positions (shown to 4 significant digits)."""
        return {layer: Rounded(sum(row) / len(row)) for layer, row in self.kl.items() if row}

    def _summary(self) -> str:
        mean = self.mean_kl()
        shown = [layer for layer in self.layers if layer in mean]
        if len(shown) > 1:  # the last layer's is 0: it is the model's own distribution
            shown = shown[:-1]
        picked = sorted({shown[0], shown[len(shown) // 2], shown[-1]}) if shown else []
        kl = ", ".join(f"L{layer} {mean[layer]:.3g}" for layer in picked)
        return super()._summary() + (f"; mean KL to the final distribution: {kl} nats" if kl else "")

    def _view(self) -> str:
        """The lens grid titled as a tuned lens, with each cell's KL to the final distribution,
        entropy and rank of the final top-1 on hover, each selectable as the cells' colour."""
        from mlxterp.plugin import lens_html

        metrics = [
            {"name": "KL(final || lens)", "unit": " nats", "values": self.kl},
            {"name": "entropy", "unit": " nats", "values": self.entropy},
            {"name": "rank of the final top-1", "values": self.final_rank, "log": True, "integer": True},
        ]
        return lens_html(self.tokens, self.layers, [self.predictions[layer] for layer in self.layers],
                         title=f"Tuned lens: {self.text}",
                         metrics=[{**m, "values": [m["values"][layer] for layer in self.layers]} for m in metrics
                                  if all(layer in m["values"] for layer in self.layers)])

    def plot(self, path: str | Path | None = None, max_display_tokens: int = 15, figsize=(16, 10)):
        from mlxterp_analyses import lens_heatmap
        from mlxterp.plugin import figure_text, finish

        fig = lens_heatmap(self, None, max_display_tokens, figsize)
        fig.axes[0].set_title(figure_text(f"Tuned lens: top prediction after each layer\n{self.text!r}"))
        return finish(fig, path)


@attrs.frozen(repr=False)
class LensEvaluation(Display, Serialisable):
    """Mean KL(final || lens) in nats over ``n_tokens`` held-out tokens, per translator:
    ``layers[k]`` reads the stream entering block k (0 = the embeddings)."""

    layers: list[int]
    tuned_kl: list[float]
    logit_kl: list[float]
    n_tokens: int

    def _summary(self) -> str:
        if not self.layers:
            return f"no layers, {self.n_tokens} tokens"
        tuned, logit = sum(self.tuned_kl) / len(self.layers), sum(self.logit_kl) / len(self.layers)
        return (f"{len(self.layers)} translators over {self.n_tokens} held-out tokens: KL(final || lens) tuned "
                f"{tuned:.3g} vs logit lens {logit:.3g} nats (mean over layers); input of layer {self.layers[0]}: "
                f"{self.tuned_kl[0]:.3g} vs {self.logit_kl[0]:.3g}")

    def table(self) -> str:
        """A Markdown table: layer, logit-lens KL, tuned-lens KL."""
        lines = ["| input of layer | logit lens KL (nats) | tuned lens KL (nats) |", "| ---: | ---: | ---: |"]
        lines += [f"| {layer} | {logit:.3f} | {tuned:.3f} |" for layer, logit, tuned in zip(self.layers, self.logit_kl, self.tuned_kl)]
        return "\n".join(lines)

    def plot(self, path: str | Path | None = None, figsize=(9, 5)):
        from mlxterp.plugin import finish, pyplot

        plt = pyplot()
        fig, ax = plt.subplots(figsize=figsize)
        ax.plot(self.layers, self.logit_kl, marker="o", label="logit lens")
        ax.plot(self.layers, self.tuned_kl, marker="o", label="tuned lens")
        ax.set_xlabel("input of layer (0 = embeddings)")
        ax.set_ylabel("KL(final || lens), nats")
        ax.set_yscale("log")
        ax.set_title(f"Held-out KL to the final distribution ({self.n_tokens} tokens)")
        ax.legend()
        return finish(fig, path)
