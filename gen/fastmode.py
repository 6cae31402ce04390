"""The approximate fast mode: reuse the denoiser's deep features across steps, as in DeepCache (Ma et al. 2024).

Every `interval`-th step runs the whole denoiser and keeps its deep features; the steps between run only
the shallow, full-resolution ends and reuse them. For a diffusers UNet the cache sits at DeepCache's
shallowest skip branch (its default, branch 0): a step between runs conv_in, the first layer (resnet +
transformer) of the first down block, the last two layers of the last up block and the output head. For
gen's DiT the kept feature is the residual that the middle blocks added; a step between runs the first and
last blocks only. interval=1 is exact (every step is full).

The first step is always full, and so is a step where a guidance interval switches CFG on (the cache holds
no unconditional half); where it switches CFG off, the cache's conditional half serves. The deviation from
exact sampling is measured by bench/sample_vs_diffusers.py and stated in docs/memory-and-speed.md.
"""

from __future__ import annotations

import torch

from gen.errors import GenError


class FeatureCache:
    """A predict(x, t, **denoiser_kwargs) -> prediction wrapper around a denoiser that refreshes its cached deep
    features every `interval` calls."""

    def __init__(self, denoiser, interval: int, forward=None):
        """`forward`: the function that runs the denoiser (`forward_fn(kind(denoiser))` or a torch.compile of it)."""
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise GenError(f"cache interval must be an integer >= 1, not {interval!r}")
        self.denoiser = denoiser
        self.interval = interval
        if kind(denoiser) == "unet":
            check_unet(denoiser)
        elif len(denoiser.blocks) < 3:
            raise GenError("the fast mode needs a DiT with at least 3 blocks")
        self.forward = forward or forward_fn(kind(denoiser))
        self.calls = 0
        self.full_calls = 0
        self.cached: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **kwargs) -> torch.Tensor:
        cached = self.cached
        if cached is not None and cached.shape[0] == 2 * x.shape[0]:  # CFG just switched off (a guidance
            cached = cached[x.shape[0]:]  # interval): keep the conditional half, the second of [uncond, cond]
        full = self.calls % self.interval == 0 or cached is None or cached.shape[0] != x.shape[0]
        self.calls += 1
        self.full_calls += full
        out, self.cached = self.forward(self.denoiser, x, t, cached=None if full else cached, **kwargs)
        return out


def kind(denoiser) -> str:
    """"unet" (diffusers' UNet2DConditionModel) or "dit" (gen's DiT): the two architectures the cache knows."""
    return "dit" if hasattr(denoiser, "blocks") and hasattr(denoiser, "x_embedder") else "unet"


def forward_fn(kind: str):
    """The cached forward for a DiT or a UNet: f(denoiser, x, t, cached=..., **denoiser_kwargs) -> (out, deep feature)."""
    return dit_forward if kind == "dit" else unet_forward


def check_unet(unet) -> None:
    """The cached path re-implements UNet2DConditionModel.forward for SD-style UNets (text conditioning, and
    SDXL's text_time added embeddings); others (another architecture, SD3's transformer) are refused rather than
    sampled wrongly."""
    if type(unet).__name__ != "UNet2DConditionModel":
        raise GenError(f"the fast mode supports SD-style UNet2DConditionModel denoisers and gen's DiT, not "
                       f"{type(unet).__name__}")
    c = unet.config
    added = c.get("addition_embed_type")
    extra = [name for name, value in (("class embeddings", getattr(unet, "class_embedding", None)),
                                      ("addition embeddings", added if added != "text_time" else None),
                                      ("an encoder projection", c.get("encoder_hid_dim_type")))
             if value is not None]
    if c.get("center_input_sample"):
        extra.append("centred input")
    if getattr(unet.up_blocks[-1], "s1", None):
        extra.append("FreeU enabled")
    if len(unet.up_blocks[-1].resnets) != len(unet.down_blocks[0].resnets) + 1:
        extra.append("a last up block that does not mirror the first down block")
    if extra:
        raise GenError(f"the fast mode supports SD-style UNet2DConditionModel denoisers; this one has "
                       f"{', '.join(extra)}")


def _block(block, x, emb, hidden, **kw):
    if getattr(block, "has_cross_attention", False):
        return block(hidden_states=x, temb=emb, encoder_hidden_states=hidden, **kw)
    return block(hidden_states=x, temb=emb, **kw)


def _layer(block, i: int, x, emb, hidden):
    """Layer i of a down or up block: its resnet, then its transformer if it has one (as the block runs it)."""
    x = block.resnets[i](x, emb)
    if getattr(block, "attentions", None):
        x = block.attentions[i](x, encoder_hidden_states=hidden, return_dict=False)[0]
    return x


def unet_forward(unet, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor,
                 cached: torch.Tensor | None = None, added_cond_kwargs: dict | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """UNet2DConditionModel.forward (same operations in the same order, so `cached=None` gives the same
    output), returning also the deep feature at DeepCache's shallowest skip branch (branch 0): the input of
    the last up block's second-to-last layer. Given `cached`, everything deeper is skipped: the step runs
    conv_in, the first layer of the first down block and the last two layers of the last up block, whose
    skip connections are exactly those two outputs."""
    factor = 2 ** unet.num_upsamplers
    forward_upsample_size = any(d % factor for d in sample.shape[-2:])
    hidden = encoder_hidden_states
    emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timestep), None)
    aug = unet.get_aug_embed(emb=emb, encoder_hidden_states=hidden, added_cond_kwargs=added_cond_kwargs or {})
    if aug is not None:  # SDXL: pooled text embedding + time ids
        emb = emb + aug
    if unet.time_embed_act is not None:
        emb = unet.time_embed_act(emb)
    x_in = unet.conv_in(sample)
    first, last = unet.down_blocks[0], unet.up_blocks[-1]
    x = _layer(first, 0, x_in, emb, hidden)
    shallow = (x_in, x)  # the skips the last two up layers read
    if cached is None:
        res = shallow
        for i in range(1, len(first.resnets)):
            x = _layer(first, i, x, emb, hidden)
            res += (x,)
        if first.downsamplers:
            for down in first.downsamplers:
                x = down(x)
            res += (x,)
        for block in unet.down_blocks[1:]:
            x, r = _block(block, x, emb, hidden)
            res += r
        if unet.mid_block is not None:
            if getattr(unet.mid_block, "has_cross_attention", False):
                x = unet.mid_block(x, emb, encoder_hidden_states=hidden)
            else:
                x = unet.mid_block(x, emb)
        upsample_size = None
        for block in unet.up_blocks[:-1]:
            skips, res = res[-len(block.resnets):], res[:-len(block.resnets)]
            if forward_upsample_size:
                upsample_size = res[-1].shape[2:]
            x = _block(block, x, emb, hidden, res_hidden_states_tuple=skips, upsample_size=upsample_size)
        for j in range(len(last.resnets) - 2):  # the last up block's layers before the branch
            x = _layer(last, j, torch.cat([x, res[-1 - j]], dim=1), emb, hidden)
        cached = x
    x = cached
    for j, skip in ((-2, shallow[1]), (-1, shallow[0])):
        x = _layer(last, len(last.resnets) + j, torch.cat([x, skip], dim=1), emb, hidden)
    for up in last.upsamplers or []:
        x = up(x, None)
    if unet.conv_norm_out:
        x = unet.conv_act(unet.conv_norm_out(x))
    return unet.conv_out(x), cached


def dit_forward(dit, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor,
                pooled_projections: torch.Tensor | None = None, cached: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """gen's DiT forward, returning also the residual its middle blocks (all but the first and last) added;
    given `cached`, the middle blocks are skipped and `cached` is added in their place."""
    hidden, pooled = encoder_hidden_states, pooled_projections
    N, _, H, W = sample.shape
    p = dit.config.patch_size
    h, w = H // p, W // p
    x = dit.x_embedder(sample).flatten(2).transpose(1, 2)
    x = x + dit._pos_embed(h, w, x)
    t = torch.as_tensor(timestep, device=sample.device).reshape(-1).expand(N)
    c = dit.t_embedder(t)
    if pooled is not None:
        c = c + dit.y_embedder(pooled.to(c.dtype))
    x = dit.blocks[0](x, c, hidden)
    if cached is None:
        start = x
        for block in dit.blocks[1:-1]:
            x = block(x, c, hidden)
        cached = x - start
    else:
        x = x + cached
    x = dit.final_layer(dit.blocks[-1](x, c, hidden), c)
    x = x.view(N, h, w, p, p, dit.out_channels).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(N, dit.out_channels, H, W), cached
