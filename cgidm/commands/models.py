"""``cgidm models``: the model names that work wherever a model path is accepted, and (with
``--families``) the model families cgidm loads.

People try the tool before they have a pair of their own; listing the packaged demo pair with
its folders tells them what to pass to ``--pretrained``/``--finetuned`` and where to look.
``--families`` prints the family registry (:mod:`cgidm_core.families`): what each family loads,
in which layouts, with which defaults.
"""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "models",
        help="list the demo models shipped with cgidm",
        description="List the packaged demo models; their names work wherever a model path is "
        "accepted (e.g. --pretrained demo-base --finetuned demo-vangogh). With --families, list "
        "the model families cgidm loads instead.",
    )
    parser.add_argument("--json", action="store_true", help="print the list as JSON")
    parser.add_argument("--families", action="store_true",
                        help="list the model families cgidm loads (the family registry): how "
                             "each is recognised and stored, its objective and defaults")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.families:
        return print_families(args.json)
    from cgidm_core.demo import list_demo_models

    models = list_demo_models()
    if args.json:
        print(json.dumps(models, indent=2))
        return 0
    width = max(len(m["name"] or "") for m in models)
    for model in models:
        base = model["finetuned_from"]
        lineage = f"fine-tuned from {base}" if base else "base model"
        print(f"{model['name']:<{width}}  {model['family']}, {lineage}")
        print(f"{'':<{width}}  {model['path']}")
        print(f"{'':<{width}}  {model['description']}")
    print("\nExample: cgidm check --pretrained demo-base --finetuned demo-vangogh --out OUT "
          "IMAGES...")
    print("Flow matching: cgidm check --pretrained demo-flow-base --finetuned demo-flow-vangogh "
          "--out OUT IMAGES...")
    print("Latent, text-conditioned (a LoRA): cgidm check --pretrained demo-latent-base "
          "--finetuned demo-latent-vangogh-lora --out OUT IMAGES...")
    return 0


def print_families(as_json: bool) -> int:
    """The family registry, one block per family, in the order detection reads it."""
    from cgidm_core import families

    rows = families.describe()
    if as_json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        print(f"{row['name']}  {row['title']}")
        print(f"  {row['summary']}")
        print(f"  objective: {row['objective']}, conditioning: {row['conditioning']}, "
              f"space: {row['space']}, GPU dtype: {row['gpu_dtype']}, "
              f"resolution: {row['resolution']}")
        print(f"  pretrained: {'; '.join(row['pretrained_layouts'])}")
        print(f"  fine-tuned layouts: {', '.join(row['finetuned_layouts'])}")
        if row["lora_formats"]:
            print(f"  LoRA formats: {'; '.join(row['lora_formats'])}")
        uploads = ", ".join(row["upload_kinds"]) or "none yet (check it with cgidm check)"
        print(f"  service uploads: {uploads}")
        for label, key in (("time shift", "time_shift"), ("guidance", "guidance"),
                           ("trigger prompt", "prompt_source")):
            if row[key]:
                print(f"  {label}: {row[key]}")
        if row["memory_borrowed_from"]:
            print(f"  memory model: NOT counted; {row['memory_note']}")
        elif row["memory_model"]:
            side = row["resolution"]
            passes = row["memory_pass_bytes"]
            print(f"  memory model (meta-device count, not measured on a GPU): "
                  f"{passes[f'{side}/plain'] / 1e9:.1f} GB saved per denoiser pass at {side} px, "
                  f"{passes[f'{side}/checkpointed'] / 1e9:.2f} GB checkpointed; "
                  f"{row['denoiser_parameters'] / 1e9:.2f} B denoiser parameters"
                  + (f" ({row['memory_note']})" if row["memory_note"] else ""))
        print(f"  adapter: {row['adapter']}")
    refused = ", ".join(r.title for r in families.REFUSED)
    if refused:
        print(f"\nRecognised and refused by name: {refused}.")
    print("\nAdding a family: docs/FAMILIES.md.")
    return 0
