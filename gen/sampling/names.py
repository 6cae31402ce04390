"""Every sampler and schedule by gen's, AUTOMATIC1111's and ComfyUI's names (A1111's modules/sd_samplers_kdiffusion.py,
sd_samplers_timesteps.py and sd_schedulers.py labels; ComfyUI's comfy/samplers.py KSAMPLER_NAMES and SCHEDULER_NAMES).

A sampler is a k-diffusion-style function (gen.sampling.k), a diffusers scheduler of gen.samplers' table, or both:
then the diffusers scheduler serves the model's own schedule ("automatic": exact diffusers parity) and the function
every named schedule.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from gen.errors import GenError
from gen.sampling import k, schedules


@dataclass(frozen=True)
class Sampler:
    name: str                     # gen's
    fn: object = None             # gen.sampling.k function, or None
    diffusers: dict | None = None  # formulation kind -> gen.samplers.SAMPLERS name
    a1111: str | None = None
    comfy: str | None = None
    aliases: tuple[str, ...] = ()

    @property
    def cfg_pp(self) -> bool:
        """A CFG++ sampler: it steps along the unconditional prediction, so it needs the unconditional pass at any
        scale (ComfyUI's cfg_pp samplers set disable_cfg1_optimization; A1111's DDIM CFG++ runs at about 0.56)."""
        return self.name.endswith("cfg++")

    @property
    def kinds(self) -> tuple[str, ...]:
        kinds = set(self.diffusers or ())
        if self.fn is not None:
            kinds |= {"ddpm"} if self.fn in k.VP_ONLY else {"ddpm", "flow"}
        return tuple(sorted(kinds))


def _d(ddpm=None, flow=None):
    return {kind: n for kind, n in (("ddpm", ddpm), ("flow", flow)) if n}


SAMPLERS = [
    Sampler("euler", k.euler, _d("euler", "flow-euler"), "Euler", "euler", ("flow-euler",)),
    Sampler("euler-a", k.euler_ancestral, _d("euler-a"), "Euler a", "euler_ancestral"),
    Sampler("heun", k.heun, _d("heun", "flow-heun"), "Heun", "heun", ("flow-heun",)),
    Sampler("heun++2", k.heunpp2, None, None, "heunpp2"),
    Sampler("dpm2", k.dpm_2, None, "DPM2", "dpm_2"),
    Sampler("dpm2-a", k.dpm_2_ancestral, None, "DPM2 a", "dpm_2_ancestral"),
    Sampler("lms", k.lms, None, "LMS", "lms"),
    Sampler("dpm++2s-a", k.dpmpp_2s_ancestral, None, "DPM++ 2S a", "dpmpp_2s_ancestral"),
    Sampler("dpm++sde", k.dpmpp_sde, None, "DPM++ SDE", "dpmpp_sde"),
    Sampler("dpm++2m", k.dpmpp_2m, _d("dpm++2m"), "DPM++ 2M", "dpmpp_2m"),
    Sampler("dpm++2m-sde", k.dpmpp_2m_sde, None, "DPM++ 2M SDE", "dpmpp_2m_sde"),
    Sampler("dpm++2m-sde-heun", k.dpmpp_2m_sde_heun, None, "DPM++ 2M SDE Heun", None),
    Sampler("dpm++3m-sde", k.dpmpp_3m_sde, None, "DPM++ 3M SDE", "dpmpp_3m_sde"),
    Sampler("dpm-fast", k.dpm_fast, None, "DPM fast", "dpm_fast"),
    Sampler("dpm-adaptive", k.dpm_adaptive, None, "DPM adaptive", "dpm_adaptive"),
    Sampler("ipndm", k.ipndm, None, None, "ipndm"),
    Sampler("deis", k.deis, None, None, "deis"),
    Sampler("unipc-bh1", k.unipc_bh1, None, None, "uni_pc"),
    Sampler("res-multistep", k.res_multistep, None, None, "res_multistep"),
    Sampler("res-multistep-cfg++", k.res_multistep_cfg_pp, None, None, "res_multistep_cfg_pp"),
    Sampler("er-sde", k.er_sde, None, None, "er_sde"),
    Sampler("euler-cfg++", k.euler_cfg_pp, None, None, "euler_cfg_pp"),
    Sampler("dpm++2m-cfg++", k.dpmpp_2m_cfg_pp, None, None, "dpmpp_2m_cfg_pp"),
    Sampler("ddim-cfg++", k.ddim_cfg_pp, None, "DDIM CFG++", None),
    Sampler("euler-a-cfg++", k.euler_ancestral_cfg_pp, None, None, "euler_ancestral_cfg_pp"),
    Sampler("gradient-estimation", k.gradient_estimation, None, None, "gradient_estimation"),
    Sampler("gradient-estimation-cfg++", k.gradient_estimation_cfg_pp, None, None, "gradient_estimation_cfg_pp"),
    Sampler("restart", k.restart, None, "Restart", None),
    Sampler("tcd", k.tcd, None, None, None, ("TCD",)),
    Sampler("lcm", k.lcm, None, "LCM", "lcm"),
    Sampler("ddpm", k.ddpm, _d("ddpm"), None, "ddpm"),
    Sampler("ddim", None, _d("ddim"), "DDIM", "ddim"),
    Sampler("pndm", None, _d("pndm"), "PLMS", None),
    Sampler("unipc", k.unipc, _d("unipc"), "UniPC", "uni_pc_bh2"),
    Sampler("dpm++2m-karras", None, _d("dpm++2m-karras"), None, None),
]
# A1111's default schedule of its k-diffusion samplers (modules/sd_samplers_kdiffusion.py), where a PNG says
# "Automatic"; the others take the model's own sigmas (its Uniform)
A1111_DEFAULT = {"dpm++2m": "karras", "dpm++sde": "karras", "dpm++2m-sde": "exponential", "dpm2": "karras",
                 "dpm++2m-sde-heun": "exponential", "dpm++2s-a": "karras", "dpm++3m-sde": "exponential",
                 "dpm2-a": "karras", "restart": "karras"}
# A1111's samplers that step over timesteps and ignore `Schedule type:` (sd_samplers_timesteps.py)
A1111_TIMESTEP = ("DDIM", "DDIM CFG++", "PLMS", "UniPC")
BY_NAME = {s.name: s for s in SAMPLERS}

# gen's schedule name -> (A1111's label, ComfyUI's name)
SCHEDULES = {
    "automatic": ("Automatic", None), "uniform": ("Uniform", None), "normal": ("Normal", "normal"),
    "karras": ("Karras", "karras"), "exponential": ("Exponential", "exponential"),
    "polyexponential": ("Polyexponential", None), "sgm_uniform": ("SGM Uniform", "sgm_uniform"),
    "kl_optimal": ("KL Optimal", "kl_optimal"), "align_your_steps": ("Align Your Steps", None),
    "align_your_steps_comfyui": (None, None),  # ComfyUI's AlignYourStepsScheduler node, not a KSampler name
    "simple": ("Simple", "simple"), "ddim_uniform": ("DDIM", "ddim_uniform"), "beta": ("Beta", "beta"),
    "linear_quadratic": (None, "linear_quadratic"), "lcm": (None, None),
    "leading": (None, None), "trailing": (None, None), "linspace": (None, None),
}
SPACINGS = ("leading", "trailing", "linspace")  # diffusers' timestep_spacing, on the model's own scheduler


def _key(name: str) -> str:
    return name.strip().lower().replace(" ", "_").replace("-", "_")


def _index(pairs) -> dict[str, str]:
    out = {}
    for gen_name, others in pairs:
        for n in (gen_name, *others):
            if n:
                out.setdefault(_key(n), gen_name)
    return out


_SAMPLER_INDEX = _index((s.name, (s.a1111, s.comfy, *s.aliases)) for s in SAMPLERS)
_SCHEDULE_INDEX = _index((n, labels) for n, labels in SCHEDULES.items()) | {"sgm": "sgm_uniform",
                                                                            "ays": "align_your_steps"}


def _unknown(what: str, name: str, names) -> GenError:
    near = difflib.get_close_matches(name, sorted(names), n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(near)}?" if near else ""
    return GenError(f"unknown {what} {name!r}{hint} (`gen sample --list-samplers` lists them all)")


def schedule(name: str | None) -> str:
    """gen's schedule name for any of gen's, A1111's or ComfyUI's names (None: automatic)."""
    if name is None:
        return "automatic"
    found = _SCHEDULE_INDEX.get(_key(name))
    if found is None:
        labels = [x for n, labels in SCHEDULES.items() for x in (n, *labels) if x]
        raise _unknown("schedule", name, labels)
    return found


def sampler(name: str, schedule_name: str | None = None) -> tuple[Sampler, str]:
    """(the Sampler, gen's schedule name) for any of gen's, A1111's or ComfyUI's sampler names, A1111's old
    combined ones ("DPM++ 2M SDE Karras") included, and an optional schedule name."""
    found = _SAMPLER_INDEX.get(_key(name))
    if found is None:
        for label, sched in (("karras", "karras"), ("exponential", "exponential")):
            base = _key(name).removesuffix("_" + label)
            if base != _key(name) and base in _SAMPLER_INDEX:
                found, schedule_name = _SAMPLER_INDEX[base], schedule_name or sched
                break
    if found is None:
        raise _unknown("sampler", name, [x for s in SAMPLERS for x in (s.name, s.a1111, s.comfy, *s.aliases) if x])
    return BY_NAME[found], schedule(schedule_name)


def check(s: Sampler, schedule_name: str, kind: str) -> None:
    """A one-line GenError where a sampler or schedule cannot serve this formulation."""
    if kind not in s.kinds:
        able = ", ".join(x.name for x in SAMPLERS if kind in x.kinds)
        raise GenError(f"sampler {s.name!r} cannot sample {kind} models (it serves {', '.join(s.kinds)} models); "
                       f"samplers for this model: {able}")
    if schedule_name != "automatic" and s.fn is None:
        raise GenError(f"sampler {s.name!r} runs only on the model's own schedule (a diffusers scheduler); leave "
                       f"--scheduler out, or pick a sampler that takes schedules (euler, dpm++2m, dpm++2m-sde, ...)")
    if kind == "flow" and (schedule_name in SPACINGS or schedule_name in schedules.VP_ONLY):
        raise GenError(f"schedule {schedule_name!r} is for DDPM models; flow models take: "
                       + ", ".join(n for n in SCHEDULES if n not in SPACINGS and n not in schedules.VP_ONLY))


def table() -> str:
    """The `gen sample --list-samplers` table."""
    rows = [("sampler", "A1111", "ComfyUI", "other names", "formulations")]
    rows += [(s.name, s.a1111 or "-", s.comfy or "-", ", ".join(s.aliases) or "-", ", ".join(s.kinds))
             for s in SAMPLERS]
    rows += [("", "", "", "", ""), ("schedule", "A1111", "ComfyUI", "", "formulations")]
    rows += [(n, a or "-", c or "-", "", "ddpm" if n in SPACINGS or n in schedules.VP_ONLY else "ddpm, flow")
             for n, (a, c) in SCHEDULES.items()]
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def a1111_fields(name: str, schedule_name: str | None, formulation, base_config: dict | None = None) -> dict:
    """`Sampler:` and, where A1111 reads one, `Schedule type:` (modules/sd_schedulers.py labels) for a run: the
    named schedules by their labels; the model's own schedule on a diffusers scheduler as gen configures it:
    Karras/Exponential/Beta sigmas by name, evenly spaced timesteps as Uniform (SGM Uniform where spacing is
    trailing), a flow model's shifted linear sigmas as Simple. DDPM is A1111's DDIM at `Eta DDIM: 1`."""
    from gen.samplers import make_scheduler

    s, sched = sampler(name, schedule_name)
    check(s, sched, formulation.kind)
    label = "DDIM" if s.name == "ddpm" else s.a1111 or ("DPM++ 2M" if s.name == "dpm++2m-karras" else s.name)
    fields = {"Sampler": label, **({"Eta DDIM": 1} if s.name == "ddpm" else {})}
    if label in A1111_TIMESTEP:
        return fields
    if sched not in ("automatic", *SPACINGS):
        return fields | ({"Schedule type": SCHEDULES[sched][0]} if SCHEDULES[sched][0] else {})
    diffusers_name = (s.diffusers or {}).get(formulation.kind) or ("euler" if formulation.kind == "ddpm" else
                                                                    "flow-euler")
    config = make_scheduler(diffusers_name, formulation, base_config).config
    spacing = sched if sched in SPACINGS else config.get("timestep_spacing")
    flagged = [text for key, text in (("use_karras_sigmas", "Karras"), ("use_exponential_sigmas", "Exponential"),
                                      ("use_beta_sigmas", "Beta")) if config.get(key)]
    even = "Simple" if formulation.kind == "flow" else "SGM Uniform" if spacing == "trailing" else "Uniform"
    return fields | {"Schedule type": flagged[0] if flagged else even}


def recorded(name: str, schedule_name: str | None, formulation, base_config: dict | None = None):
    """(sampler, schedule, A1111 fields) a recipe records for a run given `name` and `schedule_name`: A1111's or
    ComfyUI's names become gen's (their "automatic" schedule: the model's own, None)."""
    s, sched = sampler(name, schedule_name)
    if name not in (s.name, *s.aliases, *(s.diffusers or {}).values()):
        name, schedule_name = s.name, None if sched == "automatic" else sched
    return name, schedule_name, a1111_fields(name, schedule_name, formulation, base_config)


# A1111 runs "DDIM CFG++" at its CFG scale / 12.5 (sd_samplers_timesteps_impl.ddim_cfgpp sets the denoiser's
# cond_scale_miltiplier to 1 / 12.5), so that the scales its users know (about 7) become CFG++'s (about 0.5); gen's
# guidance is CFG++'s own scale, and a PNG's or an API request's "CFG scale" is A1111's
A1111_CFG_DIVISOR = {"DDIM CFG++": 12.5}


def a1111_guidance(label: str | None, cfg_scale: float | None) -> float | None:
    """gen's guidance scale for A1111's `CFG scale` under A1111's sampler `label`."""
    return None if cfg_scale is None else cfg_scale / A1111_CFG_DIVISOR.get(label, 1)


def from_a1111(label: str, schedule_label: str | None, eta_ddim: float, kind: str) -> tuple[str, str]:
    """(gen's sampler, gen's schedule) that run what A1111 runs for a PNG's `Sampler:` / `Schedule type:` / `Eta
    DDIM:` (old names such as "DPM++ 2M Karras" carry the schedule, as before A1111 1.9)."""
    try:
        s, sched = sampler(label, None if schedule_label in (None, "", "Automatic") else schedule_label)
    except GenError as e:
        raise GenError(f"the recipe's {e}; pass --sampler NAME and --scheduler NAME") from None
    if s.a1111 in A1111_TIMESTEP:
        return ("ddpm" if s.name == "ddim" and eta_ddim == 1 else s.name), "automatic"
    if sched == "automatic":
        sched = A1111_DEFAULT.get(s.name, "uniform")
    check(s, sched, kind)
    return s.name, sched
