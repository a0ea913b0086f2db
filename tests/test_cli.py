import torch
from safetensors.torch import load_file

from altermoma.cli import main

TINY_TRAIN = [
    "--set",
    "train.steps=2",
    "--set",
    "data.train_scenes=4",
    "--set",
    "train.batch_size=2",
    "--set",
    "train.threads=1",
]


def test_train_twice_gives_identical_weights(tmp_path):
    for name in ("a", "b"):
        assert main(["train", "--modality", "lidar", "--out", str(tmp_path / name), *TINY_TRAIN]) == 0
    a = load_file(str(tmp_path / "a" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_user_errors_are_one_line_and_exit_2(tmp_path, capsys):
    cases = [
        ["evaluate", "--checkpoint", str(tmp_path / "missing")],
        ["train", "--modality", "lidar", "--out", str(tmp_path / "x"), "--set", "train.stepz=3"],
        ["train", "--modality", "lidar", "--out", str(tmp_path / "x"), "--preset", "huge"],
        ["prune", "--checkpoint", str(tmp_path / "missing"), "--out", str(tmp_path / "p"), "--target-gflops", "1.5"],
        ["prune", "--checkpoint", str(tmp_path / "missing"), "--out", str(tmp_path / "p"), "--target-gflops", "0.5"],
    ]
    expected = ["does not exist", "unknown config key", "unknown preset", "strictly between 0 and 1", "does not exist"]
    for argv, message in zip(cases, expected):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:") and message in err[0], err
    assert not (tmp_path / "p").exists()  # nothing written on failure


def test_the_cli_prints_the_toolkits_warnings_as_one_line(capsys):
    import sys
    import warnings

    from altermoma.cli import _one_line_warnings

    def show(message, category, filename, lineno, file=None, line=None):  # Python's default, past pytest's recorder
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))

    with _one_line_warnings(), warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = show
        warnings.warn("reactivation raised the loss", stacklevel=1)
        warnings.warn_explicit("from a library", UserWarning, "/x/site-packages/lib/mod.py", 7)
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "warning: reactivation raised the loss"
    assert err[1].startswith("/x/site-packages/lib/mod.py:7: UserWarning: from a library")
