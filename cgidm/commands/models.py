"""``cgidm models``: the model names that work wherever a model path is accepted.

People try the tool before they have a pair of their own; listing the packaged demo pair with
its folders tells them what to pass to ``--pretrained``/``--finetuned`` and where to look.
"""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "models",
        help="list the demo models shipped with cgidm",
        description="List the packaged demo models; their names work wherever a model path is "
        "accepted (e.g. --pretrained demo-base --finetuned demo-vangogh).",
    )
    parser.add_argument("--json", action="store_true", help="print the list as JSON")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from cgidm_core.demo import list_demo_models

    models = list_demo_models()
    if args.json:
        print(json.dumps(models, indent=2))
        return 0
    width = max(len(m["name"]) for m in models)
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
