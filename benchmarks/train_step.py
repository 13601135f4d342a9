"""Train-step speed, compile time and memory of segjax's semantic models against the same models
in PyTorch, each implementation in its own child process of one run.

  python benchmarks/train_step.py                       # 4 models, batch 2 x 256x256
  python benchmarks/train_step.py --models pspnet --size 512 --options --json out.json

Models, full size as `build_model(name, 21, options)` builds them: U-Net (width 64, depth 4),
FCN-8s (VGG-16), PSPNet (ResNet-50-D8) and DeepLabV3+ (ResNet-50, output stride 16). The
references are the same networks in PyTorch, layer for layer: `benchmarks/torch_models.py`
(parameter names, shapes and outputs checked against segjax in
tests/benchmarks/test_torch_models.py) and the U-Net of `benchmarks/unet_train_step.py`. Both
sides run the whole step on one fixed random
batch: forward in training mode (BatchNorm batch statistics, dropout), pixel-mean cross-entropy
(+ 0.4 x the aux head's where the model has one), backward, SGD with momentum.

Each implementation runs in a fresh child process, so its peak RSS (`ru_maxrss`, the whole
process: runtime, compiler, model, activations) is its own, and each row can have its own
XLA_FLAGS; segjax's main rows use train.py's defaults (configs/default.py's `xla_flags`).
segjax's step is jitted with the state donated; its compile time (lower + compile) is
reported apart, and XLA's own buffer estimate (arguments + outputs + temporaries) beside the
RSS. Times are the median of --repeats steps after --warmup untimed ones. PyTorch uses as many
threads as there are CPUs, eager NCHW (its default) and channels_last.

`--options` adds, for PSPNet and DeepLabV3+, the CPU options tried to close the gap to PyTorch:
each a segjax row with other XLA flags or settings, PyTorch under bfloat16 autocast beside
segjax's bfloat16 row, and the PSPNet compile time with a warm persistent compilation cache.
"""
import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

BENCHMARKS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCHMARKS)
NUM_CLASSES = 21
MODEL_OPTIONS = {"unet": {"width": 64, "depth": 4}, "fcn8s": {}, "pspnet": {},
                 "deeplabv3plus": {}}
# The options tried on this CPU: (label, XLA_FLAGS, child arguments). The main table runs
# segjax as train.py does: configs/default.py's xla_flags and model.conv_lowering "auto".
sys.path.insert(0, REPO)
from configs import default as _default  # noqa: E402

sys.path.insert(0, BENCHMARKS)
import report  # noqa: E402

DEFAULT_FLAGS = _default.get_config().xla_flags
ONEDNN = "--xla_cpu_use_onednn=true"
OPTIONS = (
    ("segjax before 2026-11-22: XLA's own convolutions (model.conv_lowering=xla), no XLA flags "
     "(YNNPACK convolutions)", "", ["--conv-lowering", "xla"]),
    ("model.conv_lowering=auto, no XLA flags (YNNPACK convolutions)", "", []),
    ("XLA's own convolutions (model.conv_lowering=xla) with the default XLA flags",
     DEFAULT_FLAGS, ["--conv-lowering", "xla"]),
    ("default + " + ONEDNN, f"{DEFAULT_FLAGS} {ONEDNN}", []),
    ("default + --xla_cpu_experimental_onednn_fusion_type=dot,eltwise,reduce",
     f"{DEFAULT_FLAGS} --xla_cpu_experimental_onednn_fusion_type=dot,eltwise,reduce", []),
    ("default + --xla_cpu_enable_fast_math=true",
     f"{DEFAULT_FLAGS} --xla_cpu_enable_fast_math=true", []),
    ("default, bfloat16 compute (model.dtype; float32 parameters)", DEFAULT_FLAGS,
     ["--dtype", "bfloat16"]),
)


def batch(size, count, seed=0, image_dtype="float32"):
  """A fixed random batch: images [count, size, size, 3] (standard-normal floats, already
  "normalized", or uint8 pixels with image_dtype "uint8") and labels [count, size, size]."""
  import numpy as np
  rng = np.random.default_rng(seed)
  if image_dtype == "uint8":
    images = rng.integers(0, 256, (count, size, size, 3), dtype=np.uint8)
  else:
    images = rng.normal(size=(count, size, size, 3)).astype(image_dtype)
  labels = rng.integers(0, NUM_CLASSES, (count, size, size)).astype(np.int32)
  return images, labels


def segjax_step(name, size, batch_size, *, options=None, dtype="float32", conv_lowering="auto",
                image_dtype="float32"):
  """segjax's train step of model `name` as this benchmark runs it: the jitted step (train state
  donated; call it as step(state, arrays, key)), the first train state, the device batch
  (`batch` of these shapes) and the model's initial variables. `options`: the model's options
  (default MODEL_OPTIONS[name])."""
  import functools

  import jax
  import jax.numpy as jnp
  import optax

  sys.path.insert(0, REPO)
  from segjax.models import build_model
  from segjax.tasks import semantic
  from segjax.training import steps
  from segjax.training.train_state import TrainState

  images, labels = batch(size, batch_size, image_dtype=image_dtype)
  options = MODEL_OPTIONS[name] if options is None else options
  model = build_model(name, NUM_CLASSES, options, dtype=dtype)
  keys = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
  variables = jax.jit(functools.partial(model.init, train=True))(keys, jnp.asarray(images[:1]))
  tx = optax.sgd(0.01, momentum=0.9)
  state = TrainState.create(variables["params"], variables.get("batch_stats", {}), tx)
  step_fn = jax.jit(functools.partial(
      steps.train_step, objective=semantic.objective(model=model, ignore_index=255), tx=tx,
      schedule=optax.constant_schedule(0.01), conv_lowering_mode=conv_lowering),
      donate_argnums=(0,))
  arrays = jax.device_put({"image": images, "label": labels})
  return step_fn, state, arrays, variables


def torch_model(name, options=None):
  """The PyTorch reference of model `name` (training mode, PyTorch's initial values) and its
  loss(outputs, labels), segjax's train-step loss. `options`: default MODEL_OPTIONS[name]."""
  sys.path.insert(0, BENCHMARKS)
  import torch_models
  options = MODEL_OPTIONS[name] if options is None else options
  if name == "unet":
    from unet_train_step import TorchUNet
    return TorchUNet(NUM_CLASSES, **options).train(), (
        lambda out, y: torch_models.loss({"out": out}, y))
  return torch_models.build(name, NUM_CLASSES, **options).train(), torch_models.loss


def child_segjax(args):
  """One segjax train step, measured in this process."""
  import jax

  if args.cache_dir:
    jax.config.update("jax_compilation_cache_dir", args.cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  step_fn, state, arrays, variables = segjax_step(args.model, args.size, args.batch,
                                                  dtype=args.dtype,
                                                  conv_lowering=args.conv_lowering)
  start = time.perf_counter()
  compiled = step_fn.lower(state, arrays, jax.random.key(2)).compile()
  compile_s = time.perf_counter() - start
  memory = compiled.memory_analysis()
  xla_gb = (memory.argument_size_in_bytes + memory.output_size_in_bytes
            + memory.temp_size_in_bytes - memory.alias_size_in_bytes) / 2**30
  holder = {"state": state}

  def step():
    holder["state"], metrics = compiled(holder["state"], arrays, jax.random.key(2))
    holder["loss"] = float(metrics["loss"])

  times = report.time_steps(step, args.repeats, args.warmup)
  params = sum(x.size for x in jax.tree.leaves(variables["params"]))
  return {"times": times, "compile_s": compile_s, "xla_gb": xla_gb, "rss_gb": report.peak_rss_gb(),
          "loss": holder["loss"], "params": params,
          "versions": f"jax {jax.__version__} on {jax.devices()[0].platform}",
          "xla_flags": os.environ.get("XLA_FLAGS", "")}


def child_torch(args):
  """The PyTorch reference's train step, measured in this process."""
  import torch

  torch.set_num_threads(os.cpu_count())
  torch.manual_seed(0)
  model, loss_fn = torch_model(args.model)
  images, labels = batch(args.size, args.batch)
  x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
  y = torch.from_numpy(labels).long()
  if args.channels_last:
    model = model.to(memory_format=torch.channels_last)
    x = x.contiguous(memory_format=torch.channels_last)
  optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
  holder = {}

  autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if args.dtype == "bfloat16"
              else contextlib.nullcontext())

  def step():
    optimizer.zero_grad(set_to_none=True)
    with autocast:
      loss = loss_fn(model(x), y)
    loss.backward()
    optimizer.step()
    holder["loss"] = float(loss.detach())

  times = report.time_steps(step, args.repeats, args.warmup)
  return {"times": times, "rss_gb": report.peak_rss_gb(), "loss": holder["loss"],
          "params": sum(p.numel() for p in model.parameters()),
          "versions": f"torch {torch.__version__} ({torch.get_num_threads()} threads)"}


def run_child(side, model, args, xla_flags=DEFAULT_FLAGS, extra=()):
  """Runs one measurement in a fresh process with these XLA_FLAGS; returns its result dict (or
  {"error": ...})."""
  env = dict(os.environ, XLA_FLAGS=xla_flags)
  with tempfile.NamedTemporaryFile(suffix=".json") as out:
    command = [sys.executable, os.path.abspath(__file__), "--child", side, "--models", model,
               "--size", str(args.size), "--batch", str(args.batch), "--repeats",
               str(args.repeats), "--warmup", str(args.warmup), "--result", out.name,
               *extra]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode:
      last = (done.stderr.strip().splitlines() or ["no output"])[-1]
      return {"error": f"exit {done.returncode}: {last[:200]}"}
    with open(out.name) as f:
      return json.load(f)


def _median(result):
  return statistics.median(result["times"]) if "times" in result else None


def _cell(value, fmt):
  return "-" if value is None else format(value, fmt)


def measure(args):
  """The main table's rows and the options table's rows (both lists of formatted cells)."""
  rows, options_rows, notes, versions = [], [], [], set()
  references = {}
  for model in args.models:
    ours = run_child("segjax", model, args)
    torch_eager = run_child("torch", model, args)
    torch_cl = run_child("torch", model, args, extra=["--channels-last"])
    references[model] = _median(torch_eager)
    for result in (ours, torch_eager, torch_cl):
      if "error" in result:
        notes.append(f"{model}: a child failed: {result['error']}")
      else:
        versions.add(result["versions"])
    if "params" in ours and "params" in torch_eager and ours["params"] != torch_eager["params"]:
      notes.append(f"{model}: parameter counts differ: segjax {ours['params']}, "
                   f"torch {torch_eager['params']}")
    s, t, c = _median(ours), _median(torch_eager), _median(torch_cl)
    params = ours.get("params", torch_eager.get("params"))
    rows.append([
        model, _cell(params and params / 1e6, ".2f"),
        _cell(s, ".3f"), _cell(s and args.batch / s, ".3f"), _cell(t, ".3f"), _cell(c, ".3f"),
        _cell(s and t and t / s, ".2f"), _cell(s and c and c / s, ".2f"),
        _cell(ours.get("compile_s"), ".1f"), _cell(ours.get("rss_gb"), ".2f"),
        _cell(ours.get("xla_gb"), ".2f"), _cell(torch_eager.get("rss_gb"), ".2f"),
        _cell(torch_cl.get("rss_gb"), ".2f")])
    print("|", " | ".join(rows[-1]), "|", flush=True)
  if args.options:
    for model in [m for m in ("pspnet", "deeplabv3plus") if m in args.models]:
      for label, flags, extra in OPTIONS:
        result = run_child("segjax", model, args, flags, extra)
        s, t = _median(result), references[model]
        options_rows.append([model, label, _cell(s, ".3f"), _cell(s and t and t / s, ".2f"),
                             _cell(result.get("compile_s"), ".1f"),
                             result.get("error", "")[:120]])
        print("|", " | ".join(options_rows[-1]), "|", flush=True)
      result = run_child("torch", model, args, extra=["--dtype", "bfloat16"])
      s, t = _median(result), references[model]
      options_rows.append([model, "(reference) PyTorch eager under torch.autocast bfloat16",
                           _cell(s, ".3f"), _cell(s and t and t / s, ".2f"), "-",
                           result.get("error", "")[:120]])
      print("|", " | ".join(options_rows[-1]), "|", flush=True)
    if "pspnet" in args.models:
      with tempfile.TemporaryDirectory() as cache:
        cold = run_child("segjax", "pspnet", args, extra=["--cache-dir", cache])
        warm = run_child("segjax", "pspnet", args, extra=["--cache-dir", cache])
      notes.append(f"PSPNet compile with a persistent compilation cache: "
                   f"{_cell(cold.get('compile_s'), '.1f')} s filling it, "
                   f"{_cell(warm.get('compile_s'), '.1f')} s from it (a new process).")
  return rows, options_rows, notes, sorted(versions)


COLUMNS = ["model", "params (M)", "segjax s/step", "segjax img/s", "torch s/step",
           "torch channels_last s/step", "ratio (torch s / segjax s)",
           "ratio (torch channels_last s / segjax s)", "segjax compile (s)",
           "segjax peak RSS (GB)", "segjax XLA buffers (GB)", "torch peak RSS (GB)",
           "torch channels_last peak RSS (GB)"]
OPTION_COLUMNS = ["model", "option", "s/step", "ratio (torch eager float32 s / this s)",
                  "compile (s)", "error"]


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--models", nargs="+", default=list(MODEL_OPTIONS),
                      choices=list(MODEL_OPTIONS))
  parser.add_argument("--size", type=int, default=256, help="square image side")
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--repeats", type=int, default=3, help="timed steps per implementation")
  parser.add_argument("--warmup", type=int, default=1, help="untimed steps before them")
  parser.add_argument("--options", action="store_true",
                      help="also time PSPNet and DeepLabV3+ under each CPU option tried")
  parser.add_argument("--json", help="also write the tables to this JSON file")
  # Internal: one measurement in a child process.
  parser.add_argument("--child", choices=["segjax", "torch"], help=argparse.SUPPRESS)
  parser.add_argument("--result", help=argparse.SUPPRESS)
  parser.add_argument("--conv-lowering", default="auto", help=argparse.SUPPRESS)
  parser.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
  parser.add_argument("--channels-last", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("--cache-dir", default="", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.size < 64 or args.batch < 2 or args.repeats < 1 or args.warmup < 0:
    parser.error("need --size >= 64, --batch >= 2 (PyTorch's BatchNorm needs 2 examples in the "
                 "1x1-pooled branches), --repeats >= 1 and --warmup >= 0.")
  if args.child:
    args.model = args.models[0]
    result = (child_segjax if args.child == "segjax" else child_torch)(args)
    with open(args.result, "w") as f:
      json.dump(result, f)
    return

  print(f"batch {args.batch} x {args.size}x{args.size}, {NUM_CLASSES} classes, median of "
        f"{args.repeats} steps after {args.warmup}")
  print("| " + " | ".join(COLUMNS) + " |")
  rows, options_rows, notes, versions = measure(args)
  for note in notes + versions:
    print(note)
  if args.json:
    setup = (f"Train step (forward, cross-entropy + 0.4 aux, backward, SGD momentum) at batch "
             f"{args.batch} x {args.size}x{args.size}, {NUM_CLASSES} classes, float32; median "
             f"of {args.repeats} steps after {args.warmup} untimed. Every implementation runs in "
             "its own process (peak RSS is that process's); segjax runs as train.py does, with "
             f"XLA_FLAGS={DEFAULT_FLAGS} (configs/default.py) and model.conv_lowering auto. "
             "References: the same networks in "
             "PyTorch (benchmarks/torch_models.py, unet_train_step.TorchUNet), eager. "
             + "; ".join(versions) + ".")
    tables = [{"benchmark": "train_step", "setup": setup, "columns": COLUMNS, "rows": rows,
               "notes": notes}]
    if options_rows:
      tables.append({"benchmark": "train_step_options",
                     "setup": "Each CPU option tried, a segjax PSPNet or DeepLabV3+ row under "
                              "the same shapes; the ratio is against the PyTorch eager step "
                              "of the table above. 'default' is segjax as train.py runs it: "
                              "model.conv_lowering auto (matmul filter gradients of 1x1 "
                              f"convolutions, shifted multiply-add depthwise convolutions) and "
                              f"XLA_FLAGS={DEFAULT_FLAGS} (configs/default.py's xla_flags).",
                     "columns": OPTION_COLUMNS, "rows": options_rows, "notes": []})
    with open(args.json, "w") as f:
      json.dump(tables, f, indent=1)


if __name__ == "__main__":
  main()
