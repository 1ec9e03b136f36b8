"""The rectified-flow forward process (Flux.1, SD3, the flow demo pair), shared by its adapters.

Flow-matching models are trained on ``x_s = (1 - s) x0 + s noise`` for ``s`` in ``[0, 1]`` and
predict the velocity ``v = noise - x0``. CGI-DM carries over unchanged with these in place of
DDPM's noising and noise target: the contrast is
``E||v_ft(x_s) - v||^2 - E||v_pre(x_s) - v||^2`` with both models seeing the same ``x_s``.

The inversion draws integer timesteps ``t`` in ``[t_min, t_max]`` of ``num_train_timesteps``
(the shared, seeded noise source); a flow family maps them to ``s = t / num_train_timesteps``
and then through the time shift ``s' = shift s / (1 + (shift - 1) s)`` (``shift = 1``: uniform
``s``; Flux.1-dev trains with larger shifts, which spend more draws at high noise).
"""

from __future__ import annotations

import torch

from cgidm_core.pair import ModelPair


def shifted_sigmas(t: torch.Tensor, num_train_timesteps: int, shift: float) -> torch.Tensor:
    """Float32 noise levels ``s`` in ``(0, 1)`` for integer timesteps ``t`` (any shape)."""
    s = t.float() / float(num_train_timesteps)
    if shift != 1.0:
        s = shift * s / (1.0 + (shift - 1.0) * s)
    return s


class FlowMatchingPair(ModelPair):
    """A :class:`ModelPair` whose models were trained by flow matching.

    Subclasses pass ``alphas_cumprod=None`` to :class:`ModelPair` and return *velocity*
    predictions from ``eps_finetuned``/``eps_pretrained`` (the names are the interface's; the
    space is :meth:`loss_target`'s). ``flow_shift`` is the time shift applied to the drawn
    timesteps (see the module docstring).
    """

    prediction_type = "flow"
    flow_shift: float = 1.0

    def shift_for(self, latent: torch.Tensor) -> float:
        """The time shift for latents shaped like ``latent``: :attr:`flow_shift` here.

        A family whose training shift depends on the image size (Flux.1-dev shifts more at
        larger sides) overrides this; the shape is all it needs, so ``add_noise`` and the
        adapter's prediction (which must give the model the same ``s``) agree by construction.
        """
        return self.flow_shift

    def sigmas(self, t: torch.Tensor, latent: torch.Tensor | None = None) -> torch.Tensor:
        """Float32 ``s`` on :attr:`device` for integer ``t`` (shift of ``latent``'s size)."""
        shift = self.flow_shift if latent is None else self.shift_for(latent)
        return shifted_sigmas(t, self.num_train_timesteps, shift).to(self.device)

    def native_time_shift(self) -> float:
        """The time shift at the pair's native latent size (what ``describe`` reports)."""
        return self.shift_for(torch.empty(0, 0, *self.latent_shape[1:]))

    def batch_sigmas(self, t: torch.Tensor, z_t: torch.Tensor) -> torch.Tensor:
        """:meth:`sigmas` for a prediction on the batch ``z_t``: one ``s`` per image, a single
        ``t`` repeated for all of them."""
        steps = torch.as_tensor(t, device=self.device).long().reshape(-1)
        if steps.numel() == 1:
            steps = steps.expand(z_t.shape[0])
        return self.sigmas(steps, z_t)

    def add_noise(self, z0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        s = self.sigmas(t, z0).view(-1, *([1] * (z0.ndim - 1)))
        return (1.0 - s) * z0 + s * noise

    def loss_target(self, z0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return noise - z0
