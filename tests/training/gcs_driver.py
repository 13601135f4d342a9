"""What test_gcs_paths.py runs in one process with the emulator's environment: the
resumed training run (as train.py runs it), eval.py's and predict.py's commands on
its gs:// checkpoint, predict.py's command once more to a local folder for
comparison, and a profiler trace. Prints one JSON line of results.

  python -m tests.training.gcs_driver '{"workdir": ..., "data_dir": ..., ...}'
"""
import json
import sys


def main(argv):
  args = json.loads(argv[1])
  from configs import unet_shapes
  from segjax import cli
  from segjax.commands.evaluate import default_output, evaluate_checkpoint
  from segjax.commands.predict import predict_files
  from segjax.training import trainer

  config = unet_shapes.get_config("smoke")
  config.unlock()
  config.data.data_dir = args["data_dir"]
  for key, value in args["overrides"].items():
    config[key] = value
  config.data.eval_split = args["eval_split"]
  config.lock()
  # train.py's main, without its flag parsing
  cli.add_xla_flags(config.xla_flags)
  cli.use_compilation_cache(config.compilation_cache_dir, args["workdir"])
  trained = trainer.train_and_evaluate(config, args["workdir"])

  output = default_output(args["workdir"], config.data.eval_split)
  metrics, _ = evaluate_checkpoint(config, args["workdir"], output)

  cloud = predict_files(args["workdir"], args["images"], args["cloud_output"])
  local = predict_files(args["workdir"], args["images"], args["local_output"])

  # The trainer's profiler (config.profile_steps) on one step of a jitted function.
  import jax
  import jax.numpy as jnp
  from segjax.training.run_logging import Profiler
  profiler = Profiler(args["workdir"], first=1, count=1)
  profiler.before(1)
  profiler.after(1, jax.jit(lambda x: jnp.sin(x) * 2)(jnp.ones(8)))

  # Weights: a converted .npz in the bucket is read where it is; fetched from the bucket
  # (sha256-checked) into a gs:// $SEGJAX_CACHE, as a URL's download is.
  import hashlib
  import os
  import tempfile
  import numpy as np
  from segjax import paths
  from segjax.convert import load_variables, pretrained, resolve_init_from, save_variables
  variables = {"params": {"conv": {"kernel": np.arange(6, dtype=np.float32).reshape(2, 3)}}}
  npz_file = os.path.join(tempfile.mkdtemp(), "w.npz")
  save_variables(variables, npz_file)
  weights = args["weights"]
  with open(npz_file, "rb") as f:
    data = f.read()
  paths.write_bytes(weights, data)
  os.environ[pretrained.CACHE_ENV] = args["cache"]
  fetched = pretrained._resolve_url(weights, None, hashlib.sha256(data).hexdigest()[:12])
  kernel = variables["params"]["conv"]["kernel"]
  weights_ok = {"read where it is": resolve_init_from(weights) == weights,
                "fetched into the cache": fetched == args["cache"] + "/pretrained/w.npz",
                "same arrays": all(np.array_equal(load_variables(p)["params"]["conv"]["kernel"],
                                                  kernel) for p in (weights, fetched))}
  print(json.dumps({"step": int(trained["state"].step), "train_mIoU": trained["mIoU"],
                    "eval_output": output, "eval_step": metrics["step"],
                    "eval_mIoU": metrics["mIoU"], "cloud_written": cloud,
                    "local_written": local, "weights_ok": weights_ok}))


if __name__ == "__main__":
  main(sys.argv)
