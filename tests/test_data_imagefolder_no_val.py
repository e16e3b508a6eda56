"""imagefolder without val/: training without evaluation needs no val/ folder; with evaluation it
is refused in one line that names the missing folder."""

from __future__ import annotations

import json

from PIL import Image

from largebatch.cli import main


def train_only_tree(root) -> str:
    """root/train/<class>/<i>.jpg for two classes, four images each; no val/."""
    for c, name in enumerate(("cat", "dog")):
        (root / "train" / name).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (20, 20), (200 * c, 40 * i, 90)).save(root / "train" / name / f"{i}.jpg")
    return str(root)


def train_args(tmp_path, images: str, *extra: str) -> list[str]:
    return ["train", "--data", "imagefolder", "--data-dir", images, "--model", "mlp",
            "--set", "data.options.image_size=16", "--set", "data.options.workers=0", "--set", "threads=1",
            "--batch-size", "4", "--epochs", "2", "--out", str(tmp_path / "run"), "--no-progress", *extra]


def test_training_without_evaluation_needs_no_val_folder(tmp_path, capsys):
    images = train_only_tree(tmp_path / "images")
    assert main(train_args(tmp_path, images, "--set", "eval_every=0")) == 0, capsys.readouterr().err
    rows = [json.loads(r) for r in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    kinds = {r["kind"] for r in rows}
    assert "train" in kinds and "eval" not in kinds
    assert max(r["step"] for r in rows if r["kind"] == "train") == 2 * 8 // 4  # both epochs ran


def test_evaluation_without_val_folder_is_one_line_naming_it(tmp_path, capsys):
    images = train_only_tree(tmp_path / "images")
    assert main(train_args(tmp_path, images)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("largebatch: error: ")
    assert f"no directory {tmp_path / 'images' / 'val'}" in err[0] and "eval_every=0" in err[0]
