"""Pod-scale training options for PSPNet-R50 (ADE20K recipe): per-device memory,
compile time and step time of data parallelism, FSDP, remat and gradient
accumulation.

  python benchmarks/pod_scale.py                      # 512x512, global batch 8
  python benchmarks/pod_scale.py --size 128 --width 8 --skip-steps   # ~2 min on 2 cores

Memory is XLA's analysis of the compiled, sharded train step (lowered from
abstract shapes, so nothing is allocated), per device: arguments (the state's
shard and the batch's), outputs, aliased (donated) bytes, temporaries and
generated code (XLA's CPU backend reports 0 for it); "peak" is arguments +
outputs - aliased + temporaries (XLA's own peak_memory_in_bytes is left out: on
CPU it reports only the arguments). Rows: data parallel (state replicated), FSDP
(`mesh.strategy = "fsdp"`: state sharded over the data axis), each with the
backbone rematerialized ("nothing_saveable"), and gradient accumulation over 4
micro-batches. Micro-batches must spread evenly over the devices, so the
accumulation row runs at 4x the global batch (each micro-batch the size of the
other rows' batch), next to plain data parallelism at that same 4x batch.

Step time (median of --steps steps after one warm-up) is the data-parallel step
on every device with the global batch and on one device with the per-device
batch (global batch / device count): the same work per device, so the time
ratio is 1 under perfect weak scaling. Virtual CPU devices share the host's
cores, so there that ratio is about the device count and only bounds the
overhead of the partitioned program. They also share its memory: the timed run on
every device needs about device count x the data-parallel peak, and the script
says so and stops, before timing, when Linux reports less available (with 8
devices and the defaults, ~24 GiB; --size 384, ~16 GiB).

On XLA's CPU backend the FSDP step all-gathers every parameter and all-reduces
full-size gradients (no reduce-scatter) into temporaries, so there FSDP saves
the sharded state and little else; the temp column shows it.

Without a device count in XLA_FLAGS the script asks for 8 virtual CPU devices
(a GPU/TPU host uses its real devices). There is no PyTorch reference: the
figures compare segjax's own strategies with one another.
"""
import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8").strip()

import argparse  # noqa: E402
import functools  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import jaxlib  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import pspnet_ade20k  # noqa: E402
from segjax.losses import build_loss  # noqa: E402
from segjax.models import build_model  # noqa: E402
from segjax.tasks import semantic  # noqa: E402
from segjax.training import optimizers, sharding, steps, train_state  # noqa: E402

NUM_CLASSES = 150
IGNORE_INDEX = 255
MIB = 2 ** 20
ACCUMULATION_STEPS = 4
REMAT = "nothing_saveable"


class Setup:
  """The recipe's model, optimizer and loss, and a jitted train step per mesh and options."""

  def __init__(self, size: int, width: int):
    self.config = pspnet_ade20k.get_config()
    options = dict(self.config.model.options, backbone_width=width)
    self.model = build_model("pspnet", NUM_CLASSES, options)
    self.tx, self.schedule = optimizers.create_optimizer(
        self.config.optimizer, self.config.total_steps,
        getattr(self.model, "frozen_params_mask", None), self.config.data.batch_size)
    self.loss_fn = build_loss(self.config.loss.terms)
    self.input_shape = (1, size, size, 3)
    self.size = size

  def jitted(self, mesh, rules, accumulation_steps: int = 1, remat_policy: str = ""):
    """(jitted, donating train step, abstract state, batch sharding) on `mesh`, placed as
    the trainer places them."""
    abstract, shardings = train_state.abstract_train_state(self.model, self.tx,
                                                           self.input_shape, mesh, rules)
    batch_sharding = sharding.batch_sharding(mesh, self.config.mesh.batch_axes)
    replicated = NamedSharding(mesh, P())
    objective = semantic.objective(model=self.model, ignore_index=IGNORE_INDEX,
                                   loss_fn=self.loss_fn, aux_weight=self.config.loss.aux_weight)
    step_fn = functools.partial(
        steps.train_step, objective=objective, tx=self.tx, schedule=self.schedule,
        accumulation_steps=accumulation_steps, remat_policy=remat_policy)
    jitted = jax.jit(step_fn, in_shardings=(shardings, batch_sharding, replicated),
                     out_shardings=(shardings, replicated), donate_argnums=(0,))
    return jitted, abstract, batch_sharding

  def abstract_batch(self, batch: int, batch_sharding):
    image = (batch, self.size, self.size, 3)
    return {"image": jax.ShapeDtypeStruct(image, jnp.float32, sharding=batch_sharding),
            "label": jax.ShapeDtypeStruct(image[:3], jnp.int32, sharding=batch_sharding)}


def compile_step(setup: Setup, mesh, rules, batch: int, **options):
  """Lowers and compiles the train step from abstract arguments; returns
  (compiled, seconds, abstract state)."""
  jitted, abstract, batch_sharding = setup.jitted(mesh, rules, **options)
  rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=NamedSharding(mesh, P()))
  start = time.perf_counter()
  compiled = jitted.lower(abstract, setup.abstract_batch(batch, batch_sharding), rng).compile()
  return compiled, time.perf_counter() - start, abstract


def memory_row(compiled) -> dict:
  """Per-device bytes from XLA's memory analysis of `compiled`."""
  m = compiled.memory_analysis()
  row = {"args": m.argument_size_in_bytes, "outputs": m.output_size_in_bytes,
         "alias": m.alias_size_in_bytes, "temp": m.temp_size_in_bytes,
         "code": m.generated_code_size_in_bytes}
  row["peak"] = row["args"] + row["outputs"] - row["alias"] + row["temp"]
  return row


def time_steps(setup: Setup, compiled, mesh, batch: int, num_steps: int) -> float:
  """Median seconds of `num_steps` runs of the compiled data-parallel step on `mesh`
  after one warm-up."""
  rules = sharding.param_rules(setup.config.mesh)
  state, _ = train_state.create_train_state(setup.model, setup.tx, jax.random.key(0),
                                            setup.input_shape, mesh, rules)
  batch_sharding = sharding.batch_sharding(mesh, setup.config.mesh.batch_axes)
  rng = np.random.default_rng(0)
  host = {"image": rng.normal(size=(batch, setup.size, setup.size, 3)).astype(np.float32),
          "label": rng.integers(0, NUM_CLASSES, (batch, setup.size, setup.size), np.int32)}
  arrays = jax.device_put(host, batch_sharding)
  key = jax.device_put(jax.random.key(1), NamedSharding(mesh, P()))
  times = []
  for i in range(num_steps + 1):
    start = time.perf_counter()
    state, metrics = compiled(state, arrays, key)
    jax.block_until_ready((state, metrics))
    if i:
      times.append(time.perf_counter() - start)
  if not np.isfinite(float(metrics["loss"])):
    raise RuntimeError(f"The timed step's loss is {float(metrics['loss'])}; the step is broken.")
  return statistics.median(times)


def check_host_memory(devices, peak_per_device: int) -> None:
  """Virtual CPU devices share the host's memory: refuses a timed run on every device
  whose estimated peak (plus 10% for the allocator and the host's copies) exceeds
  the memory Linux reports available, rather than letting the kernel kill the
  process mid-step."""
  if devices[0].platform != "cpu" or not os.path.exists("/proc/meminfo"):
    return
  with open("/proc/meminfo") as f:
    fields = dict(line.split(":", 1) for line in f)
  available = int(fields["MemAvailable"].split()[0]) * 1024
  needed = 1.1 * len(devices) * peak_per_device
  if needed > available:
    raise MemoryError(
        f"The data-parallel step on {len(devices)} CPU devices needs about "
        f"{needed / 2 ** 30:.1f} GiB of host memory (1.1 x {len(devices)} x "
        f"{peak_per_device / 2 ** 30:.2f} GiB) but {available / 2 ** 30:.1f} GiB is available; "
        "time a smaller --size or --batch, or pass --skip-steps.")


def main():
  parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
  parser.add_argument("--size", type=int, default=512, help="square input size")
  parser.add_argument("--batch", type=int, default=8, help="global batch over all devices")
  parser.add_argument("--steps", type=int, default=3, help="timed steps (after one warm-up)")
  parser.add_argument("--width", type=int, default=64,
                      help="ResNet base width (backbone_width; 64 = ResNet-50)")
  parser.add_argument("--skip-steps", action="store_true",
                      help="only the memory and compile-time table")
  args = parser.parse_args()
  devices = jax.devices()
  count = len(devices)
  if args.batch % count:
    raise ValueError(f"--batch {args.batch} must be a multiple of the {count} devices, so the "
                     "global batch spreads evenly over them.")
  if args.size % 8:
    raise ValueError(f"--size {args.size} must be a multiple of 8 (PSPNet's output stride).")
  if args.steps < 1:
    raise ValueError(f"--steps {args.steps} must be at least 1.")

  setup = Setup(args.size, args.width)
  mesh = sharding.create_mesh(setup.config.mesh.axes)
  dp_rules = sharding.param_rules(setup.config.mesh)
  fsdp_mesh = setup.config.mesh.copy_and_resolve_references()
  fsdp_mesh.strategy = "fsdp"
  fsdp_rules = sharding.param_rules(fsdp_mesh)
  big = ACCUMULATION_STEPS * args.batch
  variants = [
      ("data parallel", dp_rules, args.batch, {}),
      ("FSDP", fsdp_rules, args.batch, {}),
      (f"data parallel + remat {REMAT}", dp_rules, args.batch, {"remat_policy": REMAT}),
      (f"FSDP + remat {REMAT}", fsdp_rules, args.batch, {"remat_policy": REMAT}),
      (f"data parallel, batch {big}", dp_rules, big, {}),
      (f"data parallel, {ACCUMULATION_STEPS} micro-batches of {args.batch}", dp_rules, big,
       {"accumulation_steps": ACCUMULATION_STEPS}),
  ]

  print(f"PSPNet-R50 (backbone width {args.width}), {NUM_CLASSES} classes, "
        f"{args.size}x{args.size}, global batch {args.batch}, SGD momentum (pspnet_ade20k)")
  print(f"machine: {devices[0].platform}, {devices[0].device_kind}, {count} devices, "
        f"{os.cpu_count()} CPUs; jax {jax.__version__}, jaxlib {jaxlib.__version__}; "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
  print("No PyTorch reference: ratios compare segjax's strategies with one another.", flush=True)

  rows = {}
  for name, rules, batch, options in variants:
    compiled, seconds, abstract = compile_step(setup, mesh, rules, batch, **options)
    rows[name] = dict(memory_row(compiled), compile=seconds, batch=batch)
    if name == "data parallel":
      dp_compiled = compiled
      state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract))
      params = sum(x.size for x in jax.tree.leaves(abstract.params))
      print(f"parameters {params / 1e6:.2f} M; train state (params, momentum, BN statistics) "
            f"{state_bytes / MIB:.1f} MiB unsharded", flush=True)

  base, base_big = rows["data parallel"], rows[f"data parallel, batch {big}"]
  print(f"\nPer-device memory (MiB) of the compiled train step, {count} devices; ratios to "
        f"data parallel at the same global batch")
  print("| strategy | global batch | args | outputs | aliased | temp | code | peak | "
        "peak ratio | args ratio | temp ratio | compile (s) |")
  print("|---|---|---|---|---|---|---|---|---|---|---|---|")
  for name, row in rows.items():
    ref = base if row["batch"] == args.batch else base_big
    ratio = lambda key: f"{row[key] / ref[key]:.2f}" if ref[key] else "-"
    print(f"| {name} | {row['batch']} | {row['args'] / MIB:.1f} | {row['outputs'] / MIB:.1f} | "
          f"{row['alias'] / MIB:.1f} | {row['temp'] / MIB:.1f} | {row['code'] / MIB:.1f} | "
          f"{row['peak'] / MIB:.1f} | {ratio('peak')} | {ratio('args')} | {ratio('temp')} | "
          f"{row['compile']:.1f} |")
  accum = rows[f"data parallel, {ACCUMULATION_STEPS} micro-batches of {args.batch}"]
  print(f"accumulation: peak {accum['peak'] / base['peak']:.2f}x data parallel at batch "
        f"{args.batch}, {accum['peak'] / base_big['peak']:.2f}x data parallel at batch {big}",
        flush=True)
  if args.skip_steps:
    return

  check_host_memory(devices, base["peak"])
  per_device = args.batch // count
  one = sharding.create_mesh(setup.config.mesh.axes, devices[:1])
  one_compiled = compile_step(setup, one, dp_rules, per_device)[0]
  print(f"\nData-parallel step time, median of {args.steps} after one warm-up")
  print("| devices | global batch | ms/step | images/s |")
  print("|---|---|---|---|")
  one_s = time_steps(setup, one_compiled, one, per_device, args.steps)
  print(f"| 1 | {per_device} | {one_s * 1e3:.1f} | {per_device / one_s:.2f} |", flush=True)
  all_s = time_steps(setup, dp_compiled, mesh, args.batch, args.steps)
  print(f"| {count} | {args.batch} | {all_s * 1e3:.1f} | {args.batch / all_s:.2f} |")
  print(f"{count}-device / 1-device step time: {all_s / one_s:.2f} (same work per device; 1.0 = "
        f"perfect weak scaling; virtual CPU devices sharing {os.cpu_count()} CPUs expect ~{count})")


if __name__ == "__main__":
  main()
