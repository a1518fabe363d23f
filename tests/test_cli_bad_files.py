"""Every unusable input or output gives one `Error:` line, exit code 1 and no traceback."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from flasma_ws.cli import app

runner = CliRunner()
Builder = Callable[[Path], Path]  # writes a bad input under a folder, returns its path


def npy(name: str, array: np.ndarray) -> Builder:
    def build(folder: Path) -> Path:
        np.save(folder / name, array)
        return folder / name

    return build


def raw_file(name: str, content: bytes) -> Builder:
    def build(folder: Path) -> Path:
        (folder / name).write_bytes(content)
        return folder / name

    return build


def fvecs(name: str, dims: list[int], values_per_record: int) -> Builder:
    """Records whose int32 headers say `dims` but each carry `values_per_record` floats."""

    def build(folder: Path) -> Path:
        with open(folder / name, "wb") as fh:
            for d in dims:
                fh.write(np.int32(d).tobytes())
                fh.write(np.ones(values_per_record, dtype="<f4").tobytes())
        return folder / name

    return build


def npz(name: str, compressed: bool = False, **arrays: np.ndarray) -> Builder:
    def build(folder: Path) -> Path:
        (np.savez_compressed if compressed else np.savez)(folder / name, **arrays)
        return folder / name

    return build


def hdf5(name: str, **datasets: np.ndarray) -> Builder:
    def build(folder: Path) -> Path:
        with h5py.File(folder / name, "w") as f:
            for key, data in datasets.items():
                f.create_dataset(key, data=data)
        return folder / name

    return build


def with_rows(shape: tuple[int, int], rows: list[int], value: float) -> np.ndarray:
    array = np.ones(shape)
    array[rows] = value
    return array


def object_array() -> np.ndarray:
    array = np.empty(2, dtype=object)
    array[:] = [np.ones(3), "text"]
    return array


ONES = np.ones((4, 5))
UNIT_WITH_NAN = with_rows((6, 3), [3], np.nan) / np.sqrt(3)  # legacy files hold unit rows
GAUSS = np.random.default_rng(0).standard_normal((12, 10))
UNIT_ROWS = GAUSS / np.linalg.norm(GAUSS, axis=1, keepdims=True)

# (id, input builder or None for a missing file, extra args, expected text in the error)
CASES: list[tuple[str, Builder | None, list[str], str]] = [
    ("missing", None, [], "does not exist; check the path"),
    ("directory", lambda folder: folder, [], "is a directory"),
    ("not-npy", raw_file("x.npy", b"hello, not numpy"), [], "is not a readable .npy file"),
    ("truncated-npy", raw_file("x.npy", b"\x93NUMPY\x01\x00"), [], "is not a readable .npy file"),
    ("legacy-no-dim", npy("x.npy", np.ones(20)), [], "1-D (a Flasma legacy file"),
    ("legacy-bad-dim", npy("x.npy", np.ones(20)), ["--dim", "7"], "not a multiple of --dim 7"),
    ("nan", npy("x.npy", with_rows((6, 3), [2], np.nan)), [], "NaN or infinite"),
    ("inf", npy("x.npy", with_rows((6, 3), [4], -np.inf)), [], "(first in row 4)"),
    ("nan-legacy", npy("x.npy", UNIT_WITH_NAN.T.ravel()), ["--dim", "3"], "row 3"),
    ("legacy-wrong-dim", npy("x.npy", UNIT_ROWS.T.ravel()), ["--dim", "6"], "pass --dim 10"),
    ("3-d", npy("x.npy", np.ones((2, 3, 4))), [], "is 3-D with shape (2, 3, 4)"),
    ("dim-mismatch", npy("x.npy", ONES), ["--dim", "6"], "dimension 5, but --dim is 6"),
    ("n-zero", npy("x.npy", np.ones((0, 5))), [], "holds no vectors"),
    ("dim-zero", npy("x.npy", np.ones((5, 0))), [], "holds no vectors"),
    ("legacy-empty", npy("x.npy", np.ones(0)), ["--dim", "4"], "holds no vectors"),
    ("complex", npy("x.npy", ONES.astype(complex)), [], "holds complex128 values"),
    ("bool", npy("x.npy", ONES.astype(bool)), [], "holds bool values"),
    ("zero-rows", npy("x.npy", with_rows((9, 3), [1, 5], 0)), [], "2 zero-norm rows (first at"),
    ("all-zero", npy("x.npy", np.zeros((3, 3))), ["--drop-zero"], "Every row"),
    ("unknown-ext", raw_file("x.csv", b"1,2,3\n"), [], "unknown extension"),
    ("key-with-npy", npy("x.npy", ONES), ["--key", "a"], "--key only applies to .npz and .hdf5"),
    ("npz-not-zip", raw_file("x.npz", b"not a zip"), [], "is not a readable .npz archive"),
    ("npz-two-arrays", npz("x.npz", a=ONES, b=ONES), [], "2 arrays ('a', 'b'); pass --key"),
    ("npz-wrong-key", npz("x.npz", a=ONES), ["--key", "z"], "no array 'z'; pass --key with"),
    ("npz-empty", npz("x.npz"), [], "holds no arrays"),
    ("npz-object", npz("x.npz", a=object_array()), [], "member 'a' is not a readable array"),
    ("npz-nan", npz("x.npz", True, a=with_rows((4, 2), [1], np.nan)), [], "(key 'a') holds NaN"),
    ("fvecs-empty", raw_file("x.fvecs", b""), [], "is empty"),
    ("fvecs-odd-size", raw_file("x.fvecs", b"\x01\x00\x00\x00\x00"), [], "not a multiple of 4"),
    ("fvecs-truncated", fvecs("x.fvecs", [4, 4], 3), [], "not a whole number of .fvecs records"),
    ("fvecs-bad-header", fvecs("x.fvecs", [-2], 1), [], "not a whole number of .fvecs records"),
    ("fvecs-mixed", fvecs("x.fvecs", [3, 3, 7], 3), [], "vector 2 declares dimension 7"),
    ("fvecs-dim", fvecs("x.fvecs", [3, 3], 3), ["--dim", "4"], "dimension 3, but --dim is 4"),
    ("hdf5-not-hdf5", raw_file("x.hdf5", b"nope"), [], "is not a readable HDF5 file"),
    (
        "hdf5-no-train",
        hdf5("x.hdf5", base=ONES),
        [],
        "no dataset 'train'; pass --key with one of 'base'",
    ),
    ("hdf5-3d", hdf5("x.hdf5", train=np.ones((2, 2, 2))), [], "is 3-D"),
]


@pytest.mark.parametrize(
    ("build", "args", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_bad_input_is_one_line_error(
    tmp_path: Path, build: Builder | None, args: list[str], expected: str
) -> None:
    source = build(tmp_path) if build is not None else tmp_path / "nowhere.npy"
    out = tmp_path / "out" / "result.npy"
    out.parent.mkdir()
    result = runner.invoke(app, ["convert", str(source), str(out), *args])
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit)  # exited on purpose, not crashed
    assert "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    assert expected in lines[0]
    assert not out.exists() and list(out.parent.iterdir()) == []  # nothing half-written


@pytest.mark.parametrize(
    ("out_name", "expected"),
    [
        ("exists.npy", "already exists; pass --force"),
        ("result.txt", "does not end in .npy"),
        ("no-such-folder/result.npy", "does not exist; create it first"),
        ("folder.npy", "is a directory"),
    ],
)
def test_bad_output_is_refused_before_reading(tmp_path: Path, out_name: str, expected: str) -> None:
    (tmp_path / "exists.npy").write_bytes(b"keep me")
    (tmp_path / "folder.npy").mkdir()
    # The input is missing too: the output is checked first, before any expensive read.
    result = runner.invoke(
        app, ["convert", str(tmp_path / "nowhere.npy"), str(tmp_path / out_name)]
    )
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], result.output
    assert (tmp_path / "exists.npy").read_bytes() == b"keep me"


def test_bad_option_values_are_usage_errors(tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", ONES)
    for args in (["--dim", "0"], ["--to", "sideways"]):
        result = runner.invoke(
            app, ["convert", str(tmp_path / "x.npy"), str(tmp_path / "o.npy"), *args]
        )
        assert result.exit_code == 2, result.output
        assert "Traceback" not in result.output
    assert not (tmp_path / "o.npy").exists()
