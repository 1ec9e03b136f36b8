"""What the method returns for one image, and the picture a person judges it by."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from PIL import Image, ImageDraw

PANEL_MIN_SIDE = 256
LABELS = ("original", "partial", "recovered")
BASE_LABEL = "base model alone"


@dataclass
class ImageResult:
    """One image's evidence: its recovery, every requested metric and the membership score."""

    name: str
    score: float
    metrics: dict[str, float]
    original: Image.Image
    partial: Image.Image
    #: The recovered picture shown to a person (``authenticate(display=...)``; by default the
    #: palette-clamped recovery, ``cgidm_core.images.palette_clamp``).
    recovered: Image.Image
    extra: dict[str, Any] = field(default_factory=dict)
    #: The recovery the scores were measured on, when the picture shown differs from it.
    recovered_raw: Image.Image | None = None
    #: The same masked image recovered by the base model alone (``cgidm_core.base_recovery``),
    #: when ``InversionConfig.base_recovery`` asked for it; its similarity to the original is in
    #: ``extra["base_recovery"]``.
    base_recovered: Image.Image | None = None

    def side_by_side(self) -> Image.Image:
        """original | partial | recovered (| base alone, when computed), enlarged with
        nearest-neighbour so small pixel-model images stay crisp, with a caption under each
        panel."""
        side = self.original.width
        scale = max(1, -(-PANEL_MIN_SIDE // side))
        panel = side * scale
        gap, caption = 8, 18
        panels = [self.original, self.partial, self.recovered]
        labels = list(LABELS)
        if self.base_recovered is not None:
            panels.append(self.base_recovered)
            labels.append(BASE_LABEL)
        count = len(panels)
        canvas = Image.new("RGB", (count * panel + (count + 1) * gap, panel + 2 * gap + caption),
                           "white")
        draw = ImageDraw.Draw(canvas)
        for i, (label, image) in enumerate(zip(labels, panels, strict=True)):
            x = gap + i * (panel + gap)
            canvas.paste(image.resize((panel, panel), Image.Resampling.NEAREST), (x, gap))
            draw.text((x, gap + panel + 3), label, fill="black")
        return canvas

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "score": self.score, "metrics": dict(self.metrics), **self.extra}
