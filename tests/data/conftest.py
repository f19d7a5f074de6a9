"""A small real dataset written once per session by `merv-fast data synth`'s code, plus broken files next to it."""

import json
from pathlib import Path

import pytest

CONV = [{"from": "human", "value": "<video>\nWhat is happening in the video?"},
        {"from": "gpt", "value": "A man is playing a guitar."}]

# name -> how the broken file is made (relative to the media root), and its medium
BROKEN_VIDEOS = ["broken/truncated.mp4", "broken/zero.mp4", "broken/text.mp4", "broken/missing.mp4",
                 "broken/a_directory.mp4", "broken/random.webm"]
BROKEN_IMAGES = ["broken/corrupt.jpg"]


@pytest.fixture(scope="session")
def synth_dataset(tmp_path_factory) -> dict:
    """{"root": Path, "good": [entries], "broken": [entries], "json": Path (good + broken, good first)}."""
    from merv_fast.data.synth import synthesize

    root = tmp_path_factory.mktemp("synth")
    info = synthesize(root, videos=5, images=4, texts=2, seed=0)
    good = json.loads(Path(info["json"]).read_text())
    broken_dir = root / "broken"
    broken_dir.mkdir()
    source = root / next(e["video"] for e in good if e.get("video", "").endswith(".mp4"))
    data = source.read_bytes()
    (broken_dir / "truncated.mp4").write_bytes(data[: len(data) // 3])
    (broken_dir / "zero.mp4").write_bytes(b"")
    (broken_dir / "text.mp4").write_text("this is not a video\n" * 20)
    (broken_dir / "a_directory.mp4").mkdir()
    (broken_dir / "random.webm").write_bytes(bytes((i * 7919 + 13) % 251 for i in range(4096)))
    image = root / next(e["image"] for e in good if e.get("image", "").endswith(".jpg"))
    (broken_dir / "corrupt.jpg").write_bytes(image.read_bytes()[:40] + b"\x00" * 200)
    broken = [{"id": f"bad_{Path(p).stem}", "video": p, "conversations": CONV} for p in BROKEN_VIDEOS]
    broken += [{"id": f"bad_{Path(p).stem}", "image": p, "conversations": CONV} for p in BROKEN_IMAGES]
    json_path = root / "with_broken.json"
    json_path.write_text(json.dumps(good + broken))
    return {"root": root, "good": good, "broken": broken, "json": json_path, "good_json": Path(info["json"])}
