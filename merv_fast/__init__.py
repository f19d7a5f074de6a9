"""merv_fast: the fastest open implementation of MERV training (see README.md)."""

__version__ = "0.1.0"


def build_model(preset: str = "tiny", **kwargs):
    """Build MERV (or its single-encoder baseline) from a preset; see `merv_fast.model.merv.build_model`."""
    from merv_fast.model.merv import build_model as _build

    return _build(preset, **kwargs)


def load_pretrained(path, **kwargs):
    """A trained MERV ready to answer questions about videos (`.generate(videos, questions, ...)`), from a release run
    directory, our training run / checkpoint, or an export; see `merv_fast.eval.videolm.VideoLM.from_pretrained`."""
    from merv_fast.eval.videolm import VideoLM

    return VideoLM.from_pretrained(path, **kwargs)
