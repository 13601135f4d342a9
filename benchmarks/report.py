"""The one output format of the benchmark scripts: a markdown table on stdout and, with
`--json PATH`, the same cells in a JSON file that benchmarks/run.py turns into RESULTS.md.

JSON: {"benchmark": str, "setup": str, "columns": [str], "rows": [[str]], "notes": [str]}.
Cells are already formatted, exactly as printed.
"""
import argparse
import importlib.metadata
import json
import os
import platform
import resource
import sys
import time
from typing import Dict, Iterable, List, Optional, Sequence

_PACKAGES = ("jax", "jaxlib", "torch", "torchvision")


def _cells(cells: Iterable, width: int, what: str) -> List[str]:
  """The cells as strings, checked to number `width`."""
  cells = [str(cell) for cell in cells]
  if len(cells) != width:
    raise ValueError(f"{what} has {len(cells)} cells but the table has {width} columns: "
                     f"{cells}; give one cell per column.")
  return cells


def _line(cells: Sequence[str]) -> str:
  """One markdown table line; a '|' inside a cell is escaped so it stays in its cell."""
  return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"


def markdown(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
  """The table as GitHub markdown: header, separator, one line per row."""
  columns = [str(column) for column in columns]
  lines = [_line(columns), _line(["---"] * len(columns))]
  lines += [_line(_cells(row, len(columns), f"row {i}")) for i, row in enumerate(rows)]
  return "\n".join(lines)


class Table:
  """Rows of formatted cells, each printed as a markdown line as soon as it is measured
  (long runs show progress); `rows` then feeds `write_json`. Prints the header on creation."""

  def __init__(self, columns: Sequence[str]):
    self.columns = [str(column) for column in columns]
    self.rows: List[List[str]] = []
    print(markdown(self.columns, []), flush=True)

  def add(self, *cells) -> None:
    """Adds and prints one row; cells are formatted by the caller (str() is applied)."""
    row = _cells(cells, len(self.columns), f"row {len(self.rows)}")
    self.rows.append(row)
    print(_line(row), flush=True)

  def finish(self, json_path: Optional[str], *, benchmark: str, setup: str,
             notes: Sequence[str] = ()) -> None:
    """Prints the notes under the table and, where json_path is given, writes it all there."""
    if notes:
      print("\n".join(["", *notes]))
    if json_path:
      write_json(json_path, benchmark=benchmark, setup=setup, columns=self.columns,
                 rows=self.rows, notes=notes)


def _json_path(path: str) -> str:
  """`--json`'s type: the path, once its folder is known to exist."""
  folder = os.path.dirname(os.path.abspath(path))
  if not os.path.isdir(folder):
    raise argparse.ArgumentTypeError(f"folder {folder} does not exist; create it or give "
                                     "another path")
  return path


def add_json_argument(parser: argparse.ArgumentParser) -> None:
  """Adds `--json PATH` (checked before the run, not after it) to a script's parser."""
  parser.add_argument("--json", metavar="PATH", type=_json_path,
                      help="also write the table and its setup here as JSON (benchmarks/report.py)")


def write_json(path: str, *, benchmark: str, setup: str, columns: Sequence[str],
               rows: Sequence[Sequence[str]], notes: Sequence[str] = ()) -> None:
  """Writes one benchmark's table (see the module docstring for the keys)."""
  columns = [str(column) for column in columns]
  record = {"benchmark": benchmark, "setup": setup, "columns": columns,
            "rows": [_cells(row, len(columns), f"row {i}") for i, row in enumerate(rows)],
            "notes": [str(note) for note in notes]}
  with open(path, "w") as f:
    json.dump(record, f, indent=1)
    f.write("\n")


def _proc_field(path: str, key: str) -> Optional[str]:
  """The value of the first `key: value` line of a /proc file, None where there is none."""
  try:
    with open(path) as f:
      for line in f:
        name, _, value = line.partition(":")
        if name.strip() == key:
          return value.strip()
  except OSError:
    pass
  return None


def machine() -> Dict[str, object]:
  """CPU, memory, Python and framework versions of this machine, without importing the
  frameworks (versions come from the installed package metadata; None: not installed)."""
  mem_kib = _proc_field("/proc/meminfo", "MemTotal")
  info = {"cpu": _proc_field("/proc/cpuinfo", "model name") or platform.processor() or None,
          "cpu_count": os.cpu_count(),
          "memory_gib": round(int(mem_kib.split()[0]) / 2**20, 1) if mem_kib else None,
          "platform": platform.platform(),
          "python": sys.version.split()[0]}
  for name in _PACKAGES:
    try:
      info[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      info[name] = None
  return info


def use_train_defaults() -> str:
  """Adds configs/default.py's `xla_flags` to $XLA_FLAGS, as train.py does, so that a benchmark
  measures segjax as users train it; call before JAX starts. Returns the resulting XLA_FLAGS."""
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from configs import default
  from segjax import cli
  cli.add_xla_flags(default.get_config().xla_flags)
  return os.environ["XLA_FLAGS"]


def time_steps(step, repeats: int, warmup: int) -> List[float]:
  """Seconds of each of `repeats` calls of `step` after `warmup` untimed ones."""
  for _ in range(warmup):
    step()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    step()
    times.append(time.perf_counter() - start)
  return times


def peak_rss_gb() -> float:
  """This process's peak resident set size so far, GB (ru_maxrss is KiB on Linux)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
