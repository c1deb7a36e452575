"""The released Show-o v1 checkpoints and the settings each one is meant to run with.

One table, read by conversion (which records a converted folder's family in its config.json), by
`Pipeline.defaults` and by the CLI. A folder that does not record a family (converted before
families existed, or an official folder under an unknown name) gets one inferred from its config:
`w_clip_vit` and `num_vq_tokens` tell every family apart except Turbo, whose checkpoints are plain
Show-o checkpoints with other weights (pass ``--family`` to `showo convert` for a local copy).

Sources of the numbers:
* Show-o: the official README commands (`inference_t2i.py`): 256 px 18 steps for text-to-image and
  16 for inpainting/extrapolation, guidance 1.75; 512 px 50 steps, guidance 5; cosine schedule.
* CLIP-ViT variants: image generation as the MAGVIT models of the same resolution; answers through
  CLIP ViT-L/14-336 (`inference_mmu.py`, the `w_clip_vit` branch).
* Show-o Turbo (SJTU-Deng-Lab, now also published as UniCMs): `inference_t2i_256.sh` /
  `inference_t2i_512.sh` of its repository run `sample_t2i.py` with guidance 0 and top-k 200 at
  2 steps, top-k 200 (256 px) or 500 (512 px) at 4 steps, and no top-k at 8 and 16 steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from .errors import ShowoConfigError

IMAGE_TASKS = ("generate", "inpaint", "extend")


@dataclass(frozen=True)
class TaskDefaults:
    steps: int
    guidance: float
    schedule: str = "cosine"
    temperature: float = 1.0
    # ((max_steps, k), …) ascending: top-k k when steps <= max_steps; no top-k above the last.
    top_k_by_steps: tuple[tuple[int, int], ...] = ()

    def top_k(self, steps: int) -> int | None:
        for max_steps, k in self.top_k_by_steps:
            if steps <= max_steps:
                return k
        return None


@dataclass(frozen=True)
class Family:
    name: str
    hub_ids: tuple[str, ...]
    resolution: int
    understanding: str  # "magvit" (image tokens in the prompt) or "clip" (CLIP ViT-L/14-336 features)
    generate: TaskDefaults
    edit: TaskDefaults  # inpaint and extend
    summary: str

    def task(self, task: str) -> TaskDefaults:
        if task not in IMAGE_TASKS:
            raise ValueError(f"unknown image task {task!r}")
        return self.generate if task == "generate" else self.edit

    @property
    def uses_clip(self) -> bool:
        return self.understanding == "clip"


_SHOWO_256 = TaskDefaults(steps=18, guidance=1.75)
_SHOWO_256_EDIT = TaskDefaults(steps=16, guidance=1.75)
_SHOWO_512 = TaskDefaults(steps=50, guidance=5.0)
# Turbo is distilled for few steps without guidance; the Turbo scripts only cover text-to-image, so
# inpainting and extension use the same settings.
_TURBO_256 = TaskDefaults(steps=4, guidance=0.0, top_k_by_steps=((4, 200),))
_TURBO_512 = TaskDefaults(steps=4, guidance=0.0, top_k_by_steps=((2, 200), (4, 500)))

FAMILIES: tuple[Family, ...] = (
    Family("show-o", ("showlab/show-o",), 256, "magvit", _SHOWO_256, _SHOWO_256_EDIT,
           "Show-o 256 px: MAGVIT tokens for images and for understanding"),
    Family("show-o-512", ("showlab/show-o-512x512",), 512, "magvit", _SHOWO_512, _SHOWO_512,
           "Show-o 512 px"),
    Family("show-o-clip", ("showlab/show-o-w-clip-vit",), 256, "clip", _SHOWO_256, _SHOWO_256_EDIT,
           "Show-o 256 px, understanding through CLIP ViT-L/14-336"),
    Family("show-o-clip-512", ("showlab/show-o-w-clip-vit-512x512",), 512, "clip", _SHOWO_512, _SHOWO_512,
           "Show-o 512 px, understanding through CLIP ViT-L/14-336"),
    Family("turbo-256", ("SJTU-Deng-Lab/Show-o-Turbo-256", "SJTU-Deng-Lab/UniCMs-256"), 256, "magvit",
           _TURBO_256, _TURBO_256, "Show-o Turbo 256 px: 2-8 steps without guidance"),
    Family("turbo-512", ("SJTU-Deng-Lab/Show-o-Turbo-512", "SJTU-Deng-Lab/UniCMs-512"), 512, "magvit",
           _TURBO_512, _TURBO_512, "Show-o Turbo 512 px: 2-8 steps without guidance"),
)
BY_NAME = {f.name: f for f in FAMILIES}


def family_named(name: str) -> Family:
    if name not in BY_NAME:
        raise ShowoConfigError(f"unknown model family {name!r}; choose one of {', '.join(BY_NAME)}")
    return BY_NAME[name]


def family_for_hub_id(repo_id: str) -> Family | None:
    """The family of a released checkpoint's Hub id (case-insensitive, as the Hub resolves ids)."""
    key = str(repo_id).strip().lower()
    for fam in FAMILIES:
        if key in (h.lower() for h in fam.hub_ids):
            return fam
    return None


def infer_family(w_clip_vit: bool, num_vq_tokens: int) -> Family:
    """The Show-o family a config describes (Turbo cannot be told apart from its config)."""
    big = num_vq_tokens >= 1024
    if w_clip_vit:
        return BY_NAME["show-o-clip-512" if big else "show-o-clip"]
    return BY_NAME["show-o-512" if big else "show-o"]


def family_of(config: Mapping[str, Any]) -> Family:
    """The family of a converted folder (its config.json): recorded, else inferred."""
    name = config.get("family")
    if name:
        return family_named(name)
    showo = config.get("showo", {})
    return infer_family(bool(showo.get("w_clip_vit", False)), int(showo.get("num_vq_tokens", 256)))


def resolve_family(source: str, w_clip_vit: bool, num_vq_tokens: int, family: str | None = None) -> Family:
    """At conversion: an explicit name, else the Hub id's family, else the one the config implies.
    Refuses a family whose understanding path contradicts the checkpoint."""
    fam = family_named(family) if family else (family_for_hub_id(source) or infer_family(w_clip_vit, num_vq_tokens))
    if fam.uses_clip != bool(w_clip_vit):
        raise ShowoConfigError(
            f"family {fam.name} {'needs' if fam.uses_clip else 'does not fit'} a w_clip_vit checkpoint, but "
            f"{source} has w_clip_vit={bool(w_clip_vit)}; pick another --family"
        )
    return fam
