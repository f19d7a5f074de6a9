"""`merv-fast data check`: every bad entry named (index, id, path, reason), table and JSON, exit status."""

import io
import json

from merv_fast.cli import main
from merv_fast.data.check import check_dataset, run_check

from .conftest import BROKEN_IMAGES, BROKEN_VIDEOS, CONV


def test_good_dataset_passes(synth_dataset, capsys):
    assert main(["data", "check", str(synth_dataset["good_json"]), "--media-root", str(synth_dataset["root"])]) == 0
    out = capsys.readouterr().out
    assert "all good" in out and "5 video, 4 image, 2 text" in out


def test_every_broken_file_is_named(synth_dataset, capsys):
    root, n_good = synth_dataset["root"], len(synth_dataset["good"])
    report = check_dataset(synth_dataset["json"], root, timeout_s=20)
    assert [b.path for b in report.bad] == BROKEN_VIDEOS + BROKEN_IMAGES
    assert [b.index for b in report.bad] == list(range(n_good, n_good + len(report.bad)))
    reasons = {b.path: b.reason for b in report.bad}
    assert "missing" in reasons["broken/missing.mp4"]
    assert "zero bytes" in reasons["broken/zero.mp4"]
    assert "directory" in reasons["broken/a_directory.mp4"]
    assert all(r for r in reasons.values())

    code = main(["data", "check", str(synth_dataset["json"]), "--media-root", str(root), "--timeout-s", "20"])
    out = capsys.readouterr().out
    assert code == 1
    for b in report.bad:
        assert b.id in out and b.path in out
    assert f"{len(report.bad)} bad" in out

    code = main(["data", "check", str(synth_dataset["json"]), "--media-root", str(root), "--json"])
    rows = json.loads(capsys.readouterr().out)
    assert code == 1
    assert [(r["index"], r["id"], r["path"]) for r in rows] == [(b.index, b.id, b.path) for b in report.bad]


def test_json_problems_and_escaping_paths(tmp_path, synth_dataset):
    data = [
        {"id": "fine", "conversations": CONV},
        {"id": "up", "video": "../secret.mp4", "conversations": CONV},
        {"id": "abs", "image": "/etc/passwd", "conversations": CONV},
        {"id": "noconv", "video": "x.mp4"},
        {"id": "role", "conversations": [{"from": "robot", "value": "hi"}]},
        {"conversations": CONV},
        ["not", "an", "object"],
    ]
    path = tmp_path / "d.json"
    path.write_text(json.dumps(data))
    out = io.StringIO()
    assert run_check(str(path), str(synth_dataset["root"]), out=out) == 1
    table = out.getvalue()
    report = check_dataset(path, synth_dataset["root"])
    assert [(b.index, b.id) for b in report.bad] == [(1, "up"), (2, "abs"), (3, "noconv"), (4, "role"),
                                                     (5, None), (6, None)]
    by_index = {b.index: b for b in report.bad}
    assert by_index[1].path == "../secret.mp4" and "'..'" in by_index[1].reason
    assert "absolute" in by_index[2].reason
    assert "conversations: missing key" in by_index[3].reason
    assert "conversations[0].from: unknown role 'robot'" in by_index[4].reason
    assert "id: missing key" in by_index[5].reason
    assert "7 entries" in table and "6 bad" in table


def test_unreadable_json_file(tmp_path, capsys):
    path = tmp_path / "broken.json"
    path.write_text("[{")
    assert main(["data", "check", str(path), "--media-root", str(tmp_path)]) == 1
    assert "not valid JSON" in capsys.readouterr().out
    assert main(["data", "check", str(tmp_path / "nope.json"), "--media-root", str(tmp_path), "--json"]) == 1
    assert "no such file" in json.loads(capsys.readouterr().out)[0]["reason"]


def test_symlink_escaping_the_media_root_is_named(tmp_path, synth_dataset):
    root = tmp_path / "media"
    root.mkdir()
    outside = synth_dataset["root"] / synth_dataset["good"][0]["video"]
    (root / "link.mp4").symlink_to(outside)
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"id": "sneaky", "video": "link.mp4", "conversations": CONV}]))
    (bad,) = check_dataset(path, root).bad
    assert (bad.index, bad.id, bad.path) == (0, "sneaky", "link.mp4") and "outside the media root" in bad.reason


def test_odd_but_valid_media_are_kept_with_a_warning(tmp_path, capsys, caplog):
    """An AVI whose header counts its empty index entries as frames: every sampled frame decodes, so `data check`
    passes it (a warning row, exit 0) and the dataset loads it (a logged warning, no bad sample)."""
    from merv_fast.data.dataset import VideoLLaVADataset
    from merv_fast.data.synth import VideoSpec, write_video
    from merv_fast.testing import tiny_llama_tokenizer

    write_video(tmp_path / "ms.avi", VideoSpec("ms", "mjpeg", 64, 48, 40, fps=25, frame_ms=[40, 40, 80]))
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"id": "odd", "video": "ms.avi", "conversations": CONV}]))

    assert main(["data", "check", str(path), "--media-root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "warning (kept): the header counts 2120 frames, the file holds 40" in out
    assert "all good, 1 with warnings (usable)" in out
    assert main(["data", "check", str(path), "--media-root", str(tmp_path), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["id"], r["severity"]) for r in rows] == [("odd", "warning")]

    dataset = VideoLLaVADataset(path, tmp_path, tiny_llama_tokenizer())
    with caplog.at_level("WARNING", logger="merv_fast.data"):
        sample = dataset[0]
    assert sample.index == 0 and not sample.bad_samples and tuple(sample.frames.shape[:1]) == (32,)
    assert "the header counts 2120 frames, the file holds 40; kept" in caplog.text
