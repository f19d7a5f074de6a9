"""The release's visual-path variants as data: its architecture specifier and its fusion names, parsed once.

Architecture specifier (`visual.arch`, the release's `arch_specifier`): `[no-align+]<pooling>[+frameN]+<projector>`,
read as the release reads it (merv/models/vidlms/merv.py:89-150):
- `no-align`: the model needs no separate `align` stage before finetuning (merv.py:399-402); nothing else changes;
- pooling, per encoder, before the projector: `3davg` (AdaptiveAvgPool3d to (T', H', W')), `avg` (AdaptiveAvgPool2d
  per frame), `attntv` (a cross-attention pooler with H'*W' learned queries per frame), `conv` (a C-Abstractor:
  RegStage, 2-D adaptive pooling, RegStage, per frame), `3dconv` (Conv3d k=3 then AdaptiveAvgPool3d); no pooling
  keyword: every token of a single encoder is projected (the release cannot run that with several encoders);
- `frameN` (3davg and 3dconv only): T' = time steps // N;
- projector: `linear`, `gelu-mlp` (Linear, GELU, Linear), `fused-gelu-mlp` (Linear to 4x, GELU, Linear, GELU,
  Linear), `none` (identity).

Fusion (`visual.fusion`, the release's `feature_fusion`): how the encoders' projected tokens P_e become one sequence
(merv.py:209-227 builds it, merv.py:597-612 runs it). Names the release builds but cannot run are refused with why.

Nothing here imports torch: the config validates these strings before any model is built.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


class ArchError(ValueError):
    """An architecture specifier or fusion name the release (and so this project) cannot run."""


# pooling keyword -> (learned, pools time). Learned poolers are modules with parameters; the others are fixed means,
# which the fused pooling op computes and the feature cache may store.
POOLINGS = {"3davg": (False, True), "avg": (False, False), "attntv": (True, False), "conv": (True, False),
            "3dconv": (True, True)}
# projector keyword -> the MLP's layers as (input width, output width) in units of C (its input) / D (the LLM's);
# the last entry is the Linear the fused projection op computes.
PROJECTORS = {
    "linear": (("C", "D"),),
    "gelu-mlp": (("C", "D"), ("D", "D")),
    "fused-gelu-mlp": (("C", "4C"), ("4C", "D"), ("D", "D")),
    "none": (),
}
_FRAME = re.compile(r"^frame(\d+)$")

FUSIONS = ("cross_attention_avg_lq", "concat_channel", "concat_channel_ln", "concat", "first")
REFUSED_FUSIONS = {
    "query_mlp": "the release builds an MLPProjector(3072, E) for it (merv/models/vidlms/merv.py:211-212), but its "
                 "forward has no branch for it and raises NotImplementedError (merv.py:599-612)",
    "scalar": "the release builds a ScalarAdapter for it (merv/models/vidlms/merv.py:224-225), but its forward has no "
              "branch for it and raises NotImplementedError (merv.py:599-612)",
}


@dataclass(frozen=True)
class ArchSpec:
    """A parsed architecture specifier."""

    text: str
    needs_align_stage: bool  # False with `no-align`: finetuning starts from fresh projectors
    pooling: str | None  # a POOLINGS key; None: every token is projected (one encoder only)
    frame_factor: int  # frameN: T' = time steps // N (1 without it)
    projector: str  # a PROJECTORS key

    @property
    def learned_pooling(self) -> bool:
        return self.pooling is not None and POOLINGS[self.pooling][0]

    @property
    def pools_time(self) -> bool:
        return self.pooling is not None and POOLINGS[self.pooling][1]

    @property
    def projector_input_is_llm_width(self) -> bool:
        """conv and 3dconv map the encoder's width C to the LLM's D themselves; the projector then runs D -> D."""
        return self.pooling in ("conv", "3dconv")


def parse_arch(text: str) -> ArchSpec:
    """`no-align+3davg+linear` -> ArchSpec; an ArchError names what is wrong and the accepted words."""
    if not isinstance(text, str) or not text:
        raise ArchError(f"visual.arch={text!r}: expected a specifier like 'no-align+3davg+linear'")
    parts = text.split("+")
    projector = parts[-1]
    if projector not in PROJECTORS:
        raise ArchError(f"visual.arch={text!r}: it must end with a projector, one of {list(PROJECTORS)}")
    rest = parts[:-1]
    needs_align = True
    if rest and rest[0] == "no-align":
        needs_align, rest = False, rest[1:]
    poolings = [p for p in rest if p in POOLINGS]
    frames = [int(m.group(1)) for p in rest if (m := _FRAME.match(p))]
    unknown = [p for p in rest if p not in POOLINGS and not _FRAME.match(p)]
    if unknown:
        raise ArchError(f"visual.arch={text!r}: unknown part(s) {unknown}; the grammar is "
                        f"[no-align+]<pooling>[+frameN]+<projector>, pooling one of {list(POOLINGS)}")
    if len(poolings) > 1:
        raise ArchError(f"visual.arch={text!r}: several poolings {poolings}; name one")
    pooling = poolings[0] if poolings else None
    if len(frames) > 1 or (frames and frames[0] < 1):
        raise ArchError(f"visual.arch={text!r}: give at most one frameN with N >= 1")
    if frames and pooling not in ("3davg", "3dconv"):
        # The release reads frameN only in its 3davg and 3dconv branches (merv.py:135-150) and ignores it
        # otherwise: refused rather than silently ignored.
        raise ArchError(f"visual.arch={text!r}: frameN applies to 3davg and 3dconv only (the release ignores it "
                        f"with {pooling or 'no pooling'})")
    if pooling is None and projector == "none":
        raise ArchError(f"visual.arch={text!r}: without pooling the release cannot build the 'none' projector "
                        f"(merv.py:100-103 keeps an Identity instance that merv.py:165-172 then calls with widths)")
    return ArchSpec(text=text, needs_align_stage=needs_align, pooling=pooling, frame_factor=frames[0] if frames else 1,
                    projector=projector)


def check_fusion(name: str) -> str:
    """The fusion name itself when the release can run it; an ArchError saying why not otherwise."""
    if name in FUSIONS:
        return name
    if name in REFUSED_FUSIONS:
        raise ArchError(f"visual.fusion={name!r} is refused: {REFUSED_FUSIONS[name]}")
    raise ArchError(f"visual.fusion={name!r}: choose one of {list(FUSIONS)}")


def output_grid(spec: ArchSpec, pool_size: tuple[int, int, int], time_steps: int,
                grid: tuple[int, int]) -> tuple[int, int, int]:
    """(T', H', W') of one encoder's resampled tokens, from the configured pool size (T', H', W' of 3davg without
    frameN), the encoder's time steps and its patch grid."""
    t_pool, h, w = pool_size
    if spec.pooling is None:
        return (time_steps, *grid)
    if spec.pools_time:
        t = t_pool // spec.frame_factor
        if t < 1:
            raise ArchError(f"visual.arch={spec.text!r}: frame{spec.frame_factor} leaves no time step of "
                            f"{t_pool}")
        return (t, h, w)
    return (time_steps, h, w)
