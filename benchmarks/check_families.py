"""``cgidm check`` on tiny layouts of every registered family, as a table (docs/FAMILIES.md).

    make check-families          # = python -m benchmarks.check_families, from the repository root
    python -m benchmarks.check_families --family flux2-dev --family sd3 --out /tmp/families

What issue 23's "done when" asks to demonstrate: from a clean clone (``make venv``, nothing
downloaded: HF_HUB_OFFLINE is set here), each family's tiny random models are built locally by
``cgidm_testkit`` (the same small configs of the real architectures its tests compare with
diffusers' pipelines, tokenizers built with the ``tokenizers`` library), and ``cgidm check``
(``cgidm.cli.main``, the console script's own entry, in this process so that the imports are
paid once) runs on each fine-tune layout its users publish against its base: detection,
loading, PGD, scores, controls and results.json. One row per family x layout: whether the check
ran, the family and layout ``cgidm check`` detected (must equal the row's), the image's verdict
against one control and its score (masked SSIM of the recovery), and the seconds the check took
(building the tiny models not counted). Every registered family must have a row: a family added
to the registry without one here is reported as ``no tiny layout`` and the exit status is 1, as
it is for any failed check.

Settings: 2 PGD steps, seed 0, 32 px for the latent transformer families (the tiny models' size;
Qwen-Image's pair would otherwise run at its native 1024 px), the tiny UNet models' own size
otherwise, one image and one control (so each verdict is ``inconclusive``: with one control no
p-value can reach alpha), no base-model recovery. Timings are of whatever CPU runs it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")

Build = Callable[[Path, Path], Path]


@dataclass(frozen=True)
class Row:
    family: str
    layout: str  # the --finetuned-kind cgidm check must detect
    label: str  # what a user holds (format / naming)
    build: Build  # (base, scratch folder) -> the fine-tune
    side: int | None = 32  # --resolution


def _transformer_rows() -> dict[str, tuple[Callable[..., Path], list[Row]]]:
    """Each transformer family's base maker and its fine-tune layouts."""
    from cgidm_testkit import tiny_families as tk
    from cgidm_testkit import tinymodels as tm

    def folder_lora(make: Callable[..., Path]) -> Build:
        return lambda base, out: make(base, out / "lora", seed=5)

    def comfy_lora(make: Callable[..., Path]) -> Build:
        return lambda base, out: make(base, out / "lora.safetensors", seed=5, naming="comfy")

    def single(make: Callable[..., Path]) -> Build:
        return lambda base, out: make(base, out / "ft.safetensors", seed=3)

    def generic(kind: str, cls: str) -> Build:
        make = tk.make_full_finetune if kind == "pipeline" else tk.make_transformer_folder
        return lambda base, out: make(cls, base, out / kind, seed=3)

    def transformer_layouts(family: str, cls: str) -> list[Row]:
        return [Row(family, "pipeline", "pipeline folder (full fine-tune)",
                    generic("pipeline", cls)),
                Row(family, "dreambooth", "transformer/ folder", generic("dreambooth", cls))]

    return {
        "flux2-dev": (tk.make_tiny_flux2_dev, [
            *transformer_layouts("flux2-dev", "Flux2Transformer2DModel"),
            Row("flux2-dev", "lora", "LoRA, diffusers/peft", folder_lora(tk.make_flux2_dev_lora)),
            Row("flux2-dev", "lora", "LoRA, ai-toolkit (BFL names)", lambda base, out:
                tk.make_flux2_lora_pair("Flux2Pipeline", base, out / "lora", seed=5)[0]),
            Row("flux2-dev", "lora", "LoRA, musubi-tuner / sd-scripts", lambda base, out:
                tk.make_flux2_lora_pair("Flux2Pipeline", base, out / "lora", seed=5)[0].parent
                / "kohya.safetensors"),
            Row("flux2-dev", "single_file", "single file, BFL naming",
                single(tk.make_flux2_dev_single_file)),
        ]),
        "flux2": (tk.make_tiny_flux2_klein, [
            *transformer_layouts("flux2", "Flux2Transformer2DModel"),
            Row("flux2", "lora", "LoRA, diffusers/peft", folder_lora(tk.make_flux2_lora)),
            Row("flux2", "lora", "LoRA, ai-toolkit (BFL names)", lambda base, out:
                tk.make_flux2_lora_pair("Flux2KleinPipeline", base, out / "lora", seed=5)[0]),
            Row("flux2", "single_file", "single file, BFL naming (ComfyUI's prefix)",
                lambda base, out: tk.make_flux2_klein_single_file(
                    base, out / "ft.safetensors", seed=3, prefix="model.diffusion_model.")),
        ]),
        "flux": (tm.make_tiny_flux, [
            Row("flux", "pipeline", "pipeline folder (full fine-tune)",
                lambda base, out: tm.make_flux_full_finetune(base, out / "ft", seed=3)),
            Row("flux", "dreambooth", "transformer/ folder",
                lambda base, out: tm.make_flux_transformer_folder(base, out / "db", seed=3)),
            Row("flux", "lora", "LoRA, diffusers/peft", folder_lora(tm.make_flux_lora)),
            Row("flux", "lora", "LoRA, kohya-ss", lambda base, out:
                tm.make_flux_kohya_lora(base, out / "kohya.safetensors", seed=5)),
            Row("flux", "lora", "LoRA, XLabs", lambda base, out:
                tm.make_flux_xlabs_lora(base, out / "xlabs.safetensors", seed=5)),
            Row("flux", "single_file", "single file, BFL naming", single(tm.make_flux_single_file)),
        ]),
        "chroma": (tk.make_tiny_chroma, [
            *transformer_layouts("chroma", "ChromaTransformer2DModel"),
            Row("chroma", "lora", "LoRA, diffusers/peft", folder_lora(tk.make_chroma_lora)),
            Row("chroma", "single_file", "single file", single(tk.make_chroma_single_file)),
        ]),
        "sd3": (lambda path, seed=0: tk.make_tiny_sd3(path, seed=seed, layout="3.5-medium"), [
            Row("sd3", "pipeline", "pipeline folder (full fine-tune, 3.5 medium)",
                lambda base, out: tk.make_sd3_full_finetune(base, out / "ft", seed=3)),
            Row("sd3", "dreambooth", "transformer/ folder", generic("dreambooth",
                                                                  "SD3Transformer2DModel")),
            Row("sd3", "lora", "LoRA, diffusers/peft", folder_lora(tk.make_sd3_lora)),
            Row("sd3", "lora", "LoRA, kohya-ss sd3_train_network", lambda base, out:
                _kohya_sd3(base, out)),
            Row("sd3", "single_file", "single file, Stability naming",
                single(tk.make_sd3_single_file)),
        ]),
        "z-image": (tk.make_tiny_zimage, [
            *transformer_layouts("z-image", "ZImageTransformer2DModel"),
            Row("z-image", "lora", "LoRA, diffusers/peft", folder_lora(tk.make_zimage_lora)),
            Row("z-image", "lora", "LoRA, ComfyUI / ai-toolkit", comfy_lora(tk.make_zimage_lora)),
            Row("z-image", "single_file", "single file, ComfyUI naming",
                single(tk.make_zimage_single_file)),
        ]),
        "qwen-image": (tk.make_tiny_qwen_image, [
            *transformer_layouts("qwen-image", "QwenImageTransformer2DModel"),
            Row("qwen-image", "lora", "LoRA, diffusers/peft",
                folder_lora(tk.make_qwen_image_lora)),
            Row("qwen-image", "lora", "LoRA, ComfyUI / ai-toolkit",
                comfy_lora(tk.make_qwen_image_lora)),
            Row("qwen-image", "single_file", "single file",
                single(tk.make_qwen_image_single_file)),
        ]),
    }


def _kohya_sd3(base: Path, out: Path) -> Path:
    from cgidm_testkit import tiny_families as tk

    written = tk.make_sd3_kohya_lora(base, out / "kohya", seed=5)
    return Path(written[0] if isinstance(written, tuple) else written)


def _unet_rows() -> dict[str, tuple[Callable[..., Path], list[Row]]]:
    """The UNet families (SD 1.x/2.x, SDXL and its v-prediction descendants, pixel models)."""
    from cgidm_testkit import tiny_families as tk
    from cgidm_testkit import tinymodels as tm

    def vpred_single(base: Path, out: Path) -> Path:
        import torch

        file = tm.make_sdxl_single_file(base, out / "noob_ft.safetensors", seed=3,
                                        text_encoders=False)
        tk.add_tensors(file, {"v_pred": torch.tensor([]), "ztsnr": torch.tensor([])})
        return file

    def pixel_pair(make: Callable[..., tuple[Path, Path]]) -> Callable[..., Path]:
        return lambda path, seed=0: make(path, seed=seed)[0]

    def pixel_finetune(make: Callable[..., tuple[Path, Path]]) -> Build:
        return lambda base, out: make(base.parent, seed=0)[1]

    return {
        "stable-diffusion": (tm.make_tiny_sd, [
            Row("stable-diffusion", "pipeline", "pipeline folder (full fine-tune)",
                lambda base, out: tm.make_full_finetune(base, out / "ft", seed=3), None),
            Row("stable-diffusion", "lora", "LoRA, diffusers/peft",
                lambda base, out: tm.make_lora(base, out / "lora", seed=5), None),
            Row("stable-diffusion", "single_file", "single file, LDM naming",
                lambda base, out: tm.make_single_file(base, out / "ft.safetensors", seed=3),
                None),
        ]),
        "stable-diffusion-xl": (tm.make_tiny_sdxl, [
            Row("stable-diffusion-xl", "lora", "LoRA, diffusers/peft",
                lambda base, out: tm.make_sdxl_lora(base, out / "lora", seed=5), None),
            Row("stable-diffusion-xl", "lora", "LoRA, kohya-ss", lambda base, out:
                tm.make_sdxl_kohya_lora(base, out / "kohya.safetensors", seed=5), None),
            Row("stable-diffusion-xl", "single_file", "single file, SGM naming",
                lambda base, out: tm.make_sdxl_single_file(base, out / "ft.safetensors", seed=3),
                None),
        ]),
        "stable-diffusion-xl v-pred": (tk.make_tiny_sdxl_vpred, [
            Row("stable-diffusion-xl", "single_file",
                "v-pred / ZTSNR single file (NoobAI-XL v-pred)", vpred_single, None),
        ]),
        "ddpm": (pixel_pair(tm.make_tiny_ddpm_pair), [
            Row("ddpm", "ddpm", "pipeline folder", pixel_finetune(tm.make_tiny_ddpm_pair), None),
        ]),
        "pixel-flow": (pixel_pair(tm.make_tiny_pixel_flow_pair), [
            Row("pixel-flow", "ddpm", "pipeline folder",
                pixel_finetune(tm.make_tiny_pixel_flow_pair), None),
        ]),
    }


def _pictures(root: Path) -> tuple[Path, Path]:
    """One image and a folder with one control: smooth seeded noise, no data needed."""
    rng = np.random.default_rng(0)
    (root / "controls").mkdir(parents=True, exist_ok=True)
    paths = (root / "image.png", root / "controls" / "control.png")
    for path in paths:
        small = rng.uniform(0, 255, (8, 8, 3)).astype(np.uint8)
        Image.fromarray(small).resize((64, 64), Image.BICUBIC).save(path)
    return paths


def _check(base: Path, finetuned: Path, row: Row, out: Path, pictures: tuple[Path, Path]
           ) -> dict[str, object]:
    from cgidm.cli import main

    args = ["check", "--pretrained", str(base), "--finetuned", str(finetuned), "--steps", "2",
            "--seed", "0", "--prompt", "sks style", "--no-base-recovery", "--controls",
            str(pictures[1].parent), "--out", str(out), str(pictures[0])]
    if row.side is not None:
        args[1:1] = ["--resolution", str(row.side)]
    start = time.perf_counter()
    code = main(args)
    seconds = time.perf_counter() - start
    if code != 0:
        return {"ok": False, "why": f"exit status {code}", "seconds": seconds}
    doc = json.loads((out / "results.json").read_text())
    pair = doc["settings"]["pair"]
    found = (pair["family"], pair["finetuned_kind"])
    image = doc["images"][0]
    return {"ok": found == (row.family, row.layout), "found": "/".join(found),
            "verdict": image.get("verdict"), "score": image.get("score"),
            "seconds": seconds, "why": "" if found == (row.family, row.layout)
            else f"detected {found}"}


def run(names: list[str], root: Path) -> list[dict[str, object]]:
    import torch

    from cgidm_core import families

    torch.manual_seed(0)
    table = {**_transformer_rows(), **_unet_rows()}
    pictures = _pictures(root / "pictures")
    results: list[dict[str, object]] = []
    registered = [family.name for family in families.FAMILIES]
    for name in registered:
        if name not in table:
            results.append({"family": name, "label": "-", "ok": False,
                            "why": "no tiny layout in benchmarks/check_families.py"})
    for key, (make_base, rows) in table.items():
        if names and key.split()[0] not in names:
            continue
        scratch = root / key.replace(" ", "-")
        base = make_base(scratch / "base", seed=0)
        for i, row in enumerate(rows):
            entry: dict[str, object] = {"family": key, "label": row.label, "layout": row.layout}
            try:
                finetuned = row.build(Path(base), scratch / f"ft{i}")
                entry.update(_check(Path(base), finetuned, row, scratch / f"out{i}", pictures))
            except Exception as error:  # a table of what runs: report, go on
                entry.update({"ok": False, "why": f"{type(error).__name__}: {error}"[:160]})
            print(_line(entry), flush=True)
            results.append(entry)
    return results


def _line(entry: dict[str, object]) -> str:
    score = entry.get("score")
    seconds = entry.get("seconds")
    return (f"| {entry['family']} | {entry['label']} | "
            f"{'ok' if entry['ok'] else 'FAILED: ' + str(entry.get('why', ''))} | "
            f"{entry.get('found', '-')} | {entry.get('verdict', '-')} | "
            f"{'-' if score is None else f'{float(str(score)):.3f}'} | "
            f"{'-' if seconds is None else f'{float(str(seconds)):.1f}'} |")


HEADER = ("| family | fine-tune layout / format | cgidm check | detected family/layout | "
          "verdict (1 control) | score (masked SSIM) | seconds |\n|---|---|---|---|---|---|---|")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--family", action="append", default=[],
                        help="only these registry names (repeat); default: every family")
    parser.add_argument("--out", help="scratch folder (default: a temporary one)")
    parser.add_argument("--markdown", help="also write the table to this file")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's)")
    args = parser.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    root = Path(args.out or tempfile.mkdtemp(prefix="cgidm-families-"))
    print(HEADER, flush=True)
    results = run(args.family, root)
    table = "\n".join([HEADER, *(_line(entry) for entry in results)])
    print(f"\n{table}\n\n{sum(bool(e['ok']) for e in results)} of {len(results)} rows ok; "
          f"models and outputs in {root}")
    if args.markdown:
        Path(args.markdown).write_text(table + "\n", encoding="utf-8")
    return 0 if all(entry["ok"] for entry in results) else 1


if __name__ == "__main__":
    sys.exit(main())
