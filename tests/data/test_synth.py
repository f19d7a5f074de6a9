"""`data synth`: real clips and images in every odd-but-valid shape, LLaVA-format JSON, deterministic for a seed."""

import json

import av
import numpy as np

from merv_fast.cli import main
from merv_fast.data import pyav_backend
from merv_fast.data.synth import synthesize


def _pixels(root, rel):
    info = pyav_backend.probe(root / rel)
    return pyav_backend.read_frames(root / rel, list(range(info.num_frames)))


def test_writes_every_kind_and_a_valid_json(tmp_path):
    result = synthesize(tmp_path, videos=10, images=6, texts=2, seed=0)
    entries = json.loads((tmp_path / "data.json").read_text())
    assert len(entries) == result["entries"] == 18
    assert len({e["id"] for e in entries}) == 18
    codecs, containers = set(), set()
    for rel in result["videos"]:
        with av.open(str(tmp_path / rel)) as c:
            codecs.add(c.streams.video[0].codec_context.name)
            containers.add((tmp_path / rel).suffix)
    assert {"h264", "vp9", "mjpeg"} <= codecs and {".mp4", ".webm", ".avi", ".mkv"} <= containers
    infos = [pyav_backend.probe(tmp_path / rel) for rel in result["videos"]]
    assert any(i.num_frames == 1 for i in infos) and any(1 < i.num_frames < 32 for i in infos)
    assert any((i.width, i.height) == (321, 239) for i in infos) and any(i.rotation == 90 for i in infos)
    assert len({round(i.fps, 2) for i in infos}) >= 4
    for e in entries:
        turns = e["conversations"]
        assert turns and len(turns) % 2 == 0
        assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
        media = "video" if "video" in e else "image" if "image" in e else None
        if media:
            assert turns[0]["value"].startswith(f"<{media}>\n") and (tmp_path / e[media]).is_file()
        else:
            assert "<video>" not in turns[0]["value"] and "<image>" not in turns[0]["value"]
    assert any(len(e["conversations"]) > 2 for e in entries)
    assert any("image" not in e and "video" not in e for e in entries)


def test_moving_content_not_static():
    from merv_fast.data.synth import moving_frames

    frames = moving_frames(64, 48, 8).astype(int)
    assert all(np.abs(frames[t + 1] - frames[t]).mean() > 0.5 for t in range(7))


def test_same_seed_same_data_other_seed_differs(tmp_path):
    a = synthesize(tmp_path / "a", videos=3, images=2, seed=5)
    synthesize(tmp_path / "b", videos=3, images=2, seed=5)
    c = synthesize(tmp_path / "c", videos=3, images=2, seed=6)
    assert (tmp_path / "a/data.json").read_text() == (tmp_path / "b/data.json").read_text()
    for rel in a["videos"]:
        assert np.array_equal(_pixels(tmp_path / "a", rel), _pixels(tmp_path / "b", rel))
    for rel in a["images"]:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()
    assert (tmp_path / "a/data.json").read_text() != (tmp_path / "c/data.json").read_text()
    assert not np.array_equal(_pixels(tmp_path / "a", a["videos"][0]), _pixels(tmp_path / "c", c["videos"][0]))


def test_cli(tmp_path, capsys):
    assert main(["data", "synth", "--out", str(tmp_path), "--videos", "2", "--images", "1", "--seed", "3"]) == 0
    assert "wrote 2 videos" in capsys.readouterr().out
    assert len(json.loads((tmp_path / "data.json").read_text())) == 5
