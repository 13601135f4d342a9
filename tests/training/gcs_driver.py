"""What test_gcs_paths.py runs in one process with the emulator's environment: the
resumed training run (as train.py runs it), eval.py's and predict.py's commands on
its gs:// checkpoint, and predict.py's command once more to a local folder for
comparison. Prints one JSON line of results.

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
  print(json.dumps({"step": int(trained["state"].step), "train_mIoU": trained["mIoU"],
                    "eval_output": output, "eval_step": metrics["step"],
                    "eval_mIoU": metrics["mIoU"], "cloud_written": cloud,
                    "local_written": local}))


if __name__ == "__main__":
  main(sys.argv)
