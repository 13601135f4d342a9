"""`python -m segjax.classical` end to end: every method run as a subprocess on a small
synthetic PNG whose regions are known, plus the command's error handling."""
import concurrent.futures
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from segjax.classical import __main__ as cli

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HEIGHT, WIDTH = 40, 48
# Background, a rectangle inside it and the right half: far apart in BT.601 gray (37, 101, 214),
# channel mean (57, 103, 197) and colour, so each method has a clear answer.
COLORS = np.array([[20, 30, 120], [200, 60, 50], [230, 220, 140]])
RECT_SEED, BACKGROUND_SEEDS = "20,12", "2,2;20,40"

# method -> (extra arguments, expected label of each synthetic region, whether the label ids
# themselves are defined (else labels are compared up to a one-to-one renaming), least agreement).
CASES = {
    # The bright right half against the rest; classes numbered dark to bright.
    "otsu": ([], [0, 0, 1], True, 1.0),
    "multi_otsu": (["--classes", "3"], [0, 1, 2], True, 1.0),
    "kmeans": (["--k", "3", "--seed", "1"], [0, 1, 2], False, 1.0),
    # Downscaled to 20x24 and upsampled back: region edges fall on even pixels, so exact.
    "mean_shift": (["--max_size", "24"], [0, 1, 2], False, 1.0),
    "region_growing": (["--seeds", RECT_SEED], [0, 1, 0], True, 1.0),
    # Raster order of first pixel: background, right half, rectangle.
    "split_merge": ([], [0, 2, 1], True, 1.0),
    # Downscaled to 13x16: the cut between the halves is the balanced, weakly linked one.
    "normalized_cut": (["--segments", "2", "--max_size", "16"], [0, 0, 1], True, 1.0),
    "min_cut": (["--foreground", RECT_SEED, "--background", BACKGROUND_SEEDS], [0, 1, 0], True,
                1.0),
    # Pixels next to an edge may fall in either basin.
    "watershed": ([], [0, 1, 2], False, 0.99),
}
# Felzenszwalb over-segments; each of its segments must lie (almost) inside one region.
FELZENSZWALB_PURITY = 0.95


def _regions() -> np.ndarray:
  regions = np.zeros((HEIGHT, WIDTH), np.int64)
  regions[:, WIDTH // 2:] = 2
  regions[8:32, 6:18] = 1
  return regions


def _image() -> np.ndarray:
  noise = np.random.default_rng(0).normal(0, 5, (HEIGHT, WIDTH, 3))
  return np.clip(np.round(COLORS[_regions()] + noise), 0, 255).astype(np.uint8)


def _command(method, *args):
  return [sys.executable, "-m", "segjax.classical", method, *args]


def _run(command):
  # Single-threaded BLAS: the commands run side by side on a small machine, where oversubscribed
  # OpenBLAS threads slow the eigen-solves down many times over.
  env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
  return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
  """Writes the image, runs every command (four at a time) and returns (paths, results)."""
  root = tmp_path_factory.mktemp("classical_cli")
  image_path, out = str(root / "synthetic.png"), str(root / "out")
  Image.fromarray(_image()).save(image_path)
  io = ["--input", image_path, "--output", out]
  commands = {method: _command(method, *io, *case[0]) for method, case in CASES.items()}
  commands.update({
      "felzenszwalb": _command("felzenszwalb", *io),
      # One segment per pixel: more labels than uint8 holds.
      "many_labels": _command("felzenszwalb", "--input", image_path, "--output",
                              str(root / "many"), "--scale", "1", "--sigma", "0",
                              "--min_size", "0"),
      "missing": _command("otsu", "--input", str(root / "nowhere.png"), "--output", out),
  })
  with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
    results = dict(zip(commands, pool.map(_run, commands.values())))
  return {"image": image_path, "out": out, "root": str(root)}, results


def _outputs(result, method, out):
  """(labels, overlay) that a run of `method` wrote to `out`, after checking its exit status and
  summary line."""
  assert result.returncode == 0, result.stderr[-3000:]
  labels_path = os.path.join(out, f"synthetic_{method}_labels.png")
  overlay_path = os.path.join(out, f"synthetic_{method}_overlay.png")
  labels = np.asarray(Image.open(labels_path)).astype(np.int64)
  overlay = Image.open(overlay_path)
  count = len(np.unique(labels))
  assert result.stdout.strip() == f"{method}: {count} regions -> {labels_path}, {overlay_path}"
  assert labels.shape == (HEIGHT, WIDTH)
  assert overlay.mode == "RGB" and overlay.size == (WIDTH, HEIGHT)
  return labels, np.asarray(overlay)


def _check_overlay(overlay, labels, image):
  """Boundaries white; elsewhere the 50/50 blend with one colour per label."""
  boundary = np.zeros(labels.shape, bool)
  boundary[:, :-1] |= labels[:, :-1] != labels[:, 1:]
  boundary[:-1] |= labels[:-1] != labels[1:]
  assert np.all(overlay[boundary] == 255)
  # colour = 2 * overlay - image up to the blend's rounding (+-1).
  colour = 2 * overlay.astype(np.int64) - image
  for label in np.unique(labels):
    inside = colour[(labels == label) & ~boundary]
    if len(inside) == 0:  # A region made of boundary pixels only.
      continue
    assert np.all(inside.max(axis=0) - inside.min(axis=0) <= 2), label


def _matched_agreement(labels, truth) -> float:
  """Fraction of pixels on which labels equal truth, each label renamed to the truth class it
  covers most; that renaming must be one-to-one onto the truth classes."""
  table = np.zeros((truth.max() + 1, labels.max() + 1), np.int64)
  np.add.at(table, (truth.ravel(), labels.ravel()), 1)
  used = table.sum(axis=0) > 0
  assert sorted(table.argmax(axis=0)[used].tolist()) == list(range(truth.max() + 1)), table
  return table.max(axis=0).sum() / labels.size


@pytest.mark.parametrize("method", sorted(CASES))
def test_method_recovers_regions(workspace, method):
  paths, results = workspace
  labels, overlay = _outputs(results[method], method, paths["out"])
  _, expected, ids_defined, least = CASES[method]
  truth = np.asarray(expected)[_regions()]
  if ids_defined:
    np.testing.assert_array_equal(labels, truth)
  else:
    assert _matched_agreement(labels, truth) >= least
  _check_overlay(overlay, labels, _image())


def test_felzenszwalb_segments_lie_inside_regions(workspace):
  paths, results = workspace
  labels, overlay = _outputs(results["felzenszwalb"], "felzenszwalb", paths["out"])
  table = np.zeros((3, labels.max() + 1), np.int64)
  np.add.at(table, (_regions().ravel(), labels.ravel()), 1)
  assert np.all(table.max(axis=0) >= FELZENSZWALB_PURITY * table.sum(axis=0)), table
  _check_overlay(overlay, labels, _image())


def test_more_than_255_labels_are_written_as_uint16(workspace):
  paths, results = workspace
  out = os.path.join(paths["root"], "many")
  labels, _ = _outputs(results["many_labels"], "felzenszwalb", out)
  path = os.path.join(out, "synthetic_felzenszwalb_labels.png")
  assert labels.max() > 255 and Image.open(path).mode.startswith("I")


def test_missing_input_is_one_line_error(workspace):
  result = workspace[1]["missing"]
  assert result.returncode == 2 and result.stdout == ""
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(f"{cli.PROG}: error:"), result.stderr
  assert "nowhere.png" in lines[0]


def _exit(argv, capsys):
  """(exit status, stderr) of the command's main run in this process."""
  with pytest.raises(SystemExit) as exit_info:
    cli.main(argv)
  return exit_info.value.code, capsys.readouterr().err


def test_corrupt_input_and_rejected_seed_are_one_line_errors(workspace, tmp_path, capsys):
  paths, _ = workspace
  corrupt = tmp_path / "corrupt.png"
  corrupt.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
  out = str(tmp_path / "out")
  for argv, needle in [(["otsu", "--input", str(corrupt)], "corrupt.png"),
                       (["region_growing", "--input", paths["image"], "--seeds", "100,3"],
                        "outside the 40x48 image")]:
    code, err = _exit([*argv, "--output", out], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{cli.PROG}: error:") and needle in lines[0]
  assert not os.path.exists(out)


@pytest.mark.parametrize("argv,needle", [
    (["snakes"], "invalid choice: 'snakes'"),
    (["kmeans", "--k", "0"], "argument --k: expected an integer >= 1"),
    (["region_growing", "--seeds", "3,4,5"], "argument --seeds: expected integer points"),
    (["watershed", "--connectivity", "4"], "argument --connectivity: invalid choice"),
    (["otsu", "--input", "x.png"], "the following arguments are required: --output"),
])
def test_bad_arguments_are_usage_errors(argv, needle, capsys):
  io = [] if "--input" in argv else ["--input", "x.png", "--output", "out"]
  code, err = _exit([*argv, *io], capsys)
  assert code == 2 and err.startswith(f"usage: {cli.PROG}") and needle in err, err


def test_flags_are_spelled_as_absl_flags():
  """One flag style for every command: underscores inside names (as train.py's absl flags),
  and a boolean turned off by --no<name>."""
  parser = cli.build_parser()
  subparsers = next(a for a in parser._actions if a.dest == "method").choices
  flags = {option for sub in subparsers.values() for action in sub._actions
           for option in action.option_strings if option.startswith("--")}
  assert "--max_size" in flags and not [f for f in flags if "-" in f[2:]], sorted(flags)
  io = ["--input", "x.png", "--output", "out"]
  assert parser.parse_args(["region_growing", *io]).adaptive is True
  assert parser.parse_args(["region_growing", *io, "--noadaptive"]).adaptive is False
  args = parser.parse_args(["normalized_cut", *io, "--max_size=12", "--sigma_feature", "0.5"])
  assert args.max_size == 12 and args.sigma_feature == 0.5
