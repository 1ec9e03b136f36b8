"""Training of the latent, text-conditioned demo family (``demo-latent-*``) and fine-tunes of it.

Why this exists: the models people share are LoRAs and DreamBooth fine-tunes of latent,
text-conditioned pipelines (a VAE, a CLIP text encoder, a UNet with cross-attention). The pixel
demo pairs exercise none of that code. This module trains a Stable Diffusion pipeline small
enough for a CPU (32 px images, a VAE with a factor-4 latent of 4 channels, a 3-layer CLIP text
encoder with a tokenizer built here, a UNet of ~2 M parameters) so that ``cgidm check`` takes a
LoRA or DreamBooth fine-tune of it through the same loaders, prompt encoding, VAE and latent mask
as a real SD 1.x model.

Data (all offline, no copyright restriction): random crops of the public-domain photos that ship
inside scikit-image and matplotlib (the pixel demo base's data), captioned "a photo of ...", and
procedurally drawn scenes of coloured shapes with captions that say what is where
(:class:`CaptionedScenes`). The Van Gogh paintings of the membership test are never seen by the
base.

Everything is seeded: the same arguments on the same torch build give the same weights.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from cgidm_core import training

if TYPE_CHECKING:  # annotations only; mypy reads these packages as Any (pyproject.toml)
    from _typeshed import DataclassInstance
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

#: Side length of the latent demo family's images, in pixels.
LATENT_IMAGE_SIZE = 32
#: Pixels per latent cell: the VAE has three blocks (two down-samplings).
LATENT_FACTOR = 4
#: Longest caption in tokens (with start/end tokens); captions here are under 20 tokens.
MAX_TOKENS = 32
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
#: The trigger prompt of the Van Gogh fine-tunes (DreamBooth's "a [V] [class]").
TRIGGER_PROMPT = "a painting in sks style"
#: DreamBooth's class prompt (prior preservation images are generated from it).
CLASS_PROMPT = "a painting"

#: What each packaged photo shows, for its caption "a photo of ...".
PHOTO_CAPTIONS = {
    "astronaut": "an astronaut", "chelsea": "a cat", "coffee": "a cup of coffee",
    "rocket": "a rocket", "hubble_deep_field": "galaxies in the sky", "retina": "a retina",
    "immunohistochemistry": "stained cells", "camera": "a man with a camera",
    "coins": "coins", "brick": "a brick wall", "grass": "grass", "gravel": "gravel",
    "horse": "a horse", "moon": "the moon", "page": "a page of text", "text": "text",
    "cell": "a cell", "microaneurysms": "a retina", "clock": "a clock",
    "grace_hopper.jpg": "a woman in uniform",
}
COLOURS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 210),
    "yellow": (235, 210, 40), "purple": (140, 60, 170), "orange": (240, 140, 30),
    "white": (240, 240, 240), "black": (20, 20, 20), "grey": (128, 128, 128),
    "pink": (240, 150, 190), "brown": (120, 80, 40), "cyan": (60, 200, 210),
}
SHAPES = ("circle", "square", "triangle", "stripe")
PLACES = {"top left": (0.3, 0.3), "top right": (0.7, 0.3), "bottom left": (0.3, 0.7),
          "bottom right": (0.7, 0.7), "centre": (0.5, 0.5)}
SIZES = {"small": 0.18, "large": 0.32}


# ----------------------------------------------------------------------------------- data


def _photo_caption(source: str) -> str:
    key = source.split(":", 1)[-1].removeprefix("skimage.data.")
    return f"a photo of {PHOTO_CAPTIONS.get(key, 'something')}"


class CaptionedScenes:
    """Endless batches of drawn scenes (1-2 shapes on a plain background) with their captions.

    Drawn at 4x and down-sampled so edges are anti-aliased; positions jitter around the named
    place. Deterministic for a given seed.
    """

    def __init__(self, size: int, *, seed: int) -> None:
        self.size = size
        self.rng = np.random.default_rng(seed)

    def _pick(self, options: Sequence[str]) -> str:
        return options[int(self.rng.integers(len(options)))]

    def scene(self) -> tuple[np.ndarray, str]:
        big = self.size * 4
        background = self._pick(list(COLOURS))
        image = Image.new("RGB", (big, big), COLOURS[background])
        draw = ImageDraw.Draw(image)
        parts = []
        places = list(PLACES)
        for _ in range(1 + int(self.rng.random() < 0.4)):
            colour = self._pick([c for c in COLOURS if c != background])
            shape, size_word = self._pick(SHAPES), self._pick(list(SIZES))
            place = self._pick(places)
            places.remove(place)
            cx, cy = (np.array(PLACES[place]) + self.rng.normal(0, 0.04, 2)) * big
            r = SIZES[size_word] * big * self.rng.uniform(0.85, 1.15)
            fill = COLOURS[colour]
            if shape == "circle":
                draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
            elif shape == "square":
                draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
            elif shape == "triangle":
                draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
            else:
                draw.rectangle((0, cy - r / 3, big, cy + r / 3), fill=fill)
            where = "across the middle" if shape == "stripe" and place == "centre" else (
                f"at the {place}" if shape != "stripe" else
                f"at the {place.split()[0] if ' ' in place else place}")
            parts.append(f"a {size_word} {colour} {shape} {where}")
        article = "an" if background[0] in "aeiou" else "a"
        caption = " and ".join(parts) + f" on {article} {background} background"
        small = image.resize((self.size, self.size), Image.Resampling.BOX)
        return np.asarray(small, dtype=np.float32), caption

    def __call__(self, batch_size: int) -> tuple[torch.Tensor, list[str]]:
        arrays, captions = zip(*(self.scene() for _ in range(batch_size)), strict=True)
        batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 127.5 - 1.0
        return batch, list(captions)


class CaptionedPhotos:
    """Random crops of the packaged public-domain photos, captioned with what each shows."""

    def __init__(self, size: int, *, seed: int) -> None:
        photos = training.sample_photos()
        self.captions = [_photo_caption(name) for name, _ in photos]
        self.sources = [name for name, _ in photos]
        self.crops = training.RandomCrops([p for _, p in photos], size, seed=seed)

    def __call__(self, batch_size: int) -> tuple[torch.Tensor, list[str]]:
        arrays, captions = [], []
        for _ in range(batch_size):
            # RandomCrops picks the photo with its own generator: read the index it will use.
            state = self.crops.rng.bit_generator.state
            index = int(self.crops.rng.integers(len(self.crops.photos)))
            self.crops.rng.bit_generator.state = state
            arrays.append(self.crops.crop())
            captions.append(self.captions[index])
        batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 127.5 - 1.0
        return batch, captions


class MixedCaptioned:
    """Half photos, half scenes per batch (seeded), with a share of empty captions for CFG."""

    def __init__(self, size: int, *, seed: int, empty_caption_rate: float = 0.1) -> None:
        self.photos = CaptionedPhotos(size, seed=seed)
        self.scenes = CaptionedScenes(size, seed=seed + 1)
        self.rng = np.random.default_rng(seed + 2)
        self.empty_caption_rate = empty_caption_rate

    def __call__(self, batch_size: int) -> tuple[torch.Tensor, list[str]]:
        n_photos = batch_size // 2
        a, ca = self.photos(n_photos)
        b, cb = self.scenes(batch_size - n_photos)
        captions = [c if self.rng.random() >= self.empty_caption_rate else ""
                    for c in ca + cb]
        return torch.cat([a, b]), captions


def caption_corpus(seed: int = 0, scenes: int = 4000) -> list[str]:
    """Every caption the base can see (photos, a sample of scenes) plus the fine-tunes' prompts:
    the corpus the tokenizer's merges are learnt from."""
    drawn = CaptionedScenes(8, seed=seed)
    corpus = [_photo_caption(k) for k in PHOTO_CAPTIONS]
    corpus += [drawn.scene()[1] for _ in range(scenes)]
    corpus += [TRIGGER_PROMPT, CLASS_PROMPT, "a painting of a tree", "a photo in sks style"]
    return corpus


# ----------------------------------------------------------------------------- tokenizer


def write_clip_tokenizer(folder: str | Path, corpus: Sequence[str]) -> Path:
    """Write a CLIP tokenizer (``vocab.json``, ``merges.txt``) whose BPE merges are learnt from
    ``corpus`` with the ``tokenizers`` library.

    The vocabulary holds every byte symbol (alone and word-final), so any prompt tokenizes; the
    merges make each word of the corpus a single token, as CLIP's own merges do for common
    English words. Written in the files ``transformers.CLIPTokenizer`` reads, so the pipeline
    folder loads as a real SD one does.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    chars = sorted(pre_tokenizers.ByteLevel.alphabet())
    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=5000, min_frequency=1, show_progress=False,
                                  end_of_word_suffix="</w>", initial_alphabet=[])
    bpe.train_from_iterator([c.lower() for c in corpus], trainer=trainer)
    with tempfile.TemporaryDirectory() as tmp:
        bpe.model.save(tmp)
        merges = [line for line in Path(tmp, "merges.txt").read_text().splitlines()
                  if line and not line.startswith("#")]
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    vocab = {token: index for index, token in enumerate(dict.fromkeys(tokens))}
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n",
                                       encoding="utf-8")
    config = {"model_max_length": MAX_TOKENS, "bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN,
              "unk_token": EOS_TOKEN, "pad_token": EOS_TOKEN, "tokenizer_class": "CLIPTokenizer"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


def load_tokenizer(folder: str | Path) -> CLIPTokenizer:
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(folder))


# ------------------------------------------------------------------------------- networks


def build_vae(size: int = LATENT_IMAGE_SIZE) -> AutoencoderKL:
    """A small ``AutoencoderKL``: three blocks (factor 4), 4 latent channels, as SD's VAE has."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4,
        block_out_channels=(32, 64, 64), layers_per_block=1, norm_num_groups=16,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        sample_size=size, scaling_factor=1.0,
    )


def build_text_encoder(tokenizer: CLIPTokenizer) -> CLIPTextModel:
    """A 3-layer CLIP text transformer (width 64) sized to the tokenizer."""
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, max_position_embeddings=MAX_TOKENS, projection_dim=64,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config)


def build_unet(size: int = LATENT_IMAGE_SIZE) -> UNet2DConditionModel:
    """A ``UNet2DConditionModel`` on the 8x8x4 latents with cross-attention at both levels."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=size // LATENT_FACTOR, in_channels=4, out_channels=4,
        block_out_channels=(64, 128), layers_per_block=1, norm_num_groups=16,
        cross_attention_dim=64, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    )


def build_scheduler() -> DDPMScheduler:
    """SD 1.x's training schedule as a ``DDPMScheduler``: scaled-linear betas, epsilon."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                         beta_schedule="scaled_linear", prediction_type="epsilon",
                         clip_sample=False, steps_offset=1)


# ------------------------------------------------------------------------------- training


def train_vae(vae: AutoencoderKL, batches: Callable[[int], tuple[torch.Tensor, list[str]]],
              config: training.TrainConfig, *, kl_weight: float = 1e-6,
              progress: bool = True) -> list[float]:
    """Reconstruction (L1 + MSE) plus a small KL term, as SD's VAE (without its GAN loss)."""
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    vae.train()

    def step_loss(_step: int) -> torch.Tensor:
        x, _ = batches(config.batch_size)
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape,
                                                         generator=generator)
        recon = vae.decode(z).sample
        return (F.l1_loss(recon, x) + F.mse_loss(recon, x)
                + kl_weight * posterior.kl().mean())

    losses = training.optimise(list(vae.parameters()), config, step_loss, description="vae",
                               progress=progress)
    vae.eval()
    return losses


@torch.no_grad()
def latent_scaling_factor(vae: AutoencoderKL,
                          batches: Callable[[int], tuple[torch.Tensor, list[str]]],
                          n: int = 256) -> float:
    """1 / std of the latents (SD's 0.18215 was found the same way)."""
    x, _ = batches(n)
    return float(1.0 / vae.encode(x).latent_dist.mean.std())


def tokenize(tokenizer: CLIPTokenizer, captions: Sequence[str]) -> torch.Tensor:
    return tokenizer(list(captions), padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids


def encode_text(text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer,
                captions: Sequence[str]) -> torch.Tensor:
    return text_encoder(tokenize(tokenizer, captions))[0]


def latent_denoising_loss(unet: UNet2DConditionModel, scheduler: DDPMScheduler,
                          latents: torch.Tensor, hidden: torch.Tensor,
                          generator: torch.Generator, *, reduce: bool = True) -> torch.Tensor:
    """Epsilon MSE at a uniform t on latents, conditioned on text embeddings ``hidden``."""
    noise = torch.randn(latents.shape, generator=generator)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],),
                      generator=generator)
    noisy = scheduler.add_noise(latents, noise, t)
    err = (unet(noisy, t, encoder_hidden_states=hidden).sample - noise).pow(2)
    return err.mean() if reduce else err.mean(dim=(1, 2, 3))


def sample_latents(vae: AutoencoderKL, images: torch.Tensor, scaling: float,
                   generator: torch.Generator | None) -> torch.Tensor:
    """Scaled latents of images: a draw from the posterior (as diffusers' trainers do), or its
    mean when ``generator`` is None."""
    posterior = vae.encode(images).latent_dist
    z = posterior.mean if generator is None else (
        posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator))
    return z * scaling


def train_text_to_image(unet: UNet2DConditionModel, text_encoder: CLIPTextModel,
                        tokenizer: CLIPTokenizer, vae: AutoencoderKL, scheduler: DDPMScheduler,
                        batches: Callable[[int], tuple[torch.Tensor, list[str]]],
                        config: training.TrainConfig, *, progress: bool = True) -> list[float]:
    """Train the UNet and the text encoder together (the VAE is frozen), epsilon loss."""
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    scaling = float(vae.config.scaling_factor)
    vae.eval().requires_grad_(False)
    unet.train()
    text_encoder.train()

    def step_loss(_step: int) -> torch.Tensor:
        x, captions = batches(config.batch_size)
        with torch.no_grad():
            latents = sample_latents(vae, x, scaling, generator)
        hidden = encode_text(text_encoder, tokenizer, captions)
        return latent_denoising_loss(unet, scheduler, latents, hidden, generator)

    params = list(unet.parameters()) + list(text_encoder.parameters())
    losses = training.optimise(params, config, step_loss, description="unet+text",
                               progress=progress)
    unet.eval()
    text_encoder.eval()
    return losses


@torch.no_grad()
def generate(unet: UNet2DConditionModel, text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer,
             vae: AutoencoderKL, scheduler: DDPMScheduler, prompts: Sequence[str], *,
             seed: int = 0, steps: int = 50, guidance: float = 3.0) -> torch.Tensor:
    """Images in [-1, 1] from prompts by DDIM with classifier-free guidance (for the sample
    grid and DreamBooth's class images)."""
    from diffusers import DDIMScheduler

    ddim = DDIMScheduler.from_config(scheduler.config)
    ddim.set_timesteps(steps)
    generator = torch.Generator().manual_seed(seed)
    n = len(prompts)
    cond = encode_text(text_encoder, tokenizer, prompts)
    uncond = encode_text(text_encoder, tokenizer, [""] * n)
    size = unet.config.sample_size
    latents = torch.randn((n, 4, size, size), generator=generator)
    for t in ddim.timesteps:
        both = unet(torch.cat([latents, latents]), t,
                    encoder_hidden_states=torch.cat([uncond, cond])).sample
        e_u, e_c = both.chunk(2)
        latents = ddim.step(e_u + guidance * (e_c - e_u), t, latents).prev_sample
    return vae.decode(latents / vae.config.scaling_factor).sample.clamp(-1, 1)


def save_sd_pipeline(out: str | Path, *, unet: UNet2DConditionModel, vae: AutoencoderKL,
                     text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer,
                     scheduler: DDPMScheduler) -> Path:
    """Write a ``StableDiffusionPipeline`` folder (safetensors, no safety checker), without the
    machine-local ``_name_or_path``."""
    from diffusers import StableDiffusionPipeline

    out = Path(out)
    pipe = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text_encoder,
                                   tokenizer=tokenizer, scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(out, safe_serialization=True)
    for config_file in out.glob("*/config.json"):
        config = json.loads(config_file.read_text())
        if config.pop("_name_or_path", None) is not None:
            config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for path in out.rglob("*"):
        if path.is_file():
            path.chmod(0o644)
    return out


@dataclass
class LatentParts:
    """The networks of a latent demo pipeline folder (float32, eval mode)."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler: DDPMScheduler
    folder: Path = field(default_factory=Path)


def load_parts(folder: str | Path) -> LatentParts:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    folder = Path(folder)
    kw = {"use_safetensors": True, "local_files_only": True}
    return LatentParts(
        unet=UNet2DConditionModel.from_pretrained(folder / "unet", **kw).float().eval(),
        vae=AutoencoderKL.from_pretrained(folder / "vae", **kw).float().eval(),
        text_encoder=CLIPTextModel.from_pretrained(folder / "text_encoder",
                                                   **kw).float().eval(),
        tokenizer=load_tokenizer(folder / "tokenizer"),
        scheduler=DDPMScheduler.from_pretrained(folder / "scheduler"),
        folder=folder,
    )


def to_jsonable(obj: DataclassInstance) -> dict[str, Any]:
    return asdict(obj)
