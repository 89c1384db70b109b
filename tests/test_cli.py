"""The documented CLI end to end on real data: pretrain → evaluate → index → query, and user errors as one line."""
import json
import subprocess
import sys
from pathlib import Path

import yaml

from xmodal.cli import main

ROOT = Path(__file__).resolve().parent.parent


def write_config(path: Path, manifest: Path, out: Path) -> Path:
    cfg = {
        "output_dir": str(out),
        "model": {"embed_dim": 32, "towers": {
            "image": {"kind": "cnn", "image_size": 32, "options": {"channels": [8, 16]}},
            "text": {"kind": "lstm", "context_length": 16, "options": {"embed_dim": 16, "hidden": 16}}}},
        "data": {"train": str(manifest), "train_split": "train", "eval_split": "test"},
        "train": {"batch_size": 16, "max_steps": 3, "progress": False, "log_every": 1},
        "log": {"backend": "none"},
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_pretrain_evaluate_index_query(clipart, tmp_path, capsys):
    run = tmp_path / "run"
    config = write_config(tmp_path / "c.yaml", clipart, run)
    assert main(["pretrain", "--config", str(config), "train.max_steps=4"]) == 0
    assert (run / "model.safetensors").is_file() and (run / "config.yaml").is_file()
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 4  # the override took effect
    capsys.readouterr()

    assert main(["evaluate", "--run", str(run), "--manifest", str(clipart), "--split", "test", "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert 0 <= results["text->image/R@10"] <= 1 and results["text->image/n_queries"] > 0

    assert main(["index", "--run", str(run), "--manifest", str(clipart), "--split", "test",
                 "--out", str(tmp_path / "index")]) == 0
    capsys.readouterr()
    assert main(["query", "--index", str(tmp_path / "index"), "--text", "a red car", "-k", "3", "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)
    hits = answer["hits"]
    assert answer["query"] == {"modality": "text", "value": "a red car"}
    assert [h["rank"] for h in hits] == [1, 2, 3] and all(Path(h["value"]).is_file() for h in hits)
    assert hits[0]["score"] >= hits[1]["score"] >= hits[2]["score"]


def test_bad_manifest_stops_before_training_with_row_and_field(clipart, tmp_path, capsys):
    lines = clipart.read_text().splitlines()
    header = lines[0].split(",")
    bad = tmp_path / "bad.csv"
    row = lines[1].split(",")
    row[header.index("image")] = str(tmp_path / "missing.png")
    bad.write_text("\n".join([lines[0], ",".join(row)] + lines[2:]) + "\n")
    config = write_config(tmp_path / "c.yaml", bad, tmp_path / "run")
    assert main(["pretrain", "--config", str(config), "data.train_split=null", "data.eval_split=null"]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "row 1" in err and "'image'" in err and "missing.png" in err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_train_py_has_the_same_verbs_and_reports_config_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {lr: fast}\n")
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "pretrain", "--config", str(bad)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "train.lr: expected a number" in proc.stderr and "Traceback" not in proc.stderr
