"""Train steps on a GPU or TPU: segjax against PyTorch eager and torch.compile, in one command.

  python benchmarks/accelerator.py --json accelerator.json --markdown accelerator.md
  python benchmarks/accelerator.py --tiny          # tiny widths, 64x64 (auto on a CPU)

For each case (PSPNet-R50-D8 512x512 batch 8 and 16, DeepLabV3+-R50 512x512 batch 8, Mask
R-CNN R50-FPN 1024x1024 batch 2), in bfloat16 and float32, it measures the train step of
segjax (jit), of the same network in PyTorch eager and of it under `torch.compile`, each run
in its own child process on the same device: median step time and images/s over timed steps
after warm-up ones, compile time (segjax: lower + compile; torch.compile: its first step),
peak device memory (JAX: `memory_stats()['peak_bytes_in_use']`; PyTorch:
`torch.cuda.max_memory_allocated()`; on a CPU the process's peak RSS) and MFU: XLA's
cost-analysis FLOPs of segjax's compiled step / step time / the device's dense bfloat16 peak
(PEAKS below, found from `jax.devices()[0].device_kind`; the PyTorch rows are divided by the
same FLOPs, the same network's). It prints one row per run as it ends, then a summary with
the segjax/PyTorch ratios, and writes both tables as benchmarks/report.py's JSON (`--json`,
a list of two records, as train_step.py) and as markdown (`--markdown`).

The networks and batches are those of the CPU benchmarks, built by their code:
benchmarks/train_step.py (segjax's step, `torch_models.py`'s PyTorch twins, pixel-mean
cross-entropy + 0.4 aux, SGD momentum) and benchmarks/maskrcnn_train_step.py (segjax's MaskRCNN
and torchvision's, frozen BatchNorm, trainable layers 3, 4 random instances per image, clipped
SGD). bfloat16 is segjax's `dtype` (float32 parameters) and PyTorch's `torch.autocast`.
PyTorch runs with TF32 allowed for matmuls and convolutions, as JAX's default precision does
on GPUs. `--image-dtype uint8` feeds the semantic steps uint8 pixels instead of normalized
float32 ones (PyTorch normalizes them in its step; segjax's step must do so itself, or its row
reports the model's refusal) and segjax's Mask R-CNN uint8 pixels (torchvision always gets
float images in [0, 1] and normalizes them in its step).

Time: first the segjax and torch.compile steps are compiled in advance, `--prewarm-jobs` child
processes at a time (6; off in tiny mode and on TPUs, which one process holds at a time), into
JAX's persistent compilation cache and Inductor's and Triton's caches, which the timed runs (one
at a time) then load from: the compile column is the time measured there, slower than alone.
Each run has its own limit (`--run-seconds`, compile included; a run past it is killed and
reported), its timed steps stop after `--steps` steps or `--step-seconds`, and the whole command
starts no run once `--budget` seconds (450) have passed and cuts the last one at it: runs go in
priority order (bfloat16 first; segjax, eager, torch.compile for each case; torch.compile of
Mask R-CNN last) and the ones left out are listed with the reason. The tables are rewritten
after every run, and SIGTERM (`timeout`) or Ctrl-C ends the running child and writes what was
measured. PyTorch rows are skipped, with the reason printed, where torch is not installed, has
no CUDA on a GPU machine, the device is a TPU, or torch.compile fails.
"""
import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time

BENCHMARKS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCHMARKS)
sys.path[:0] = [BENCHMARKS, REPO]  # the other benchmarks' builders, segjax itself
import report  # noqa: E402

SIDES = ("segjax", "torch", "torch.compile")
MIN_RUN_SECONDS = 40  # no run is started with less of the budget left (tiny runs: any)
PREWARM_SHARE = 0.5  # the parallel compilation ends by this share of --budget
DTYPES = ("bfloat16", "float32")
# Dense (no sparsity) peak TFLOP/s per JAX device: (device_kind pattern, name, bfloat16, TF32,
# float32). Patterns are matched in this order against the lower-cased device_kind. None: no
# such figure published (TPUs run float32 matmuls as bfloat16 passes).
PEAKS = (
    # NVIDIA H100 Tensor Core GPU datasheet (2023): SXM 1979 / PCIe 1513 / NVL 1671 TFLOP/s
    # bf16 and 989 / 756 / 835 TF32 "with sparsity" (halved here), FP32 67 / 51 / 60.
    ("h100 nvl", "NVIDIA H100 NVL", 835.5, 417.5, 60.0),
    ("h100 pcie", "NVIDIA H100 PCIe", 756.5, 378.0, 51.0),
    ("h100", "NVIDIA H100 SXM", 989.4, 494.7, 66.9),
    # NVIDIA H200 datasheet (2024): SXM as H100 SXM, NVL as H100 NVL.
    ("h200 nvl", "NVIDIA H200 NVL", 835.5, 417.5, 60.0),
    ("h200", "NVIDIA H200 SXM", 989.4, 494.7, 66.9),
    ("gh200", "NVIDIA GH200", 989.4, 494.7, 66.9),
    # NVIDIA A100 datasheet (2021): BF16 312, TF32 156, FP32 19.5 (SXM and PCIe alike).
    ("a100", "NVIDIA A100", 312.0, 156.0, 19.5),
    # NVIDIA L40S datasheet (2023): BF16 362.05 and TF32 183 dense, FP32 91.6.
    ("l40s", "NVIDIA L40S", 362.05, 183.0, 91.6),
    # NVIDIA L4 datasheet (2023): BF16 242 and TF32 120 with sparsity (halved), FP32 30.3.
    ("l4", "NVIDIA L4", 121.0, 60.0, 30.3),
    # Google Cloud TPU system architecture pages (cloud.google.com/tpu/docs/v6e, v5p, v5e, v4,
    # system-architecture-tpu-vm), bf16 per chip; a JAX device is one chip from v4 on, one of
    # the two TensorCores of a chip on v2 and v3 (per-chip figure halved).
    ("v6", "TPU v6e (Trillium)", 918.0, None, None),
    ("v5 lite", "TPU v5e", 197.0, None, None),
    ("v5e", "TPU v5e", 197.0, None, None),
    ("v5", "TPU v5p", 459.0, None, None),
    ("v4", "TPU v4", 275.0, None, None),
    ("v3", "TPU v3 (one TensorCore)", 61.5, None, None),
    ("v2", "TPU v2 (one TensorCore)", 22.5, None, None),
)


def peak(device_kind):
  """{"name", "bfloat16", "tf32", "float32"} (TFLOP/s) of the PEAKS row matching
  `device_kind`, or None where the table knows no such device (a CPU, say)."""
  kind = device_kind.lower()
  is_tpu = "tpu" in kind
  for pattern, name, bf16, tf32, fp32 in PEAKS:
    if pattern in kind and is_tpu == name.startswith("TPU"):
      return {"name": name, "bfloat16": bf16, "tf32": tf32, "float32": fp32}
  return None


# name -> (model, batch, image side, model options or None for the defaults), full size.
CASES = {
    "pspnet": ("pspnet", 8, 512, None),
    "deeplabv3plus": ("deeplabv3plus", 8, 512, None),
    "maskrcnn": ("maskrcnn", 2, 1024, None),
    "pspnet_b16": ("pspnet", 16, 512, None),
    "maskrcnn_b4": ("maskrcnn", 4, 1024, None),
    "unet": ("unet", 8, 512, None),
}
DEFAULT_CASES = ("pspnet", "deeplabv3plus", "maskrcnn", "pspnet_b16")
# --tiny: the same code paths at 64x64, batch 2, tiny widths (and a Mask R-CNN with ResNet-18,
# few proposals and samples; torchvision's gets the same RPN and sampler settings).
TINY = {
    "pspnet": ("pspnet", 2, 64, dict(backbone_width=8, head_channels=16, aux_channels=8)),
    "deeplabv3plus": ("deeplabv3plus", 2, 64, dict(backbone_width=8, channels=16,
                                                   low_level_channels=8)),
    "maskrcnn": ("maskrcnn", 2, 64, dict(rpn_pre_nms_top_n_train=64, rpn_post_nms_top_n_train=32,
                                         box_batch_size_per_image=32)),
    "pspnet_b16": ("pspnet", 4, 64, dict(backbone_width=8, head_channels=16, aux_channels=8)),
    "maskrcnn_b4": ("maskrcnn", 4, 64, dict(rpn_pre_nms_top_n_train=64,
                                            rpn_post_nms_top_n_train=32,
                                            box_batch_size_per_image=32)),
    "unet": ("unet", 2, 64, dict(width=8, depth=1)),
}


def case_spec(name, tiny):
  """{"model", "batch", "size", "options"} of case `name`."""
  model, batch, size, options = (TINY if tiny else CASES)[name]
  return {"model": model, "batch": batch, "size": size, "options": options}


def maskrcnn_args(spec, dtype, tiny):
  """benchmarks/maskrcnn_train_step.py's parsed arguments for a Mask R-CNN case."""
  import maskrcnn_train_step
  argv = ["--size", str(spec["size"]), "--batch", str(spec["batch"]), "--dtype", dtype,
          "--backbone", "resnet18" if tiny else "resnet50"]
  if tiny:  # segjax's mask slots: every foreground RoI the tiny sampler draws (32 x 0.25)
    argv += ["--mask-slots", "8"]
  return maskrcnn_train_step.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# Child processes: one run (side, case, dtype) each, measured in-process.


class Timer:
  """Times calls of `step` after `warmup` untimed ones: at most `steps` timed calls, and no
  more once `seconds` have passed (at least one)."""

  def __init__(self, warmup, steps, seconds):
    self.warmup, self.steps, self.seconds = warmup, steps, seconds

  def __call__(self, step):
    for _ in range(self.warmup):
      step()
    times, start = [], time.perf_counter()
    while len(times) < self.steps and (not times or time.perf_counter() - start < self.seconds):
      begin = time.perf_counter()
      step()
      times.append(time.perf_counter() - begin)
    return times


def _flops(compiled, lowered):
  """XLA's cost-analysis FLOPs of the compiled step and where they came from (the compiled
  program's analysis; the lowered one's where the backend gives none)."""
  for what, source in ((compiled, "compiled"), (lowered, "lowered")):
    try:
      cost = what.cost_analysis()
    except Exception:  # noqa: BLE001  (a backend without cost analysis)
      continue
    if isinstance(cost, (list, tuple)):
      cost = cost[0] if cost else {}
    flops = (cost or {}).get("flops", 0.0)
    if flops and flops > 0:
      return float(flops), source
  return None, "none"


def _jax_memory(jax):
  """(peak bytes in use on device 0, what measured it), or (None, ...) where not reported."""
  stats = jax.devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    return stats["peak_bytes_in_use"], "peak_bytes_in_use"
  return report.peak_rss_gb() * 2**30, "process peak RSS"


def child_segjax(spec, dtype, args, timer):
  """segjax's jitted step of one case, measured in this process."""
  if args.platform == "cpu":  # train.py's XLA flags (configs/default.py), CPU ones for now
    report.use_train_defaults()
  import jax
  import numpy as np

  if spec["model"] == "maskrcnn":
    import maskrcnn_train_step as mrc
    margs = maskrcnn_args(spec, dtype, args.tiny)
    data = mrc.synthetic_batch(margs.batch, margs.size, margs.instances, margs.classes)
    step_fn, state, arrays, key = mrc.segjax_setup(margs, data, **(spec["options"] or {}))
    if args.image_dtype == "uint8":
      arrays["image"] = np.round(data[0] * 255).astype(np.uint8)
    arrays = jax.device_put(arrays)
    loss_of = lambda metrics: sum(mrc.segjax_losses(metrics).values())
  else:
    import train_step
    step_fn, state, arrays, _ = train_step.segjax_step(
        spec["model"], spec["size"], spec["batch"], options=spec["options"], dtype=dtype,
        image_dtype=args.image_dtype)
    key = jax.random.key(2)
    loss_of = lambda metrics: float(metrics["loss"])
  start = time.perf_counter()
  lowered = step_fn.lower(state, arrays, key)
  compiled = lowered.compile()
  compile_s = time.perf_counter() - start
  if args.prewarm_only:
    return {"compile_s": compile_s}
  flops, flops_source = _flops(compiled, lowered)
  try:
    memory = compiled.memory_analysis()
  except Exception:  # noqa: BLE001  (not every backend or cached program has one)
    memory = None
  xla_bytes = None if memory is None else (
      memory.argument_size_in_bytes + memory.output_size_in_bytes + memory.temp_size_in_bytes
      - memory.alias_size_in_bytes)
  holder = {"state": state}

  def step():
    holder["state"], metrics = compiled(holder["state"], arrays, key)
    holder["metrics"] = jax.block_until_ready(metrics)

  times = timer(step)
  loss = loss_of(holder["metrics"])
  if not np.isfinite(loss):
    raise RuntimeError(f"segjax's loss is not finite ({loss}); the timing is meaningless.")
  peak_bytes, memory_kind = _jax_memory(jax)
  device = jax.devices()[0]
  return {"times": times, "compile_s": compile_s, "flops": flops, "flops_source": flops_source,
          "peak_bytes": peak_bytes, "memory_kind": memory_kind, "xla_bytes": xla_bytes,
          "loss": loss, "device_kind": device.device_kind, "platform": device.platform,
          "version": f"jax {jax.__version__}"}


def _torch_device(torch, platform):
  """The torch device matching JAX's platform, or a RuntimeError saying why there is none."""
  if platform == "cpu":
    return "cpu"
  if platform == "gpu" and torch.cuda.is_available():
    return "cuda"
  if platform == "gpu":
    raise RuntimeError(f"torch {torch.__version__} sees no CUDA device (a CPU-only build?); "
                       "install a CUDA build of torch to compare on the GPU.")
  raise RuntimeError(f"PyTorch is not run on platform {platform!r} (only CUDA GPUs and CPUs).")


@contextlib.contextmanager
def torchvision_detection(torch):
  """torchvision with working detection operators: itself where its compiled operators load
  (a CUDA machine with matching wheels); else, as the CPU benchmarks do, with the plain-torch
  RoIAlign and NMS of tests/torch_reference.py. Yields (torchvision, note)."""
  try:
    import torchvision
    torch.ops.torchvision.nms  # noqa: B018  (raises where the operators did not register)
    yield torchvision, "torchvision's own operators"
    return
  except (ImportError, RuntimeError, AttributeError):
    for name in [name for name in sys.modules if name.startswith("torchvision")]:
      del sys.modules[name]
  sys.path.insert(0, REPO)
  from tests.torch_reference import plain_torch_detection_ops
  with plain_torch_detection_ops() as torchvision:
    yield torchvision, ("torchvision with plain-torch RoIAlign and greedy NMS (its compiled "
                        "operators do not load here)")


def child_torch(spec, dtype, args, timer, compiled_mode):
  """The PyTorch step of one case (eager, or under torch.compile), measured in this process."""
  try:
    import torch
  except ImportError as e:
    raise RuntimeError(f"torch is not installed ({e}); install torch to compare.") from None
  import numpy as np
  device = _torch_device(torch, args.platform)
  if device == "cuda":
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
  else:
    torch.set_num_threads(os.cpu_count())
  torch.manual_seed(0)
  autocast = ((lambda: torch.autocast(device, dtype=torch.bfloat16)) if dtype == "bfloat16"
              else contextlib.nullcontext)
  wrap = torch.compile if compiled_mode else None
  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
  note = ""
  with contextlib.ExitStack() as stack:
    if spec["model"] == "maskrcnn":
      import maskrcnn_train_step as mrc
      margs = maskrcnn_args(spec, dtype, args.tiny)
      data = mrc.synthetic_batch(margs.batch, margs.size, margs.instances, margs.classes)
      # torchvision takes float images in [0, 1] whatever --image-dtype: its transform
      # normalizes them on the device, inside the timed step.
      torchvision, note = stack.enter_context(torchvision_detection(torch))
      train, _ = mrc.torchvision_step(margs, data, torchvision, device=device, wrap=wrap,
                                      autocast=autocast, **(spec["options"] or {}))
      loss_of = lambda losses: sum(mrc.torch_losses(losses).values())
    else:
      import train_step
      model, loss_fn = train_step.torch_model(spec["model"], spec["options"])
      model = model.to(device)
      images, labels = train_step.batch(spec["size"], spec["batch"],
                                        image_dtype=args.image_dtype)
      x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous().to(device)
      y = torch.from_numpy(labels).long().to(device)
      optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
      forward = wrap(model) if wrap else model
      # uint8 pixels are normalized on the device, inside the step, as segjax's would be.
      mean, std = (torch.tensor(v, device=device).view(1, 3, 1, 1) * 255
                   for v in ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)))
      normalize = ((lambda images: (images.float() - mean) / std)
                   if args.image_dtype == "uint8" else (lambda images: images))

      def train():
        optimizer.zero_grad(set_to_none=True)
        with autocast():
          loss = loss_fn(forward(normalize(x)), y)
        loss.backward()
        optimizer.step()
        return loss
      loss_of = lambda loss: float(loss.detach())
    holder = {}

    def step():
      holder["out"] = train()
      sync()

    compile_s = None
    if compiled_mode:  # torch.compile compiles on its first call: timed apart
      start = time.perf_counter()
      step()
      compile_s = time.perf_counter() - start
      if args.prewarm_only:
        return {"compile_s": compile_s}
    if device == "cuda":
      torch.cuda.reset_peak_memory_stats()
    times = timer(step)
    loss = loss_of(holder["out"])
  if not np.isfinite(loss):
    raise RuntimeError(f"PyTorch's loss is not finite ({loss}); the timing is meaningless.")
  if device == "cuda":
    peak_bytes, memory_kind = torch.cuda.max_memory_allocated(), "max_memory_allocated"
    device_kind = torch.cuda.get_device_name()
  else:
    peak_bytes, memory_kind = report.peak_rss_gb() * 2**30, "process peak RSS"
    device_kind = "cpu"
  return {"times": times, "compile_s": compile_s, "peak_bytes": peak_bytes,
          "memory_kind": memory_kind, "loss": loss, "device_kind": device_kind,
          "version": f"torch {torch.__version__}" + (f"; {note}" if note else "")}


def run_child_here(args):
  """The internal --child mode: measures one run and writes its result (or error) JSON."""
  spec, dtype, side = json.loads(args.child)
  timer = Timer(args.warmup, args.steps, args.step_seconds)
  try:
    if side == "segjax":
      result = child_segjax(spec, dtype, args, timer)
    else:
      result = child_torch(spec, dtype, args, timer, compiled_mode=side == "torch.compile")
  except Exception as e:  # noqa: BLE001  (any failure is this run's reported reason)
    message = " ".join(f"{type(e).__name__}: {e}".split())
    result = {"error": message[:400]}
  with open(args.result, "w") as f:
    json.dump(result, f)


# ---------------------------------------------------------------------------------------------
# The parent: runs the children in priority order within the budget, then reports.


def _child_argv(args, extra):
  argv = [sys.executable, os.path.abspath(__file__), "--warmup", str(args.warmup), "--steps",
          str(args.steps), "--step-seconds", str(args.step_seconds), "--image-dtype",
          args.image_dtype, "--platform", args.platform]
  return argv + (["--tiny"] if args.tiny else []) + list(extra)


def _kill(process):
  """Ends `process` and every process it started (its own process group)."""
  try:
    os.killpg(process.pid, signal.SIGKILL)
  except ProcessLookupError:
    pass
  process.wait()


def run_process(argv, timeout, env=None):
  """Runs `argv` in its own process group; (exit code or None when killed at `timeout`,
  the last lines of its output)."""
  with tempfile.TemporaryFile("w+") as log:
    process = subprocess.Popen(argv, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True, env=env)
    try:
      code = process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
      code = None
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: end the child and all it started, too
      _kill(process)
      raise
    if code is None:
      _kill(process)
    log.seek(0)
    tail = log.read()[-2000:]
  return code, tail


def probe(args):
  """(platform, device_kind) of JAX's first device, asked in a child process (so that this
  process holds no accelerator memory while the runs go)."""
  code = ("import jax; d = jax.devices()[0]; "
          "print('PROBE', d.platform, '|', d.device_kind, flush=True)")
  status, output = run_process([sys.executable, "-c", code], args.run_seconds)
  for line in output.splitlines():
    if line.startswith("PROBE "):
      platform, _, kind = line[len("PROBE "):].partition(" | ")
      return platform.strip(), kind.strip()
  raise SystemExit(f"JAX could not start (exit {status}): {output[-600:]}")


def _outcome(code, output, out, timeout):
  """A child's result dict from its exit code, output and result file."""
  if code is None:
    return {"error": f"stopped at its time limit of {timeout:.0f} s"}
  if not os.path.exists(out):
    why = f"killed by signal {-code} (out of memory?)" if code < 0 else f"exit {code}"
    last = (output.strip().splitlines() or ["no output"])[-1]
    return {"error": f"{why}: {last[:300]}"}
  with open(out) as f:
    return json.load(f)


def cache_env(folder):
  """The environment of the children: JAX's persistent compilation cache and PyTorch
  Inductor's and Triton's caches in `folder`, every program cached."""
  return dict(os.environ, JAX_COMPILATION_CACHE_DIR=os.path.join(folder, "jax"),
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
              JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
              TORCHINDUCTOR_CACHE_DIR=os.path.join(folder, "inductor"),
              TRITON_CACHE_DIR=os.path.join(folder, "triton"))


def measure(args, side, case, dtype, timeout, env=None):
  """One run in a fresh process: its result dict, or {"error": why}."""
  spec = case_spec(case, args.tiny)
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, "result.json")
    argv = _child_argv(args, ["--child", json.dumps([spec, dtype, side]), "--result", out])
    code, output = run_process(argv, timeout, env)
    return _outcome(code, output, out, timeout)


def prewarm(args, runs, env, deadline):
  """Compiles the segjax and torch.compile programs of `runs` in child processes,
  --prewarm-jobs at a time, into the caches of `env` (which the timed runs then load from),
  until `deadline` (perf_counter seconds). Returns {run: {"compile_s"} or {"error"}}."""
  todo = [run for run in runs if run[0] != "torch"]
  env = dict(env, XLA_PYTHON_CLIENT_PREALLOCATE="false")  # processes share the device
  results, running = {}, {}
  with tempfile.TemporaryDirectory() as tmp:
    try:
      while todo or running:
        while todo and len(running) < args.prewarm_jobs and time.perf_counter() < deadline:
          side, case, dtype = run = todo.pop(0)
          out = os.path.join(tmp, f"{side}-{case}-{dtype}.json")
          log = tempfile.TemporaryFile("w+")
          argv = _child_argv(args, ["--child", json.dumps([case_spec(case, args.tiny), dtype,
                                                           side]), "--result", out,
                                    "--prewarm-only"])
          process = subprocess.Popen(argv, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True, env=env)
          running[run] = (process, out, log, time.perf_counter())
        if not running:
          break
        time.sleep(0.2)
        for run, (process, out, log, started) in list(running.items()):
          limit = min(started + args.run_seconds, deadline)
          code = process.poll()
          if code is None and time.perf_counter() < limit:
            continue
          if code is None:
            _kill(process)
          log.seek(0)
          results[run] = _outcome(code, log.read()[-2000:], out, limit - started)
          log.close()
          del running[run]
    except KeyboardInterrupt:
      for process, _, log, _ in running.values():
        _kill(process)
        log.close()
      raise
  return results


def plan(cases, dtypes, sides):
  """The runs (side, case, dtype) in priority order: dtypes in the order given, each case's
  segjax, eager and torch.compile runs together; torch.compile of Mask R-CNN, whose proposal
  counts change every step, after everything else."""
  runs = [(side, case, dtype) for dtype in dtypes for case in cases for side in sides]
  late = [run for run in runs if run[0] == "torch.compile" and run[1].startswith("maskrcnn")]
  return [run for run in runs if run not in late] + late


def _cell(value, fmt, missing="-"):
  return missing if value is None else format(value, fmt)


def _median(result):
  return statistics.median(result["times"]) if result.get("times") else None


DETAIL_COLUMNS = ["case", "dtype", "implementation", "s/step (median)", "images/s",
                  "steps timed", "compile (s)", "peak memory (GB)", "memory measure",
                  "XLA GFLOP/step", "TFLOP/s", "MFU (bf16 peak)", "segjax speed / this",
                  "note"]
SUMMARY_COLUMNS = ["case", "dtype", "segjax images/s", "torch eager images/s",
                   "torch.compile images/s", "segjax / eager", "segjax / torch.compile",
                   "segjax MFU", "segjax peak memory (GB)", "torch eager peak memory (GB)"]


def case_label(case, tiny):
  spec = case_spec(case, tiny)
  names = {"pspnet": "PSPNet-R50-D8", "deeplabv3plus": "DeepLabV3+-R50",
           "maskrcnn": "Mask R-CNN R50-FPN", "unet": "U-Net"}
  name = names[spec["model"]]
  if tiny:
    name = name.replace("R50", "R18") if spec["model"] == "maskrcnn" else name
    name += " (tiny)"
  return f"{name} {spec['batch']}x{spec['size']}x{spec['size']}"


class Report:
  """The results so far, the detail table (printed row by row), the summary and the files."""

  def __init__(self, args, peaks, device_kind, peak_line, start):
    self.args, self.peaks, self.device_kind, self.peak_line = args, peaks, device_kind, peak_line
    self.start = start
    self.results, self.skipped, self.prewarmed = {}, [], {}
    self.detail = report.Table(DETAIL_COLUMNS)

  def tables(self):
    """benchmarks/report.py's records of the detail table and the summary."""
    args = self.args
    versions = sorted({r["version"] for r in self.results.values() if "version" in r})
    flops_sources = sorted({r["flops_source"] for r in self.results.values()
                            if r.get("flops_source")})
    notes = [f"device: {self.device_kind} ({args.platform}); {self.peak_line}.",
             (f"XLA FLOPs from the {'/'.join(flops_sources)} program's cost analysis; the "
              "PyTorch rows' TFLOP/s and MFU use the same count (same network, same batch)."
              if flops_sources else "No XLA FLOPs: no segjax step was measured.")]
    notes += [f"skipped: {line}" for line in self.skipped] + ["; ".join(versions)] * bool(versions)
    if self.prewarmed:
      failed = [f"{' '.join(run)}: {r['error']}" for run, r in self.prewarmed.items()
                if "error" in r]
      notes.insert(2, f"compile (s): measured while compiling {args.prewarm_jobs} programs at "
                   "once (--prewarm-jobs; slower than alone); the timed runs loaded the "
                   "compiled programs from the caches" + (
                       f" (failed to compile in advance, so compiled in their run: "
                       f"{'; '.join(failed)})" if failed else ""))
    setup = (f"Train step of each case on {self.device_kind} ({args.platform}), each "
             f"implementation in its own process: median of up to {args.steps} timed steps (at "
             f"most {args.step_seconds:g} s of them) after {args.warmup} warm-up; images fed as "
             f"{args.image_dtype}; segjax jit with the state donated; PyTorch eager and "
             "torch.compile (bfloat16: torch.autocast; TF32 allowed). Total "
             f"{time.perf_counter() - self.start:.0f} s"
             + (" (tiny mode: tiny widths, 64x64)" if args.tiny else "") + ".")
    return [{"benchmark": "accelerator", "setup": setup, "columns": DETAIL_COLUMNS,
             "rows": self.detail.rows, "notes": notes},
            {"benchmark": "accelerator_summary", "setup": setup + " Ratios: segjax images/s "
             "over PyTorch images/s.", "columns": SUMMARY_COLUMNS,
             "rows": self.summary_rows(args.cases, args.dtypes), "notes": []}]

  def write(self):
    """Writes the tables to --json and --markdown where given; returns them."""
    tables = self.tables()
    if self.args.json:
      with open(self.args.json, "w") as f:
        json.dump(tables, f, indent=1)
        f.write("\n")
    if self.args.markdown:
      with open(self.args.markdown, "w") as f:
        for table in tables:
          f.write(f"## {table['benchmark']}\n\n{table['setup']}\n\n")
          f.write(report.markdown(table["columns"], table["rows"]) + "\n\n")
          f.write("".join(f"- {note}\n" for note in table["notes"]))
          f.write("\n" if table["notes"] else "")
    return tables

  def mfu(self, flops, seconds):
    """(TFLOP/s, MFU cell) of `flops` per step in `seconds`."""
    if not flops or not seconds:
      return None, "-"
    rate = flops / seconds / 1e12
    if not self.peaks:
      return rate, "unknown peak"
    return rate, f"{100 * rate / self.peaks['bfloat16']:.1f}%"

  def add(self, side, case, dtype, result):
    warm = self.prewarmed.get((side, case, dtype), {})
    if "compile_s" in warm and "times" in result:  # its compile, not the timed run's cache load
      result = dict(result, compile_s=warm["compile_s"], cache_load_s=result.get("compile_s"))
    self.results[side, case, dtype] = result
    ours = self.results.get(("segjax", case, dtype), {})
    flops = ours.get("flops")
    median = _median(result)
    rate, mfu = self.mfu(flops, median)
    segjax_median = _median(ours)
    ratio = (_cell(median / segjax_median, ".2f")
             if median and segjax_median and side != "segjax" else "-")
    peak_bytes = result.get("peak_bytes")
    self.detail.add(
        case_label(case, self.args.tiny), dtype, side, _cell(median, ".4f"),
        _cell(median and self.spec(case)["batch"] / median, ".2f"),
        len(result.get("times", [])), _cell(result.get("compile_s"), ".1f"),
        _cell(peak_bytes and peak_bytes / 2**30, ".2f"), result.get("memory_kind", "-"),
        _cell(flops and median and flops / 1e9, ".4g"), _cell(rate, ".4g"), mfu, ratio,
        result.get("error", "")[:300])

  def spec(self, case):
    return case_spec(case, self.args.tiny)

  def summary_rows(self, cases, dtypes):
    rows = []
    for case in cases:
      for dtype in dtypes:
        runs = [self.results.get((side, case, dtype), {}) for side in SIDES]
        if not any(runs):
          continue
        medians = [_median(run) for run in runs]
        batch = self.spec(case)["batch"]
        speed = [_cell(m and batch / m, ".2f") for m in medians]
        ratios = [_cell(medians[0] and m and m / medians[0], ".2f") for m in medians[1:]]
        _, mfu = self.mfu(runs[0].get("flops"), medians[0])
        memory = [_cell(run.get("peak_bytes") and run["peak_bytes"] / 2**30, ".2f")
                  for run in runs[:2]]
        rows.append([case_label(case, self.args.tiny), dtype, *speed, *ratios, mfu, *memory])
    return rows


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(DEFAULT_CASES),
                      help="cases, in priority order (default: %(default)s)")
  parser.add_argument("--dtypes", nargs="+", choices=DTYPES, default=list(DTYPES))
  parser.add_argument("--sides", nargs="+", choices=SIDES, default=list(SIDES),
                      help="implementations to run (default: all)")
  parser.add_argument("--tiny", action="store_true",
                      help="tiny widths, 64x64 images, batch 2 (the default on a CPU)")
  parser.add_argument("--warmup", type=int, default=None,
                      help="untimed steps before the timed ones (default 3; tiny 1)")
  parser.add_argument("--steps", type=int, default=None,
                      help="most timed steps per run (default 20; tiny 1)")
  parser.add_argument("--step-seconds", type=float, default=5.0,
                      help="no more timed steps once this long has been spent timing")
  parser.add_argument("--run-seconds", type=float, default=240.0,
                      help="time limit of each run, process start and compile included")
  parser.add_argument("--budget", type=float, default=450.0,
                      help="start no run after this many seconds (default 7.5 min)")
  parser.add_argument("--prewarm-jobs", type=int, default=None,
                      help="compile the segjax and torch.compile steps first, this many at a "
                           "time, into caches the timed runs load from (default 6; tiny 0: "
                           "off)")
  parser.add_argument("--image-dtype", choices=["float32", "uint8"], default="float32",
                      help="what the steps are fed: normalized float32 images or uint8 pixels")
  report.add_json_argument(parser)
  parser.add_argument("--markdown", metavar="PATH", type=report._json_path,
                      help="also write the tables as markdown here")
  # Internal: one run in this process.
  parser.add_argument("--child", help=argparse.SUPPRESS)
  parser.add_argument("--result", help=argparse.SUPPRESS)
  parser.add_argument("--platform", help=argparse.SUPPRESS)
  parser.add_argument("--prewarm-only", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.child:
    run_child_here(args)
    return None
  if args.prewarm_jobs is not None and args.prewarm_jobs < 0:
    parser.error("--prewarm-jobs must be 0 (off) or more.")
  for name in ("warmup", "steps"):
    if getattr(args, name) is not None and getattr(args, name) < (name == "steps"):
      parser.error(f"--{name} must be at least {int(name == 'steps')}.")
  if min(args.step_seconds, args.run_seconds, args.budget) <= 0:
    parser.error("--step-seconds, --run-seconds and --budget must be positive.")

  start = time.perf_counter()
  args.platform, device_kind = probe(args)
  args.tiny = args.tiny or args.platform == "cpu"
  args.warmup = (1 if args.tiny else 3) if args.warmup is None else args.warmup
  args.steps = (1 if args.tiny else 20) if args.steps is None else args.steps
  if args.prewarm_jobs is None:  # a TPU is held by one process at a time
    args.prewarm_jobs = 0 if args.tiny or args.platform == "tpu" else 6
  peaks = peak(device_kind) if args.platform != "cpu" else None
  peak_line = ("unknown peak: MFU not computed" if peaks is None else
               f"{peaks['name']}: dense peaks bfloat16 {peaks['bfloat16']} TFLOP/s, TF32 "
               f"{_cell(peaks['tf32'], '')} TFLOP/s, float32 {_cell(peaks['float32'], '')} "
               "TFLOP/s (PEAKS in benchmarks/accelerator.py); MFU is against the bfloat16 peak")
  print(f"device: {device_kind} ({args.platform}); {peak_line}", flush=True)
  if args.tiny:
    print("tiny mode: tiny widths, 64x64 images (figures say nothing about full-size models)")
  results = Report(args, peaks, device_kind, peak_line, start)
  torch_unavailable = (None if args.platform in ("cpu", "gpu") else
                       f"PyTorch is not run on platform {args.platform!r} (only CUDA GPUs and "
                       "CPUs)")
  if torch_unavailable:
    print(f"PyTorch rows skipped: {torch_unavailable}", flush=True)
  signal.signal(signal.SIGTERM, _stop)
  runs = plan(args.cases, args.dtypes, args.sides)
  if torch_unavailable:
    results.skipped += [f"{' '.join(run)}: {torch_unavailable}" for run in runs
                        if run[0] != "segjax"]
    runs = [run for run in runs if run[0] == "segjax"]
  caches = tempfile.TemporaryDirectory()
  env = cache_env(caches.name)
  try:
    if args.prewarm_jobs:
      print(f"compiling the segjax and torch.compile steps, {args.prewarm_jobs} at a time...",
            flush=True)
      results.prewarmed = prewarm(args, runs, env, start + args.budget * PREWARM_SHARE)
      print(f"compiled in {time.perf_counter() - start:.0f} s", flush=True)
    for side, case, dtype in runs:
      elapsed = time.perf_counter() - start
      if side != "segjax" and torch_unavailable:  # found out by an earlier run
        results.skipped.append(f"{side} {case} {dtype}: {torch_unavailable}")
        continue
      left = args.budget - elapsed
      if left < (0 if args.tiny else MIN_RUN_SECONDS):
        results.skipped.append(f"{side} {case} {dtype}: not started, {max(left, 0):.0f} s of "
                               f"the --budget of {args.budget:.0f} s left")
        continue
      result = measure(args, side, case, dtype, min(args.run_seconds, left), env)
      error = result.get("error", "")
      if side != "segjax" and ("torch is not installed" in error or "sees no CUDA" in error
                               or "is not run on platform" in error):
        torch_unavailable = error
        print(f"PyTorch rows skipped: {error}", flush=True)
      results.add(side, case, dtype, result)
      results.write()  # what is measured so far survives an interruption
  except KeyboardInterrupt:
    results.skipped.append("the rest: interrupted")
  finally:
    caches.cleanup()
  tables = results.write()
  print("\nSummary (ratios: segjax images/s / PyTorch images/s; above 1 favours segjax)")
  print(report.markdown(tables[1]["columns"], tables[1]["rows"]))
  print("\n".join(tables[0]["notes"]))
  print(f"total {time.perf_counter() - start:.0f} s")
  return tables


def _stop(signum, frame):
  """SIGTERM (e.g. from `timeout`): stop like Ctrl-C, so the running child is ended and the
  results so far are written."""
  raise KeyboardInterrupt


if __name__ == "__main__":
  main()
