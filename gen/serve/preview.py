"""Live previews for /sdapi/v1/progress: the latent being sampled mapped to RGB by one linear map per model, as
A1111's "Approx cheap" and ComfyUI's latent_rgb_factors do. The map is fitted from the model's own VAE (least
squares from its latents of random colour cells to those colours), so every family and latent width has one
without a table of factors, and a preview costs a matrix product, not a VAE decode."""

from __future__ import annotations

import io
import threading

import torch

from gen.models import vae as vae_lib

CELLS, SIDE = 4, 4  # colour cells a side in each fitting image, and latent pixels a side in each cell


@torch.no_grad()
def fit(pipe) -> torch.Tensor:
    """(C + 1, 3): latent channels and a bias -> RGB in [0, 1], for `pipe`'s VAE and latent scaling."""
    f, g = pipe.vae_scale_factor, torch.Generator().manual_seed(0)
    colours = torch.rand(8, 3, CELLS, CELLS, generator=g).repeat_interleave(SIDE, 2).repeat_interleave(SIDE, 3)
    images = colours.repeat_interleave(f, 2).repeat_interleave(f, 3)  # (N, 3, h*f, w*f), h = w = cells*side
    with pipe._on_device(pipe.vae):
        z = vae_lib.encode(pipe.vae, images * 2 - 1, generator=g).float().cpu()  # (N, C, h, w)
    inputs = torch.cat([z, torch.ones_like(z[:, :1])], 1).permute(0, 2, 3, 1).reshape(-1, z.shape[1] + 1)
    return torch.linalg.lstsq(inputs, colours.permute(0, 2, 3, 1).reshape(-1, 3)).solution


def to_rgb(latents: torch.Tensor, rgb_map: torch.Tensor) -> torch.Tensor:
    """(C, h, w) model-space latents -> (h, w, 3) colours in [0, 1]."""
    lat = latents.float().cpu().permute(1, 2, 0)
    return (torch.cat([lat, torch.ones_like(lat[..., :1])], -1) @ rgb_map).clamp(0, 1)


class Previews:
    """The latest latent of a worker's running request, and its preview PNG on demand (the map fitted once a model,
    when a client first asks)."""

    def __init__(self):
        self.lock, self.pipe, self.rgb_map, self.latent, self.size = threading.Lock(), None, None, None, None

    def start(self, pipe, height: int, width: int) -> None:
        if pipe is not self.pipe:
            self.pipe, self.rgb_map = pipe, None
        self.latent, self.size = None, (height, width)

    def record(self, x: torch.Tensor) -> None:
        """The denoiser's input (its family's layout; the first image of the batch kept)."""
        self.latent = x[:1].detach()

    def stop(self) -> None:
        self.latent = None

    def png(self) -> bytes | None:
        """The current latent as a PNG (latent-sized, enlarged to at least 64 pixels), or None when none."""
        from PIL import Image

        latent, pipe = self.latent, self.pipe
        if latent is None or pipe is None:
            return None
        with self.lock:
            if self.rgb_map is None:
                self.rgb_map = fit(pipe)
            rgb_map = self.rgb_map
        f = pipe.vae_scale_factor
        h, w = self.size[0] // f, self.size[1] // f
        rgb = to_rgb(pipe.family.unpack(latent, h, w)[0], rgb_map)
        image = Image.fromarray((rgb.numpy() * 255).round().astype("uint8"))
        k = max(1, -(-64 // min(h, w)))
        image = image.resize((w * k, h * k), Image.NEAREST)
        out = io.BytesIO()
        image.save(out, format="PNG")
        return out.getvalue()
