"""Tiny random models of the newer families (issue #23), built on the fly for tests.

Small configs of the real architectures (diffusers' own classes, a layer or two, widths of 8-64),
saved in the layouts their users publish, with tokenizers written locally (``tinymodels``'
byte-level CLIP and ``tokenizers``-built T5 tokenizers): nothing is downloaded. A "fine-tune" is
the base with seeded noise added to its weights, as in :mod:`cgidm_testkit.tinymodels`.
"""

from __future__ import annotations

import json
import shutil
from functools import partial
from pathlib import Path

import torch

from cgidm_testkit.tinymodels import (
    perturb_,
    randomize_lora_b,
    tiny_t5_tokenizer_and_encoder,
    tiny_tokenizer_and_text_config,
)

# --------------------------------------------------------------------------------------------
# What every diffusers-transformer family's fixtures do the same way, by class name: read the
# transformer back, save it perturbed as a ``transformer/`` folder or inside a pipeline copy, and
# give it a LoRA of its attention projections.


def load_transformer(class_name: str, folder: str | Path,
                     subfolder: str | None = "transformer"):
    """diffusers' ``class_name`` read from ``folder`` (offline, safetensors)."""
    import diffusers

    return getattr(diffusers, class_name).from_pretrained(
        folder, subfolder=subfolder, use_safetensors=True, local_files_only=True)


def make_transformer_folder(class_name: str, base: str | Path, out: str | Path,
                            seed: int = 1) -> Path:
    """``transformer/`` only, perturbed: what the DreamBooth scripts leave."""
    out = Path(out)
    perturb_(load_transformer(class_name, base), seed=seed).save_pretrained(
        out / "transformer", safe_serialization=True)
    return out


def make_full_finetune(class_name: str, base: str | Path, out: str | Path,
                       seed: int = 1) -> Path:
    """A copy of the pipeline folder with its transformer perturbed."""
    base, out = Path(base), Path(out)
    shutil.copytree(base, out, dirs_exist_ok=True)
    shutil.rmtree(out / "transformer")
    perturb_(load_transformer(class_name, base), seed=seed).save_pretrained(
        out / "transformer", safe_serialization=True)
    return out


def make_single_file(class_name: str, base: str | Path, out_file: str | Path, seed: int = 1,
                     *, prefix: str = "", rename=None) -> Path:
    """A fine-tuned transformer as one file, its keys through ``rename`` (a state-dict map) and
    under ``prefix``; the same transformer is also written as ``<stem>_diffusers/transformer``
    for tests to compare with."""
    from safetensors.torch import save_file

    out_file = Path(out_file)
    folder = make_transformer_folder(class_name, base,
                                     out_file.parent / f"{out_file.stem}_diffusers", seed)
    state = load_transformer(class_name, folder).state_dict()
    if rename is not None:
        state = rename(state)
    save_file({f"{prefix}{k}": v.contiguous() for k, v in state.items()}, str(out_file))
    return out_file


def tiny_latent16_vae(scaling_factor: float, shift_factor: float):
    """A two-block 16-channel ``AutoencoderKL`` (32 px images, 16 x 16 latents) with the
    family's scaling and shift factors; seed torch first."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
                         latent_channels=16,
                         down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                         up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
                         sample_size=32, scaling_factor=scaling_factor,
                         shift_factor=shift_factor, use_quant_conv=False,
                         use_post_quant_conv=False)


def attention_lora_layers(transformer: torch.nn.Module, rank: int,
                          generator: torch.Generator) -> dict[str, torch.Tensor]:
    """A random LoRA of ``transformer``'s attention projections, in peft's naming."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    transformer.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=True,
                                       target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    randomize_lora_b(transformer, generator)
    return get_peft_model_state_dict(transformer)


def make_transformer_lora(pipeline_class: str, transformer_class: str, base: str | Path,
                          out: str | Path, seed: int = 1, rank: int = 4,
                          naming: str = "diffusers", metadata: dict[str, str] | None = None
                          ) -> Path:
    """A LoRA of the base transformer's attention projections: ``naming`` "diffusers" (a
    folder with ``pytorch_lora_weights.safetensors``, ``transformer.*``, as the pipeline's
    ``save_lora_weights`` writes it) or "comfy" (one file, the same layers as
    ``diffusion_model.*``, as ComfyUI / ai-toolkit share them)."""
    import diffusers
    from safetensors.torch import save_file

    layers = attention_lora_layers(load_transformer(transformer_class, base), rank,
                                   torch.Generator().manual_seed(seed))
    out = Path(out)
    if naming == "diffusers":
        getattr(diffusers, pipeline_class).save_lora_weights(
            out, transformer_lora_layers=layers, safe_serialization=True)
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({f"diffusion_model.{k}": v.contiguous() for k, v in layers.items()}, str(out),
              metadata=metadata)
    return out


# --------------------------------------------------------------------------------------------
# Stable Diffusion 3 / 3.5: SD3Transformer2DModel (MMDiT; 3.5 medium = MMDiT-X with dual
# attention in its first blocks and qk RMS norm, 3.5 large = qk RMS norm), CLIP-L + CLIP-G
# (with projection) + T5, a 16-channel VAE with scaling and shift factors.

#: Transformer settings of each SD 3.x layout, on top of the tiny sizes.
SD3_LAYOUTS = {
    "3.5-medium": {"dual_attention_layers": (0,), "qk_norm": "rms_norm"},
    "3.5-large": {"qk_norm": "rms_norm"},
    "3.0": {},
}


def tiny_sd3_transformer(seed: int = 0, layout: str = "3.5-large"):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=16, out_channels=16, num_layers=2,
        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
        caption_projection_dim=16, pooled_projection_dim=24, pos_embed_max_size=16,
        **SD3_LAYOUTS[layout])


def _clip_with_projection(tokenizer, hidden: int, seed: int):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden,
                            intermediate_size=2 * hidden, num_hidden_layers=2,
                            num_attention_heads=2, max_position_embeddings=77,
                            projection_dim=hidden, bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    return CLIPTextModelWithProjection(config).eval()


def make_tiny_sd3(path: str | Path, seed: int = 0, layout: str = "3.5-large",
                  with_t5: bool = True) -> Path:
    """A random ``StableDiffusion3Pipeline`` folder of ``layout``: CLIP-L 8 wide, CLIP-G 16 wide
    (their penultimate states concatenated, 24, are zero-padded to T5's 32), pooled 8 + 16 = 24;
    a two-block VAE, so 32 px images have 16 x 16 latents (8 x 8 patches). ``with_t5=False``
    saves the pipeline without T5, as ``save_pretrained`` writes one loaded with
    ``text_encoder_3=None`` (Stability's documented way to run SD3 without its 4.7B T5)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    path = Path(path)
    transformer = tiny_sd3_transformer(seed, layout)
    torch.manual_seed(seed + 1)
    vae = tiny_latent16_vae(scaling_factor=1.5305, shift_factor=0.0609)
    tokenizer, _ = tiny_tokenizer_and_text_config()
    tokenizer_3, t5 = tiny_t5_tokenizer_and_encoder(seed + 4)
    StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=_clip_with_projection(tokenizer, 8, seed + 2), tokenizer=tokenizer,
        text_encoder_2=_clip_with_projection(tokenizer, 16, seed + 3), tokenizer_2=tokenizer,
        text_encoder_3=t5 if with_t5 else None, tokenizer_3=tokenizer_3 if with_t5 else None,
    ).save_pretrained(path, safe_serialization=True)
    return path


load_sd3_transformer = partial(load_transformer, "SD3Transformer2DModel")
make_sd3_transformer_folder = partial(make_transformer_folder, "SD3Transformer2DModel")


def make_sd3_full_finetune(base: str | Path, out: str | Path, seed: int = 1,
                           clip_seed: int | None = None) -> Path:
    """A copy of the pipeline with its transformer perturbed (and CLIP-L with ``clip_seed``)."""
    from transformers import CLIPTextModelWithProjection

    base, out = Path(base), Path(out)
    make_full_finetune("SD3Transformer2DModel", base, out, seed)
    if clip_seed is not None:
        clip = perturb_(CLIPTextModelWithProjection.from_pretrained(base / "text_encoder"),
                        seed=clip_seed)
        shutil.rmtree(out / "text_encoder")
        clip.save_pretrained(out / "text_encoder", safe_serialization=True)
    return out


def _swap_scale_shift(weight: torch.Tensor) -> torch.Tensor:
    first, second = weight.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def sd3_transformer_to_stability(state: dict[str, torch.Tensor], num_layers: int
                                 ) -> dict[str, torch.Tensor]:
    """A diffusers SD3 transformer state dict in Stability's MMDiT naming (``joint_blocks.N.
    x_block.attn.qkv``...), the inverse of diffusers' ``convert_sd3_transformer_checkpoint_to_
    diffusers``, so that a test can write the single files Stability and Civitai publish."""
    state = dict(state)
    out: dict[str, torch.Tensor] = {}

    def take(source: str, target: str, swap: bool = False) -> None:
        for suffix in (".weight", ".bias"):
            if source + suffix in state:
                tensor = state.pop(source + suffix)
                out[target + suffix] = _swap_scale_shift(tensor) if swap else tensor

    def fuse(sources: list[str], target: str) -> None:
        for suffix in (".weight", ".bias"):
            out[target + suffix] = torch.cat([state.pop(s + suffix) for s in sources])

    out["pos_embed"] = state.pop("pos_embed.pos_embed")
    take("pos_embed.proj", "x_embedder.proj")
    take("time_text_embed.timestep_embedder.linear_1", "t_embedder.mlp.0")
    take("time_text_embed.timestep_embedder.linear_2", "t_embedder.mlp.2")
    take("time_text_embed.text_embedder.linear_1", "y_embedder.mlp.0")
    take("time_text_embed.text_embedder.linear_2", "y_embedder.mlp.2")
    take("context_embedder", "context_embedder")
    for i in range(num_layers):
        d, s = f"transformer_blocks.{i}", f"joint_blocks.{i}"
        last = i == num_layers - 1
        fuse([f"{d}.attn.to_q", f"{d}.attn.to_k", f"{d}.attn.to_v"], f"{s}.x_block.attn.qkv")
        fuse([f"{d}.attn.add_q_proj", f"{d}.attn.add_k_proj", f"{d}.attn.add_v_proj"],
             f"{s}.context_block.attn.qkv")
        for ours, theirs in (("norm_q", "x_block.attn.ln_q"), ("norm_k", "x_block.attn.ln_k"),
                             ("norm_added_q", "context_block.attn.ln_q"),
                             ("norm_added_k", "context_block.attn.ln_k")):
            take(f"{d}.attn.{ours}", f"{s}.{theirs}")
        take(f"{d}.attn.to_out.0", f"{s}.x_block.attn.proj")
        take(f"{d}.attn.to_add_out", f"{s}.context_block.attn.proj")
        if f"{d}.attn2.to_q.weight" in state:
            fuse([f"{d}.attn2.to_q", f"{d}.attn2.to_k", f"{d}.attn2.to_v"],
                 f"{s}.x_block.attn2.qkv")
            take(f"{d}.attn2.norm_q", f"{s}.x_block.attn2.ln_q")
            take(f"{d}.attn2.norm_k", f"{s}.x_block.attn2.ln_k")
            take(f"{d}.attn2.to_out.0", f"{s}.x_block.attn2.proj")
        take(f"{d}.norm1.linear", f"{s}.x_block.adaLN_modulation.1")
        take(f"{d}.norm1_context.linear", f"{s}.context_block.adaLN_modulation.1", swap=last)
        take(f"{d}.ff.net.0.proj", f"{s}.x_block.mlp.fc1")
        take(f"{d}.ff.net.2", f"{s}.x_block.mlp.fc2")
        take(f"{d}.ff_context.net.0.proj", f"{s}.context_block.mlp.fc1")
        take(f"{d}.ff_context.net.2", f"{s}.context_block.mlp.fc2")
    take("proj_out", "final_layer.linear")
    take("norm_out.linear", "final_layer.adaLN_modulation.1", swap=True)
    if state:
        raise ValueError(f"unmapped SD3 transformer tensors: {sorted(state)[:5]}")
    return out


def make_sd3_single_file(base: str | Path, out_file: str | Path, seed: int = 1) -> Path:
    """A fine-tuned transformer as one file in Stability's naming under
    ``model.diffusion_model.`` (as ``sd3.5_large.safetensors`` is published); the same
    transformer is also written as ``<stem>_diffusers/transformer`` for tests to compare with."""
    from safetensors.torch import save_file

    out_file = Path(out_file)
    folder = make_sd3_transformer_folder(base, out_file.parent / f"{out_file.stem}_diffusers",
                                         seed)
    transformer = load_sd3_transformer(folder)
    state = sd3_transformer_to_stability(transformer.state_dict(),
                                         transformer.config.num_layers)
    save_file({f"model.diffusion_model.{k}": v.contiguous() for k, v in state.items()},
              str(out_file))
    return out_file


def make_sd3_lora(base: str | Path, out: str | Path, seed: int = 1, rank: int = 4,
                  with_clip: bool = False, card_prompt: str | None = None) -> Path:
    """A diffusers/peft SD3 LoRA folder as ``train_dreambooth_lora_sd3.py`` saves it: the
    transformer's attention projections and, with ``with_clip``, CLIP-L's (``text_encoder.*``);
    ``card_prompt`` writes the model card the script leaves next to it."""
    from diffusers import StableDiffusion3Pipeline
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict
    from transformers import CLIPTextModelWithProjection

    generator = torch.Generator().manual_seed(seed)
    layers = {"transformer_lora_layers": attention_lora_layers(load_sd3_transformer(base), rank,
                                                                generator)}
    if with_clip:
        clip = CLIPTextModelWithProjection.from_pretrained(Path(base) / "text_encoder")
        # peft directly: transformers' own add_adapter demands a newer peft than diffusers
        inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=True,
                                           target_modules=["q_proj", "k_proj", "v_proj",
                                                           "out_proj"]), clip)
        randomize_lora_b(clip, generator)
        layers["text_encoder_lora_layers"] = {
            (k if k.startswith("text_model.") else "text_model." + k): v
            for k, v in get_peft_model_state_dict(clip).items()}
    StableDiffusion3Pipeline.save_lora_weights(out, safe_serialization=True, **layers)
    if card_prompt is not None:
        (Path(out) / "README.md").write_text(
            "---\nbase_model: stabilityai/stable-diffusion-3.5-medium\ninstance_prompt: "
            f"{card_prompt}\ntags:\n- sd3\n- lora\n---\n# SD3 DreamBooth LoRA\n",
            encoding="utf-8")
    return Path(out)


#: The SD3 transformer layers sd-scripts' ``sd3_train_network.py`` trains (its joint blocks'
#: linears; with ``emb_dims`` the embedders and the final layer), in diffusers' names.
_SD3_KOHYA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj",
                      "add_v_proj", "to_add_out", "ff.net.0.proj", "ff.net.2",
                      "ff_context.net.0.proj", "ff_context.net.2", "norm1.linear",
                      "norm1_context.linear", "norm_out.linear", "proj_out", "context_embedder",
                      "timestep_embedder.linear_1", "text_embedder.linear_2")
#: diffusers' projections that Stability's MMDiT fuses into one ``qkv``: they share one down
#: matrix in a kohya LoRA, so the diffusers LoRA written next to it shares it too.
_SHARED_DOWN = {"to_k": "to_q", "to_v": "to_q", "add_k_proj": "add_q_proj",
                "add_v_proj": "add_q_proj"}


def _stability_names(transformer) -> dict[str, tuple[list[str], bool]]:
    """Stability's module name of each diffusers module -> (the diffusers modules it holds, in
    order; whether its rows are (shift, scale)-swapped), read off the testkit's own
    :func:`sd3_transformer_to_stability` run on tagged tensors (so that the kohya files below do
    not share a name table with the converter they test)."""
    names = list(transformer.state_dict())
    tagged = {k: torch.tensor([[i + 1.0], [-(i + 1.0)]]) for i, k in enumerate(names)}
    out = {}
    for key, tags in sd3_transformer_to_stability(tagged,
                                                  transformer.config.num_layers).items():
        if key.endswith(".weight"):
            members = [names[int(abs(v)) - 1][: -len(".weight")] for v in tags[0::2, 0]]
            out[key[: -len(".weight")]] = (members, bool(tags[0, 0] < 0))
    return out


def make_sd3_kohya_lora(base: str | Path, out: str | Path, seed: int = 1, rank: int = 4,
                        alpha: float = 2.0) -> tuple[Path, Path]:
    """The same random LoRA written twice: as sd-scripts' ``sd3_train_network.py`` saves it
    (one file, ``lora_unet_joint_blocks_*`` / embedder / final-layer layers with fused ``qkv``,
    ``lora_te1_*`` CLIP-L layers, ``lora_down`` / ``lora_up`` / ``alpha``) and as a diffusers
    LoRA folder (``transformer.*``, ``text_encoder.*``). Returns ``(kohya file, diffusers
    folder)``."""
    from diffusers import StableDiffusion3Pipeline
    from safetensors.torch import save_file

    out = Path(out)
    transformer = load_sd3_transformer(base)
    generator = torch.Generator().manual_seed(seed)
    downs, ups, shared_downs = {}, {}, {}
    for name, module in transformer.named_modules():
        leaf = next((t for t in _SD3_KOHYA_TARGETS if name == t or name.endswith("." + t)), None)
        if leaf is None or not isinstance(module, torch.nn.Linear):
            continue
        owner = name[: -len(leaf)] + _SHARED_DOWN.get(leaf, leaf)  # q's down for k and v
        if owner not in shared_downs:
            shared_downs[owner] = torch.randn(rank, module.in_features, generator=generator) * 0.3
        downs[name] = shared_downs[owner].clone()
        ups[name] = torch.randn(module.out_features, rank, generator=generator) * 0.3
    config = json.loads((Path(base) / "text_encoder" / "config.json").read_text())
    width, inner = config["hidden_size"], config["intermediate_size"]
    clip = {"text_model.encoder.layers.0.self_attn.q_proj": (width, width),
            "text_model.encoder.layers.1.mlp.fc1": (inner, width)}
    clip_layers = {}
    for name, (rows, cols) in clip.items():
        clip_layers[name] = (torch.randn(rank, cols, generator=generator) * 0.3,
                             torch.randn(rows, rank, generator=generator) * 0.3)
    StableDiffusion3Pipeline.save_lora_weights(
        out / "diffusers", safe_serialization=True,
        transformer_lora_layers={f"{m}.lora_{ab}.weight": (downs if ab == "A" else ups)[m]
                                 for m in downs for ab in "AB"},
        text_encoder_lora_layers={f"{m}.lora_{ab}.weight": w for m, (a, b) in clip_layers.items()
                                  for ab, w in (("A", a), ("B", b))})
    kohya: dict[str, torch.Tensor] = {}

    def put(name: str, down: torch.Tensor, up: torch.Tensor) -> None:
        kohya[f"{name}.lora_down.weight"] = (down * rank / alpha).contiguous()
        kohya[f"{name}.lora_up.weight"] = up.contiguous()
        kohya[f"{name}.alpha"] = torch.tensor(alpha)

    written: list[str] = []
    for stability, (members, swapped) in _stability_names(transformer).items():
        if members[0] in downs:
            up = torch.cat([ups[m] for m in members])
            put("lora_unet_" + stability.replace(".", "_"), downs[members[0]],
                _swap_scale_shift(up) if swapped else up)
            written += members
    for name, (down, up) in clip_layers.items():
        put("lora_te1_" + name.replace(".", "_"), down, up)
    if sorted(written) != sorted(downs):
        raise AssertionError(f"LoRA layers without a Stability name: {set(downs) - set(written)}")
    save_file(kohya, str(out / "sd3_kohya_lora.safetensors"),
              metadata={"ss_base_model_version": "sd3", "ss_network_module": "networks.lora_sd3",
                        "ss_network_dim": str(rank), "ss_network_alpha": str(alpha)})
    return out / "sd3_kohya_lora.safetensors", out / "diffusers"


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data), encoding="utf-8")


# --------------------------------------------------------------------------------------------
# SDXL v-prediction with zero terminal SNR (NoobAI-XL v-pred's scheduler settings)


def make_tiny_sdxl_vpred(path: str | Path, seed: int = 0, zero_terminal_snr: bool = True) -> Path:
    """A random SDXL pipeline folder whose scheduler says ``v_prediction`` and (by default)
    ``rescale_betas_zero_snr`` with trailing timesteps, as v-pred SDXL models are published."""
    from cgidm_testkit.tinymodels import make_tiny_sdxl

    path = make_tiny_sdxl(path, seed=seed, prediction_type="v_prediction")
    config_file = path / "scheduler" / "scheduler_config.json"
    config = json.loads(config_file.read_text())
    config.update(rescale_betas_zero_snr=zero_terminal_snr, timestep_spacing="trailing")
    write_json(config_file, config)
    return path


def add_tensors(file: Path, extra: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
                ) -> Path:
    """Rewrite a safetensors file with ``extra`` tensors (and header metadata) added, as v-pred
    checkpoints carry their empty ``v_pred`` / ``ztsnr`` marker tensors."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(file))
    save_file({**tensors, **extra}, str(file), metadata=metadata)
    return file


# --------------------------------------------------------------------------------------------
# Chroma: ChromaTransformer2DModel (Flux.1's blocks, modulated by a small "distilled guidance"
# MLP of the timestep) over packed 2x2 patches of a 16-channel latent; T5 alone


def tiny_chroma_transformer(seed: int = 0):
    from diffusers import ChromaTransformer2DModel

    torch.manual_seed(seed)
    return ChromaTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(4, 6, 6),
        approximator_num_channels=8, approximator_hidden_dim=32, approximator_layers=1)


def make_tiny_chroma(path: str | Path, seed: int = 0) -> Path:
    """A random ``ChromaPipeline`` folder: 32 px images, 16 x 16 latents (8 x 8 tokens), T5 32
    wide, Chroma1-HD's scheduler settings (dynamic shift, base 0.5 at 256 tokens, max 1.15)."""
    from diffusers import ChromaPipeline, FlowMatchEulerDiscreteScheduler

    path = Path(path)
    transformer = tiny_chroma_transformer(seed)
    torch.manual_seed(seed + 1)
    vae = tiny_latent16_vae(scaling_factor=0.3611, shift_factor=0.1159)
    tokenizer, t5 = tiny_t5_tokenizer_and_encoder(seed + 2)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True,
                                                base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    ChromaPipeline(scheduler=scheduler, vae=vae, text_encoder=t5, tokenizer=tokenizer,
                   transformer=transformer).save_pretrained(path, safe_serialization=True)
    return path


load_chroma_transformer = partial(load_transformer, "ChromaTransformer2DModel")
make_chroma_transformer_folder = partial(make_transformer_folder, "ChromaTransformer2DModel")
make_chroma_full_finetune = partial(make_full_finetune, "ChromaTransformer2DModel")


def make_chroma_single_file(base: str | Path, out_file: str | Path, seed: int = 1) -> Path:
    """A fine-tuned transformer as one file in diffusers naming (diffusers' converter for
    lodestones' BFL naming hard-codes Chroma's width of 3072, so a tiny one cannot be written in
    it); also written as ``<stem>_diffusers/transformer``."""
    return make_single_file("ChromaTransformer2DModel", base, out_file, seed)


def make_chroma_lora(base: str | Path, out: str | Path, seed: int = 1, rank: int = 4) -> Path:
    """A diffusers/peft Chroma LoRA folder (attention projections of every block)."""
    return make_transformer_lora("ChromaPipeline", "ChromaTransformer2DModel", base, out, seed,
                                 rank)


# --------------------------------------------------------------------------------------------
# Z-Image: ZImageTransformer2DModel (single-stream S3-DiT, NextDiT layout) on a 16-channel
# latent, conditioned on a Qwen3 encoder's second-to-last hidden states of a chat-templated prompt

#: A Qwen-style chat template (user turn, assistant generation prompt; the thinking switch is
#: accepted as Qwen3's template accepts it). What matters for the tests is that the pipeline and
#: the pair apply the SAME template, which they read from the tokenizer.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n"
    "{% endif %}{% endif %}"
)


def write_tiny_chat_tokenizer(folder: str | Path, model_max_length: int = 512) -> Path:
    """A working Qwen-style tokenizer (``tokenizer.json`` built with the ``tokenizers`` library:
    a character-level Unigram model with Qwen's special tokens, ``<|endoftext|>`` as padding) and
    a chat template; no downloaded vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"]
    pieces = ["▁", "\n"] + [chr(c) for c in range(ord("a"), ord("z") + 1)]
    pieces += list("0123456789,.'-<>/|") + ["▁sks", "▁style", "▁a", "▁painting", "user",
                                            "assistant", "think"]
    vocab = [(token, 0.0) for token in specials] + [(p, -float(len(pieces) - i) / 10)
                                                    for i, p in enumerate(pieces)]
    tokenizer = Tokenizer(models.Unigram(vocab, unk_id=3))
    tokenizer.add_special_tokens(specials[:3])
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁")
    tokenizer.decoder = decoders.Metaspace(replacement="▁")
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": model_max_length,
              "pad_token": "<|endoftext|>", "eos_token": "<|im_end|>", "unk_token": "<unk>",
              "padding_side": "right", "chat_template": CHAT_TEMPLATE}
    write_json(folder / "tokenizer_config.json", config)
    return folder


def tiny_qwen3_tokenizer_and_encoder(seed: int, hidden: int = 32):
    import tempfile

    from transformers import AutoTokenizer, Qwen3Config, Qwen3Model

    folder = Path(tempfile.mkdtemp(prefix="cgidm-qwentok-"))
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(write_tiny_chat_tokenizer(folder)))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    config = Qwen3Config(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=8, max_position_embeddings=1024,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    return tokenizer, Qwen3Model(config).eval()


def tiny_zimage_transformer(seed: int = 0):
    from diffusers import ZImageTransformer2DModel

    torch.manual_seed(seed)
    return ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=32, n_layers=2,
        n_refiner_layers=1, n_heads=2, n_kv_heads=2, qk_norm=True, cap_feat_dim=32,
        axes_dims=[4, 6, 6], axes_lens=[1024, 32, 32])


def make_tiny_zimage(path: str | Path, seed: int = 0) -> Path:
    """A random ``ZImagePipeline`` folder: 32 px images, 16 x 16 latents (8 x 8 patches), a
    Qwen3 encoder 32 wide, Z-Image-Turbo's scheduler (fixed shift 3.0)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline

    path = Path(path)
    transformer = tiny_zimage_transformer(seed)
    torch.manual_seed(seed + 1)
    vae = tiny_latent16_vae(scaling_factor=0.3611, shift_factor=0.1159)
    tokenizer, encoder = tiny_qwen3_tokenizer_and_encoder(seed + 2)
    ZImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
                   text_encoder=encoder, tokenizer=tokenizer,
                   transformer=transformer).save_pretrained(path, safe_serialization=True)
    return path


load_zimage_transformer = partial(load_transformer, "ZImageTransformer2DModel")
make_zimage_transformer_folder = partial(make_transformer_folder, "ZImageTransformer2DModel")
make_zimage_full_finetune = partial(make_full_finetune, "ZImageTransformer2DModel")


def zimage_state_to_comfy(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers' Z-Image names -> the single-file (ComfyUI) names diffusers converts back:
    fused ``attention.qkv``, ``attention.out``, ``q_norm``/``k_norm``, ``x_embedder.`` and
    ``final_layer.`` for patch 2."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if ".attention.to_k." in key or ".attention.to_v." in key:
            continue
        if ".attention.to_q.weight" in key:
            stem = key[: -len(".attention.to_q.weight")]
            out[f"{stem}.attention.qkv.weight"] = torch.cat(
                [state[f"{stem}.attention.{n}.weight"] for n in ("to_q", "to_k", "to_v")])
            continue
        new = (key.replace("all_final_layer.2-1.", "final_layer.")
               .replace("all_x_embedder.2-1.", "x_embedder.")
               .replace(".attention.to_out.0.", ".attention.out.")
               .replace(".attention.norm_k.", ".attention.k_norm.")
               .replace(".attention.norm_q.", ".attention.q_norm."))
        out[new] = value
    return out


def make_zimage_single_file(base: str | Path, out_file: str | Path, seed: int = 1) -> Path:
    """A fine-tuned transformer as one file in ComfyUI's naming under
    ``model.diffusion_model.`` (how Z-Image checkpoints circulate); also written as
    ``<stem>_diffusers/transformer``."""
    return make_single_file("ZImageTransformer2DModel", base, out_file, seed,
                            prefix="model.diffusion_model.", rename=zimage_state_to_comfy)


def make_zimage_lora(base: str | Path, out: str | Path, seed: int = 1, rank: int = 4,
                     naming: str = "diffusers", metadata: dict[str, str] | None = None) -> Path:
    """A Z-Image LoRA (:func:`make_transformer_lora`)."""
    return make_transformer_lora("ZImagePipeline", "ZImageTransformer2DModel", base, out, seed,
                                 rank, naming, metadata)


# --------------------------------------------------------------------------------------------
# Qwen-Image: QwenImageTransformer2DModel (MMDiT) over packed 2x2 patches of the per-channel
# normalised latent of AutoencoderKLQwenImage (3-D, one frame); Qwen2.5-VL's language model


def tiny_qwen_vl(tokenizer, seed: int, hidden: int = 32):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    config = Qwen2_5_VLConfig(
        text_config={"vocab_size": len(tokenizer), "hidden_size": hidden,
                     "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                     "num_key_value_heads": 2, "max_position_embeddings": 1024,
                     "bos_token_id": tokenizer.pad_token_id,
                     "eos_token_id": tokenizer.eos_token_id,
                     "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                         "mrope_section": [1, 1, 2]}},
        vision_config={"depth": 1, "hidden_size": 16, "intermediate_size": 32, "num_heads": 2,
                       "out_hidden_size": hidden, "in_chans": 3, "patch_size": 14,
                       "spatial_merge_size": 2, "temporal_patch_size": 2,
                       "fullatt_block_indexes": [0], "window_size": 28},
        pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def make_tiny_qwen_image(path: str | Path, seed: int = 0) -> Path:
    """A random ``QwenImagePipeline`` folder: a 2-level Qwen VAE (factor 4; 32 px images have
    16 x 8 x 8 latents, 4 x 4 tokens), Qwen2.5-VL 32 wide, Qwen-Image's scheduler settings
    (dynamic shift, base 0.5 at 256 tokens, max 0.9 at 8192)."""
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )

    path = Path(path)
    torch.manual_seed(seed)
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=64, out_channels=16, num_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(4, 6, 6))
    torch.manual_seed(seed + 1)
    generator = torch.Generator().manual_seed(seed + 1)
    vae = AutoencoderKLQwenImage(
        base_dim=16, z_dim=16, dim_mult=[1, 2, 2], num_res_blocks=1,
        temperal_downsample=[False, True],
        latents_mean=(torch.randn(16, generator=generator) * 0.3).tolist(),
        latents_std=(torch.rand(16, generator=generator) + 0.5).tolist())
    import tempfile

    from transformers import AutoTokenizer

    folder = Path(tempfile.mkdtemp(prefix="cgidm-qwentok-"))
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(write_tiny_chat_tokenizer(folder)))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9,
        base_image_seq_len=256, max_image_seq_len=8192, time_shift_type="exponential")
    QwenImagePipeline(scheduler=scheduler, vae=vae, text_encoder=tiny_qwen_vl(tokenizer, seed + 2),
                      tokenizer=tokenizer, transformer=transformer).save_pretrained(
        path, safe_serialization=True)
    return path


load_qwen_image_transformer = partial(load_transformer, "QwenImageTransformer2DModel")
make_qwen_image_transformer_folder = partial(make_transformer_folder,
                                             "QwenImageTransformer2DModel")


def make_qwen_image_single_file(base: str | Path, out_file: str | Path, seed: int = 1) -> Path:
    """A fine-tuned transformer as one file under ``model.diffusion_model.`` (also written as
    ``<stem>_diffusers/transformer``)."""
    return make_single_file("QwenImageTransformer2DModel", base, out_file, seed,
                            prefix="model.diffusion_model.")


def make_qwen_image_lora(base: str | Path, out: str | Path, seed: int = 1, rank: int = 4,
                         naming: str = "diffusers") -> Path:
    """A Qwen-Image LoRA (:func:`make_transformer_lora`), "diffusers" or "comfy" naming."""
    return make_transformer_lora("QwenImagePipeline", "QwenImageTransformer2DModel", base, out,
                                 seed, rank, naming)


# --------------------------------------------------------------------------------------------
# Flux.2 Klein: Flux2Transformer2DModel over the VAE latent patchified 2x2 and normalised by the
# VAE's batch-norm statistics; Qwen3 hidden states of layers 9, 18, 27 stacked


def make_tiny_flux2_klein(path: str | Path, seed: int = 0) -> Path:
    """A random ``Flux2KleinPipeline`` folder: a two-block ``AutoencoderKLFlux2`` with 4 latent
    channels (16 after patchifying; 32 px images have 16 x 8 x 8 latents, 64 tokens) whose
    batch-norm statistics are set to non-trivial values, a Qwen3 of 28 layers 16 wide (layers
    9, 18, 27 stacked: 48-dim text features), FLUX.2's dynamic-shift scheduler settings."""
    import tempfile

    from diffusers import (
        AutoencoderKLFlux2,
        FlowMatchEulerDiscreteScheduler,
        Flux2KleinPipeline,
        Flux2Transformer2DModel,
    )
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    path = Path(path)
    torch.manual_seed(seed)
    transformer = Flux2Transformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=48, timestep_guidance_channels=32,
        axes_dims_rope=(4, 4, 4, 4), guidance_embeds=False)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKLFlux2(
        block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4,
        norm_num_groups=4, sample_size=32)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        vae.bn.running_mean.copy_(torch.randn(16, generator=generator) * 0.3)
        vae.bn.running_var.copy_(torch.rand(16, generator=generator) + 0.5)
    folder = Path(tempfile.mkdtemp(prefix="cgidm-qwentok-"))
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(write_tiny_chat_tokenizer(folder)))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    config = Qwen3Config(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                         num_hidden_layers=28, num_attention_heads=2, num_key_value_heads=1,
                         head_dim=8, max_position_embeddings=1024,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed + 2)
    encoder = Qwen3ForCausalLM(config).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096, time_shift_type="exponential")
    Flux2KleinPipeline(scheduler=scheduler, vae=vae, text_encoder=encoder, tokenizer=tokenizer,
                       transformer=transformer).save_pretrained(path, safe_serialization=True)
    return path


load_flux2_transformer = partial(load_transformer, "Flux2Transformer2DModel")
make_flux2_transformer_folder = partial(make_transformer_folder, "Flux2Transformer2DModel")


def make_flux2_lora(base: str | Path, out: str | Path, seed: int = 1, rank: int = 4) -> Path:
    """A diffusers/peft Flux.2 LoRA folder (attention projections)."""
    return make_transformer_lora("Flux2KleinPipeline", "Flux2Transformer2DModel", base, out,
                                 seed, rank)


# --------------------------------------------------------------------------------------------
# Flux.2 dev: the Klein transformer with a guidance embedding, conditioned by Mistral-Small-3.x
# (Mistral3ForConditionalGeneration; hidden states of layers 10, 20, 30 stacked) whose tokenizer
# folder is a Pixtral PROCESSOR folder (processor_config.json, preprocessor_config.json and the
# chat template next to the tokenizer files). The pipeline formats the prompt as a system
# message and a user message with list-of-chunks content.

#: A Mistral-style chat template (``[SYSTEM_PROMPT]...[/SYSTEM_PROMPT][INST]...[/INST]`` after
#: the BOS, content given as a list of text chunks or a string), the shape of Mistral-Small-3.x's.
MISTRAL_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['content'] is string %}{% set text = message['content'] %}"
    "{% else %}{% set text = message['content'] | selectattr('type', 'equalto', 'text') "
    "| map(attribute='text') | join('') %}{% endif %}"
    "{% if message['role'] == 'system' %}[SYSTEM_PROMPT]{{ text }}[/SYSTEM_PROMPT]"
    "{% elif message['role'] == 'user' %}[INST]{{ text }}[/INST]"
    "{% else %}{{ text }}{{ eos_token }}{% endif %}{% endfor %}"
)
_MISTRAL_SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]",
                     "[/SYSTEM_PROMPT]", "[IMG]", "[IMG_BREAK]", "[IMG_END]"]


def write_tiny_pixtral_tokenizer_folder(folder: str | Path) -> Path:
    """A ``tokenizer/`` folder shaped like FLUX.2-dev's: a ``tokenizers``-built byte-level BPE
    tokenizer with Mistral's special tokens (``<s>`` as BOS, ``<pad>`` padding on the left, as
    Mistral's config says), the chat template as ``chat_template.jinja``, and the Pixtral
    processor's own configs (which transformers reads only with torchvision)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {token: i for i, token in enumerate(_MISTRAL_SPECIALS)}
    for char in sorted(alphabet):
        vocab.setdefault(char, len(vocab))
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tokenizer.add_special_tokens(_MISTRAL_SPECIALS)
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.save(str(folder / "tokenizer.json"))
    write_json(folder / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "pad_token": "<pad>", "padding_side": "left",
        "model_max_length": 131072, "processor_class": "PixtralProcessor"})
    (folder / "chat_template.jinja").write_text(MISTRAL_CHAT_TEMPLATE, encoding="utf-8")
    write_json(folder / "processor_config.json", {
        "processor_class": "PixtralProcessor", "patch_size": 14, "spatial_merge_size": 2,
        "image_token": "[IMG]", "image_break_token": "[IMG_BREAK]",
        "image_end_token": "[IMG_END]"})
    write_json(folder / "preprocessor_config.json", {
        "image_processor_type": "PixtralImageProcessor", "processor_class": "PixtralProcessor",
        "patch_size": {"height": 14, "width": 14}, "size": {"longest_edge": 1540}})
    return folder


def tiny_flux2_transformer(seed: int, guidance_embeds: bool):
    from diffusers import Flux2Transformer2DModel

    torch.manual_seed(seed)
    return Flux2Transformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=48, timestep_guidance_channels=32,
        axes_dims_rope=(4, 4, 4, 4), guidance_embeds=guidance_embeds)


def tiny_mistral3(vocab_size: int, pad_token_id: int, seed: int):
    """A Mistral3ForConditionalGeneration with a 31-layer, 16-wide Mistral language model
    (layers 10, 20, 30 stacked: 48-dim text features) and a one-layer Pixtral vision tower."""
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    config = Mistral3Config(
        text_config={"model_type": "mistral", "vocab_size": vocab_size, "hidden_size": 16,
                     "intermediate_size": 32, "num_hidden_layers": 31,
                     "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 8,
                     "max_position_embeddings": 1024, "pad_token_id": pad_token_id},
        vision_config={"model_type": "pixtral", "hidden_size": 16, "intermediate_size": 32,
                       "num_hidden_layers": 1, "num_attention_heads": 2, "head_dim": 8,
                       "image_size": 28, "patch_size": 14},
        image_token_index=_MISTRAL_SPECIALS.index("[IMG]"), spatial_merge_size=2)
    torch.manual_seed(seed)
    return Mistral3ForConditionalGeneration(config).eval()


def make_tiny_flux2_dev(path: str | Path, seed: int = 0) -> Path:
    """A random ``Flux2Pipeline`` folder as FLUX.2-dev is laid out: Klein's tiny transformer
    and VAE (:func:`make_tiny_flux2_klein`) with a guidance embedding, a tiny Mistral-3 encoder,
    a Pixtral processor folder as ``tokenizer/`` (``model_index.json`` says
    ``PixtralProcessor``), FLUX.2's dynamic-shift scheduler. Saved through a Klein pipeline
    (whose tokenizer slot takes a plain tokenizer) and the index rewritten, since the processor
    cannot be built without torchvision."""
    import tempfile

    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline
    from transformers import PreTrainedTokenizerFast

    path = Path(path)
    transformer = tiny_flux2_transformer(seed, guidance_embeds=True)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKLFlux2(
        block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4,
        norm_num_groups=4, sample_size=32)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        vae.bn.running_mean.copy_(torch.randn(16, generator=generator) * 0.3)
        vae.bn.running_var.copy_(torch.rand(16, generator=generator) + 0.5)
    scratch = Path(tempfile.mkdtemp(prefix="cgidm-mistraltok-"))
    try:
        tokenizer = PreTrainedTokenizerFast.from_pretrained(
            str(write_tiny_pixtral_tokenizer_folder(scratch)))
        encoder = tiny_mistral3(len(tokenizer), tokenizer.pad_token_id, seed + 2)
        scheduler = FlowMatchEulerDiscreteScheduler(
            shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
            base_image_seq_len=256, max_image_seq_len=4096, time_shift_type="exponential")
        Flux2KleinPipeline(scheduler=scheduler, vae=vae, text_encoder=encoder,
                           tokenizer=tokenizer, transformer=transformer
                           ).save_pretrained(path, safe_serialization=True)
        shutil.rmtree(path / "tokenizer")
        shutil.copytree(scratch, path / "tokenizer")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    index = json.loads((path / "model_index.json").read_text())
    index.update({"_class_name": "Flux2Pipeline", "tokenizer": ["transformers", "PixtralProcessor"],
                  "text_encoder": ["transformers", "Mistral3ForConditionalGeneration"]})
    index.pop("is_distilled", None)
    write_json(path / "model_index.json", index)
    return path


def make_flux2_dev_lora(base: str | Path, out: str | Path, seed: int = 1, rank: int = 4) -> Path:
    """A diffusers/peft Flux.2 dev LoRA folder (attention projections), as
    ``train_dreambooth_lora_flux2.py`` saves it."""
    return make_transformer_lora("Flux2Pipeline", "Flux2Transformer2DModel", base, out, seed,
                                 rank)


#: diffusers -> BFL names of Flux.2's non-block tensors (the inverse of diffusers'
#: ``convert_flux2_transformer_checkpoint_to_diffusers`` rename table).
_FLUX2_TO_BFL = {
    "x_embedder": "img_in", "context_embedder": "txt_in",
    "time_guidance_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_guidance_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_guidance_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_guidance_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "double_stream_modulation_img.linear": "double_stream_modulation_img.lin",
    "double_stream_modulation_txt.linear": "double_stream_modulation_txt.lin",
    "single_stream_modulation.linear": "single_stream_modulation.lin",
    "proj_out": "final_layer.linear",
}
_FLUX2_DOUBLE_TO_BFL = {
    "attn.norm_q": "img_attn.norm.query_norm", "attn.norm_k": "img_attn.norm.key_norm",
    "attn.to_out.0": "img_attn.proj", "ff.linear_in": "img_mlp.0", "ff.linear_out": "img_mlp.2",
    "attn.norm_added_q": "txt_attn.norm.query_norm",
    "attn.norm_added_k": "txt_attn.norm.key_norm", "attn.to_add_out": "txt_attn.proj",
    "ff_context.linear_in": "txt_mlp.0", "ff_context.linear_out": "txt_mlp.2",
}
_FLUX2_SINGLE_TO_BFL = {"attn.to_qkv_mlp_proj": "linear1", "attn.to_out": "linear2",
                        "attn.norm_q": "norm.query_norm", "attn.norm_k": "norm.key_norm"}


def flux2_transformer_to_bfl(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers Flux.2 transformer state dict in Black Forest Labs' naming (as
    ``flux2-dev.safetensors`` is published): fused ``qkv``, ``*.scale`` norms, the final
    modulation's (shift, scale) order."""
    state, out = dict(state), {}

    def bfl_param(name: str, param: str) -> str:
        return "scale" if name.endswith(("query_norm", "key_norm")) else param

    for key in sorted(state):
        if key not in state:
            continue
        module, param = key.rsplit(".", 1)
        parts = module.split(".")
        if parts[0] == "transformer_blocks":
            block, inner = parts[1], ".".join(parts[2:])
            fused = {"attn.to_q": "img_attn.qkv", "attn.add_q_proj": "txt_attn.qkv"}
            if inner in fused:
                names = (["attn.to_q", "attn.to_k", "attn.to_v"] if inner == "attn.to_q" else
                         ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"])
                out[f"double_blocks.{block}.{fused[inner]}.{param}"] = torch.cat(
                    [state.pop(f"transformer_blocks.{block}.{n}.{param}") for n in names])
            elif inner in _FLUX2_DOUBLE_TO_BFL:
                target = _FLUX2_DOUBLE_TO_BFL[inner]
                out[f"double_blocks.{block}.{target}.{bfl_param(target, param)}"] = state.pop(key)
        elif parts[0] == "single_transformer_blocks":
            target = _FLUX2_SINGLE_TO_BFL[".".join(parts[2:])]
            out[f"single_blocks.{parts[1]}.{target}.{bfl_param(target, param)}"] = state.pop(key)
        elif module == "norm_out.linear":
            out[f"final_layer.adaLN_modulation.1.{param}"] = _swap_scale_shift(state.pop(key))
        elif module in _FLUX2_TO_BFL:
            out[f"{_FLUX2_TO_BFL[module]}.{param}"] = state.pop(key)
    if state:
        raise ValueError(f"unmapped Flux.2 transformer tensors: {sorted(state)[:5]}")
    return out


def make_flux2_dev_single_file(base: str | Path, out_file: str | Path, seed: int = 1) -> Path:
    """A fine-tuned Flux.2 dev transformer as one file in BFL's naming; the same transformer is
    also written as ``<stem>_diffusers/transformer``."""
    return make_single_file("Flux2Transformer2DModel", base, out_file, seed,
                            rename=flux2_transformer_to_bfl)


def make_flux2_klein_single_file(base: str | Path, out_file: str | Path, seed: int = 1,
                                 prefix: str = "") -> Path:
    """A fine-tuned Flux.2 Klein transformer as one file in BFL's naming, as
    ``flux-2-klein-4b.safetensors`` is published (no ``guidance_in.*``), under ``prefix``
    (ComfyUI's checkpoint savers write ``model.diffusion_model.``); the same transformer is also
    written as ``<stem>_diffusers/transformer``."""
    return make_single_file("Flux2Transformer2DModel", base, out_file, seed, prefix=prefix,
                            rename=flux2_transformer_to_bfl)


def make_flux2_lora_pair(pipeline_class: str, base: str | Path, out: str | Path, seed: int = 1,
                         rank: int = 4) -> tuple[Path, Path]:
    """The same random Flux.2 attention LoRA written twice: as ai-toolkit shares it (one file,
    BFL names under ``diffusion_model.``: ``double_blocks.N.img_attn.qkv`` with ONE down matrix
    for q, k and v, ``img_attn.proj``, ``lora_A`` / ``lora_B``) and as a diffusers LoRA folder
    (``transformer.*``; its q, k and v share that down matrix); also as musubi-tuner /
    sd-scripts name it, ``kohya.safetensors`` next to them (``lora_unet_double_blocks_*``,
    ``lora_down`` / ``lora_up`` / ``alpha``). Returns ``(ai-toolkit file, diffusers folder)``."""
    import diffusers
    from safetensors.torch import save_file

    out = Path(out)
    layers = attention_lora_layers(load_transformer("Flux2Transformer2DModel", base), rank,
                                   torch.Generator().manual_seed(seed))
    toolkit: dict[str, torch.Tensor] = {}
    blocks = sorted({int(k.split(".")[1]) for k in layers if k.startswith("transformer_blocks.")})
    for i in blocks:
        d = f"transformer_blocks.{i}.attn"
        for name in ("to_k", "to_v"):  # one down matrix for the fused qkv
            layers[f"{d}.{name}.lora_A.weight"] = layers[f"{d}.to_q.lora_A.weight"].clone()
        b = f"diffusion_model.double_blocks.{i}.img_attn"
        toolkit[f"{b}.qkv.lora_A.weight"] = layers[f"{d}.to_q.lora_A.weight"].clone()
        toolkit[f"{b}.qkv.lora_B.weight"] = torch.cat(
            [layers[f"{d}.{n}.lora_B.weight"] for n in ("to_q", "to_k", "to_v")])
        toolkit[f"{b}.proj.lora_A.weight"] = layers[f"{d}.to_out.0.lora_A.weight"].clone()
        toolkit[f"{b}.proj.lora_B.weight"] = layers[f"{d}.to_out.0.lora_B.weight"].clone()
    getattr(diffusers, pipeline_class).save_lora_weights(
        out / "diffusers", transformer_lora_layers=layers, safe_serialization=True)
    save_file({k: v.contiguous() for k, v in toolkit.items()}, str(out / "ai_toolkit.safetensors"))
    kohya, alpha = {}, rank / 2  # musubi-tuner / sd-scripts: lora_down/lora_up/alpha names
    for key, tensor in toolkit.items():
        module, ab = key[len("diffusion_model."):].rsplit(".lora_", 1)
        name = "lora_unet_" + module.replace(".", "_")
        if ab == "A.weight":
            kohya[f"{name}.lora_down.weight"] = (tensor * rank / alpha).contiguous()
            kohya[f"{name}.alpha"] = torch.tensor(alpha)
        else:
            kohya[f"{name}.lora_up.weight"] = tensor.contiguous()
    save_file(kohya, str(out / "kohya.safetensors"))
    return out / "ai_toolkit.safetensors", out / "diffusers"
