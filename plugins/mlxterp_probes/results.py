"""Result objects of probe sweeps (attrs values with the kit of mlxterp_core.results)."""

from __future__ import annotations

from pathlib import Path

import attrs

from mlxterp_analyses import SteeringVector
from mlxterp.plugin import Display, MlxterpError, Rounded, Serialisable, index_of, parse


@attrs.frozen(repr=False)
class ProbeSweep(Display, Serialisable):
    """One probe per site (``sites[k]``: "embed", "layers.3.output", ...) with its held-out
    ``accuracy[k]`` and ``auroc[k]`` on ``n_test`` examples of groups never trained on, and its
    ``directions[k]`` (D floats, raw activation space) and ``biases[k]``: the probe's logit is
    ``x @ direction + bias``. ``result["layers.3.output"]`` or ``result[3]`` is
    ``(accuracy, auroc)``; ``result[-1]`` is the last layer's."""

    method: str
    position: str
    sites: list[str]
    accuracy: list[float]
    auroc: list[float]
    train_accuracy: list[float]
    directions: list[list[float]]
    biases: list[float]
    n_train: int
    n_test: int
    labels: list[int]
    texts: list[str] = attrs.field(factory=list)
    projections: list[list[float]] = attrs.field(factory=list)  # per site, each example on the unit direction

    def _index(self, key) -> int:
        if isinstance(key, str):
            if key not in self.sites:
                try:
                    key = str(parse(key))  # 'layers[3].output'
                except MlxterpError:
                    pass
            return index_of(self.sites, key, "site", "ProbeSweep")
        layers = {}  # layer -> its first site
        for k, site in enumerate(self.sites):
            parts = site.split(".")
            if parts[0] == "layers" and len(parts) > 1 and parts[1].isdigit():
                layers.setdefault(int(parts[1]), k)
        return list(layers.values())[index_of(list(layers), key, "layer", "ProbeSweep")]

    def __getitem__(self, key) -> tuple[float, float]:
        k = self._index(key)
        return self.accuracy[k], self.auroc[k]

    def best(self) -> tuple[str, float, float]:
        """(site, accuracy, auroc) of the best held-out site (accuracy, then AUROC; shown to 4
        significant digits)."""
        k = max(range(len(self.sites)), key=lambda i: (self.accuracy[i], self.auroc[i]))
        return self.sites[k], Rounded(self.accuracy[k]), Rounded(self.auroc[k])

    def _summary(self) -> str:
        at = {"last": "the last token", "mean": "the mean over tokens"}.get(self.position, f"position {self.position}")
        width = len(self.directions[0]) if self.directions else 0
        head = (f"{self.method} probes at {at}, {len(self.sites)} sites x {width} dims, "
                f"{self.n_train} train / {self.n_test} held-out examples")
        if not self.sites:
            return head
        site, accuracy, area = self.best()
        baseline = ""
        if "embed" in self.sites and site != "embed":
            k = self.sites.index("embed")
            baseline = f"; embed {self.accuracy[k]:.3g} / {self.auroc[k]:.3g}"
        return f"{head}; best {site}: accuracy {accuracy:.3g}, AUROC {area:.3g}{baseline}"

    def steering_vector(self, key) -> SteeringVector:
        """The probe's direction at a site (name or layer) as a SteeringVector: its
        ``interventions(scale)`` add ``scale * direction`` there. A mass-mean direction is the
        difference of the class means, exactly what ``model.steering_vector`` computes."""
        k = self._index(key)
        site = self.sites[k]
        if not site.startswith("layers."):
            raise ValueError(f"{site!r} is not a layer site; steering vectors are added to layers[i] sites.")
        projections = self.projections[k] if self.projections else []
        positive = [i for i, label in enumerate(self.labels) if label == 1]
        negative = [i for i, label in enumerate(self.labels) if label == 0]
        return SteeringVector(
            name=site, layer=int(site.split(".")[1]), position=self.position, vector=list(self.directions[k]),
            positive=[self.texts[i] for i in positive] if self.texts else [],
            negative=[self.texts[i] for i in negative] if self.texts else [],
            positive_projections=[projections[i] for i in positive] if projections else [],
            negative_projections=[projections[i] for i in negative] if projections else [],
        )

    def plot(self, path: str | Path | None = None, figsize=(10, 5)):
        from mlxterp.plugin import finish, pyplot

        plt = pyplot()
        fig, ax = plt.subplots(figsize=figsize)
        xs = list(range(len(self.sites)))
        ax.plot(xs, self.accuracy, marker="o", label="held-out accuracy")
        ax.plot(xs, self.auroc, marker="s", label="held-out AUROC")
        ax.axhline(0.5, color="grey", linewidth=0.8, linestyle="--")
        ax.set_xticks(xs)
        ax.set_xticklabels(["emb" if s == "embed" else s.split(".")[1] for s in self.sites], fontsize=7)
        ax.set_xlabel("site (emb = embeddings, then layer outputs)")
        ax.set_ylim(0.3, 1.02)
        ax.set_title(f"{self.method} probe at the {self.position} position ({self.n_train} train / {self.n_test} test)")
        ax.legend()
        return finish(fig, path)
