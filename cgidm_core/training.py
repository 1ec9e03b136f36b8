"""Training of small pixel-space DDPMs and flow-matching UNets: the packaged demo pairs and
fine-tunes of them (the scheduler saved with a model says which objective it learns).

Why this lives in the library: the demo pair has to be reproducible from the installed package
alone (seeded, trained on sample photos that ship inside scikit-image and matplotlib), and the
same loop lets a user fine-tune the demo base on their own folder of images, which gives them a
pair with *known* members to check the method on.

Why the model is this small: CGI-DM runs hundreds of forward+backward passes through both models
per image, and the demo has to finish in minutes on a laptop CPU. A 32x32 UNet of about a million
parameters memorises ten images in a few minutes and still runs a batch of 20 in a fraction of a
second.
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TypeAlias

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMPipeline, DDPMScheduler, FlowMatchEulerDiscreteScheduler, UNet2DModel
from diffusers.optimization import get_scheduler
from PIL import Image

from cgidm_core.errors import ImageInputError, ModelFormatError, ModelNotFoundError
from cgidm_core.names import IMAGE_SUFFIXES

#: The two training objectives of the demo models: DDPM (noise) and flow matching (velocity).
Schedule: TypeAlias = DDPMScheduler | FlowMatchEulerDiscreteScheduler

#: Side length of the demo models, in pixels.
DEMO_IMAGE_SIZE = 32

#: Photos that ship inside installed packages and carry no copyright restriction (public domain
#: or CC0, per the docstrings of ``skimage.data``; Grace Hopper's portrait is a US Navy photo).
#: Grey-level ones are replicated to three channels.
SKIMAGE_SAMPLES = (
    "astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "retina",
    "immunohistochemistry", "camera", "coins", "brick", "grass", "gravel", "horse",
    "moon", "page", "text", "cell", "microaneurysms", "clock",
)
MATPLOTLIB_SAMPLES = ("grace_hopper.jpg",)


def build_demo_unet(image_size: int = DEMO_IMAGE_SIZE) -> UNet2DModel:
    """The demo architecture: three resolution levels, one ResNet block each, no attention.

    Attention at 8x8 bought no lower loss in our measurements but cost 60 % more time per step.
    """
    return UNet2DModel(
        sample_size=image_size,
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
    )


def build_demo_scheduler() -> DDPMScheduler:
    """The standard DDPM schedule (Ho et al.): 1000 linear betas, epsilon prediction."""
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="linear",
        beta_start=1e-4,
        beta_end=0.02,
        prediction_type="epsilon",
        clip_sample=True,
    )


def build_flow_scheduler(shift: float = 1.0) -> FlowMatchEulerDiscreteScheduler:
    """A rectified-flow schedule: ``x_s = (1 - s) x0 + s noise``, velocity target, 1000 steps.

    Saving it as the pipeline's scheduler is what marks a ``UNet2DModel`` folder as a
    flow-matching model for the loader (``cgidm_core.models.pixel_flow``).
    """
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)


def is_flow_scheduler(scheduler: object) -> bool:
    """Whether a model trained with ``scheduler`` predicts flow-matching velocities."""
    return isinstance(scheduler, FlowMatchEulerDiscreteScheduler)


def noised_and_target(
    scheduler: Schedule,
    x0: torch.Tensor,
    noise: torch.Tensor,
    t: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(noised input, regression target, timestep fed to the UNet)`` at integer ``t``.

    One place for both training objectives so that training, the membership check and the
    inversion agree: DDPM noises with ``alphas_cumprod`` and regresses the noise; flow matching
    interpolates ``(1 - s) x0 + s noise`` with ``s = t / N`` (then the scheduler's time shift,
    as :func:`cgidm_core.models.flow.shifted_sigmas` does for the inversion) and regresses the
    velocity ``noise - x0``; the UNet sees ``s * N`` as its timestep (the diffusers convention).
    """
    if is_flow_scheduler(scheduler):
        from cgidm_core.models.flow import shifted_sigmas

        total = scheduler.config.num_train_timesteps
        s = shifted_sigmas(t, total, float(scheduler.config.shift))
        s_b = s.view(-1, *([1] * (x0.ndim - 1)))
        return (1.0 - s_b) * x0 + s_b * noise, noise - x0, s * total
    return scheduler.add_noise(x0, noise, t), noise, t


# ----------------------------------------------------------------------------------- data


def sample_photos() -> list[tuple[str, Image.Image]]:
    """The public-domain photos the demo base is trained on, as RGB PIL images.

    Only images that are stored inside the installed packages are used (no download).
    """
    import matplotlib.cbook
    import skimage.data

    photos: list[tuple[str, Image.Image]] = []
    for name in SKIMAGE_SAMPLES:
        array = getattr(skimage.data, name)()
        if isinstance(array, tuple):  # stereo pairs and the like
            array = array[0]
        array = np.asarray(array)
        if array.dtype != np.uint8:
            array = array.astype(np.float64)
            array = (255 * (array - array.min()) / max(array.max() - array.min(), 1e-8))
            array = array.astype(np.uint8)
        photos.append((f"skimage.data.{name}", Image.fromarray(array).convert("RGB")))
    for name in MATPLOTLIB_SAMPLES:
        # asfileobj=True (the default): an open file, never the array the stub also allows
        with matplotlib.cbook.get_sample_data(name) as handle:  # type: ignore[union-attr]
            photos.append((f"matplotlib:{name}", Image.open(handle).convert("RGB")))
    return photos


def list_image_files(folder: str | Path) -> list[Path]:
    """Image files of a folder, sorted by name so that the data order is deterministic."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ImageInputError(f"image folder {folder} does not exist; give a folder of images")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ImageInputError(
            f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}; give a folder of images"
        )
    return files


def load_images_as_tensor(folder: str | Path, size: int) -> tuple[list[str], torch.Tensor]:
    """Names and tensors ``(N, 3, size, size)`` in [-1, 1] of every image in a folder.

    The images go through exactly the preprocessing CGI-DM applies to its inputs (short side
    resized bilinear, centre crop), so a fine-tune memorises the very pixels the method will be
    given later.
    """
    from cgidm_core.images import load_image, to_tensor

    files = list_image_files(folder)
    return [p.name for p in files], to_tensor([load_image(p) for p in files], size)


class RandomCrops:
    """Endless batches of random crops of a few photos: random scale, position and flip.

    Many crops of twenty photos are what makes a "pretrained" base that has seen generic natural
    image statistics without a large data set. Deterministic for a given seed.
    """

    def __init__(
        self,
        photos: Sequence[Image.Image],
        size: int,
        *,
        seed: int,
        min_scale: float = 0.2,
        max_side: int = 256,
    ) -> None:
        if not photos:
            raise ImageInputError("no photos to crop from")
        self.size = size
        self.min_scale = min_scale
        self.rng = np.random.default_rng(seed)
        # Shrinking the sources first makes crops cheap; crops still cover 8x down-scaling.
        self.photos = []
        for photo in photos:
            scale = max_side / min(photo.size)
            if scale < 1:
                photo = photo.resize(
                    (round(photo.width * scale), round(photo.height * scale)),
                    Image.Resampling.BILINEAR,
                )
            self.photos.append(photo)

    def crop(self) -> np.ndarray:
        photo = self.photos[int(self.rng.integers(len(self.photos)))]
        short = min(photo.size)
        # Log-uniform crop side: as many close-ups as wide views.
        side = short * math.exp(self.rng.uniform(math.log(self.min_scale), 0.0))
        side = max(int(round(side)), min(self.size, short))
        left = int(self.rng.integers(0, photo.width - side + 1))
        top = int(self.rng.integers(0, photo.height - side + 1))
        patch = photo.crop((left, top, left + side, top + side)).resize(
            (self.size, self.size), Image.Resampling.BILINEAR
        )
        if self.rng.random() < 0.5:
            patch = patch.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return np.asarray(patch, dtype=np.float32)

    def __call__(self, batch_size: int) -> torch.Tensor:
        batch = np.stack([self.crop() for _ in range(batch_size)])
        return torch.from_numpy(batch).permute(0, 3, 1, 2) / 127.5 - 1.0


class FixedImages:
    """Batches drawn from a small fixed set, epoch by epoch in a seeded order (DreamBooth style).

    No crops or scales: the fine-tune sees the images exactly as the method will. Flips are off
    by default, as in the DreamBooth reference script.
    """

    def __init__(self, images: torch.Tensor, *, seed: int, flip: bool = False) -> None:
        if images.ndim != 4 or images.shape[0] == 0:
            raise ImageInputError("need a non-empty batch of images (N, 3, H, W)")
        self.images = images
        self.flip = flip
        self.generator = torch.Generator().manual_seed(seed)
        self._order: list[int] = []

    def __call__(self, batch_size: int) -> torch.Tensor:
        picks = []
        for _ in range(batch_size):
            if not self._order:
                self._order = torch.randperm(len(self.images), generator=self.generator).tolist()
            picks.append(self._order.pop())
        batch = self.images[picks].clone()
        if self.flip:
            flips = torch.rand(batch_size, generator=self.generator) < 0.5
            batch[flips] = batch[flips].flip(-1)
        return batch


# ------------------------------------------------------------------------------- training


@dataclass(frozen=True)
class TrainConfig:
    """Optimiser settings of one training run."""

    steps: int
    batch_size: int
    learning_rate: float
    seed: int = 0
    warmup_steps: int = 100
    lr_schedule: str = "cosine"
    weight_decay: float = 0.0
    grad_clip: float = 1.0

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def ddpm_loss(
    unet: UNet2DModel,
    scheduler: Schedule,
    x0: torch.Tensor,
    generator: torch.Generator,
) -> torch.Tensor:
    """The "simple" loss at a uniform random t: MSE to the noise (DDPM) or velocity (flow)."""
    noise = torch.randn(x0.shape, generator=generator)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (x0.shape[0],), generator=generator)
    noisy, target, steps = noised_and_target(scheduler, x0, noise, t)
    return F.mse_loss(unet(noisy, steps).sample, target)


def optimise(
    params: list[torch.nn.Parameter],
    config: TrainConfig,
    loss_of_step: Callable[[int], torch.Tensor],
    *,
    description: str = "training",
    progress: bool = True,
    log_every: int = 50,
    mininterval: float = 5.0,
    on_step: Callable[[int, list[float]], None] | None = None,
) -> list[float]:
    """The one AdamW loop every trainer here uses (pixel demo pairs, the latent family and its
    fine-tunes): learning-rate schedule with warm-up, gradient clipping, a loss per step, and a
    refusal of a non-finite loss. ``loss_of_step(step)`` computes the step's loss (the caller owns
    data and randomness); ``on_step(steps_done, losses)`` runs after every optimiser step
    (checkpoints)."""
    from tqdm.auto import tqdm

    optimizer = torch.optim.AdamW(params, lr=config.learning_rate,
                                  weight_decay=config.weight_decay)
    lr_scheduler = get_scheduler(
        config.lr_schedule,
        optimizer=optimizer,
        num_warmup_steps=min(config.warmup_steps, config.steps // 10),
        num_training_steps=config.steps,
    )
    losses: list[float] = []
    bar = tqdm(range(config.steps), desc=description, disable=not progress,
               mininterval=mininterval)
    for step in bar:
        loss = loss_of_step(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]  # torch leaves backward() unannotated
        if config.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
        optimizer.step()
        lr_scheduler.step()
        losses.append(float(loss.detach()))
        if not math.isfinite(losses[-1]):
            raise FloatingPointError(f"loss became {losses[-1]} at step {step}; lower the lr")
        if on_step is not None:
            on_step(step + 1, losses)
        if (step + 1) % log_every == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-log_every:]):.4f}")
    return losses


def train(
    unet: UNet2DModel,
    scheduler: Schedule,
    batches: Callable[[int], torch.Tensor],
    config: TrainConfig,
    *,
    progress: bool = True,
    description: str = "training",
    log_every: int = 50,
    on_step: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Train ``unet`` in place with AdamW; returns the loss of every step.

    ``batches(n)`` returns the next ``n`` images in [-1, 1]. All randomness (noise, timesteps)
    comes from one generator seeded with ``config.seed``; the caller seeds the data source.
    ``on_step(steps_done, loss)`` runs after every optimiser step (e.g. to save checkpoints; it
    may switch the model to eval mode and must switch it back to train mode).
    """
    if config.steps < 1 or config.batch_size < 1:
        raise ValueError("steps and batch_size must be at least 1")
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    unet.train()
    losses = optimise(
        list(unet.parameters()), config,
        lambda _step: ddpm_loss(unet, scheduler, batches(config.batch_size), generator),
        description=description, progress=progress, log_every=log_every, mininterval=2.0,
        on_step=None if on_step is None else lambda done, seen: on_step(done, seen[-1]),
    )
    unet.eval()
    return losses


def smoothed_final_loss(losses: Sequence[float], window: int = 100) -> float:
    """Mean of the last ``window`` step losses: single-step losses are too noisy to report."""
    tail = losses[-window:]
    return float(np.mean(tail)) if tail else float("nan")


@torch.no_grad()
def denoising_losses(
    unet: UNet2DModel,
    scheduler: Schedule,
    images: torch.Tensor,
    *,
    samples: int = 64,
    seed: int = 0,
    batch_size: int = 64,
) -> torch.Tensor:
    """Per-image denoising loss, averaged over ``samples`` (t, noise) draws; shape ``(N,)``.

    The timesteps are stratified over the whole schedule and the draws depend only on ``seed``
    and the sample index, so two models evaluated with the same seed see identical (t, noise):
    their difference has no Monte Carlo noise from the draws themselves (common random numbers).
    """
    unet.eval()
    n = images.shape[0]
    generator = torch.Generator().manual_seed(seed)
    total_t = scheduler.config.num_train_timesteps
    t_all = ((torch.arange(samples) + torch.rand(samples, generator=generator)) * total_t / samples)
    t_all = t_all.long().clamp_(0, total_t - 1)
    noise_all = torch.randn((samples, *images.shape), generator=generator)
    losses = torch.zeros(n)
    # Flatten (sample, image) pairs into batches.
    pairs = [(s, i) for s in range(samples) for i in range(n)]
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        s_idx = torch.tensor([s for s, _ in chunk])
        i_idx = torch.tensor([i for _, i in chunk])
        noise = noise_all[s_idx, i_idx]
        t = t_all[s_idx]
        noisy, target, steps = noised_and_target(scheduler, images[i_idx], noise, t)
        err = (unet(noisy, steps).sample - target).pow(2).mean(dim=(1, 2, 3))
        losses.index_add_(0, i_idx, err)
    return losses / samples


# --------------------------------------------------------------------------- saving/loading


def save_pipeline(
    unet: UNet2DModel,
    scheduler: Schedule,
    out_dir: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write a ``DDPMPipeline`` folder with safetensors weights (no pickles)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if dtype != torch.float32:
        unet = copy.deepcopy(unet).to(dtype)
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(out_dir, safe_serialization=True)
    # A model loaded from disk remembers where it came from; that local path means nothing
    # on another machine, so it is left out of the shipped config.
    for config_file in out_dir.glob("*/config.json"):
        config = json.loads(config_file.read_text())
        if config.pop("_name_or_path", None) is not None:
            config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for weights in out_dir.rglob("*.safetensors"):
        weights.chmod(0o644)  # safetensors writes 0600; package data must be world-readable
    return out_dir


def load_pipeline_parts(
    folder: str | Path,
) -> tuple[UNet2DModel, Schedule]:
    """UNet (float32, eval mode) and scheduler of a ``DDPMPipeline`` folder, safetensors only.

    The scheduler is the saved one's kind: a flow-matching folder gets its
    ``FlowMatchEulerDiscreteScheduler`` back, anything else the DDPM schedule.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelNotFoundError(f"model folder {folder} does not exist")
    if not (folder / "unet" / "diffusion_pytorch_model.safetensors").is_file():
        raise ModelFormatError(
            f"{folder} is not a DDPM pipeline folder with safetensors weights "
            "(expected unet/diffusion_pytorch_model.safetensors)"
        )
    unet = UNet2DModel.from_pretrained(folder / "unet", use_safetensors=True)
    config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    if config.get("_class_name") == FlowMatchEulerDiscreteScheduler.__name__:
        scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(folder / "scheduler")
    else:
        scheduler = DDPMScheduler.from_pretrained(folder / "scheduler")
    return unet.float().eval(), scheduler


class Stopwatch:
    """Wall-clock seconds of a block, for model cards."""

    def __enter__(self) -> Stopwatch:
        self.start = time.perf_counter()
        self.seconds = 0.0
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.start
