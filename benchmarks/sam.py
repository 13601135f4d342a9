"""Segment Anything inference on the CPU: segjax's `Sam` against segment_anything 1.0,
same machine, same run; each side in its own process, so that its peak memory is its own.

  python benchmarks/sam.py --variant vit_b --size 1024 --queries 64 --repeats 3

The reference is segment_anything's `sam_model_registry[variant]` (at --size 1024) or its
modules built with the official variant's encoder at a smaller input (`--size`, e.g. 512;
window 14, patch 16), with random weights saved by torch.save; segjax converts that file
(`load_peer_checkpoint`, as `--checkpoint x.pth` does). Timed per image: the image encoder
on one padded, normalized image, and the prompt encoder + mask decoder for `--queries`
single-point prompts in one batch with 3 masks each (the automatic generator's batch).
Times are medians of `--repeats` calls after `--warmup` untimed ones (segjax's first call,
which compiles, is given apart). Peak RSS is the process's (`ru_maxrss`: model,
runtime, compiler, activations). The embeddings and masks of both sides are compared.
`--json PATH` also writes the table as benchmarks/report.py's JSON.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import report

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def reference_sam(variant: str, size: int):
  """segment_anything's Sam of `variant` at input `size`, random weights, eval mode."""
  sys.path.insert(0, REPO)
  from tests.torch_reference import import_torchvision
  import_torchvision()
  import functools
  import torch
  from segment_anything import sam_model_registry
  from segment_anything.modeling import (ImageEncoderViT, MaskDecoder, PromptEncoder, Sam,
                                         TwoWayTransformer)
  from segjax.models.sam import VARIANTS
  torch.manual_seed(0)
  if size == 1024:
    return sam_model_registry[variant]().eval()
  dim, depth, heads, glob = VARIANTS[variant]
  return Sam(
      image_encoder=ImageEncoderViT(
          depth=depth, embed_dim=dim, img_size=size, mlp_ratio=4, num_heads=heads,
          norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6), patch_size=16,
          qkv_bias=True, use_rel_pos=True, global_attn_indexes=glob, window_size=14,
          out_chans=256),
      prompt_encoder=PromptEncoder(embed_dim=256, image_embedding_size=(size // 16,) * 2,
                                   input_image_size=(size, size), mask_in_chans=16),
      mask_decoder=MaskDecoder(num_multimask_outputs=3, transformer_dim=256, iou_head_depth=3,
                               iou_head_hidden_dim=256,
                               transformer=TwoWayTransformer(depth=2, embedding_dim=256,
                                                             mlp_dim=2048, num_heads=8))).eval()


def inputs(size: int, queries: int):
  import numpy as np
  rng = np.random.default_rng(0)
  image = rng.normal(size=(1, size, size, 3)).astype(np.float32)
  points = rng.uniform(0, size, size=(queries, 1, 2)).astype(np.float32)
  return image, points, np.ones((queries, 1), np.float32)


def timed(fn, repeats, warmup):
  """(first call's seconds, median seconds of `repeats` calls after `warmup`, result)."""
  import numpy as np
  start = time.perf_counter()
  result = fn()
  first = time.perf_counter() - start
  for _ in range(warmup - 1):
    fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    result = fn()
    times.append(time.perf_counter() - start)
  return first, float(np.median(times)), result


def bench_torch(args):
  import numpy as np
  import torch
  torch.set_num_threads(os.cpu_count())
  sam = reference_sam(args.variant, args.size)
  torch.save(sam.state_dict(), args.checkpoint)
  image, points, labels = inputs(args.size, args.queries)
  x = torch.from_numpy(image).permute(0, 3, 1, 2)
  with torch.no_grad():
    _, enc_s, emb = timed(lambda: sam.image_encoder(x), args.repeats, args.warmup)

    def decode():
      sparse, dense = sam.prompt_encoder(points=(torch.from_numpy(points),
                                                 torch.from_numpy(labels)), boxes=None,
                                         masks=None)
      return sam.mask_decoder(image_embeddings=emb, image_pe=sam.prompt_encoder.get_dense_pe(),
                              sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                              multimask_output=True)
    _, dec_s, (low, iou) = timed(decode, args.repeats, args.warmup)
  np.savez(args.outputs, embeddings=emb.permute(0, 2, 3, 1).numpy(), masks=low.numpy(),
           iou=iou.numpy())
  return {"encoder_s": enc_s, "decoder_s": dec_s, "peak_rss_gb": report.peak_rss_gb(),
          "threads": torch.get_num_threads(), "version": torch.__version__}


def bench_segjax(args):
  report.use_train_defaults()
  import jax
  import jax.numpy as jnp
  import numpy as np
  from segjax.convert import load_peer_checkpoint
  from segjax.models.sam import Sam
  model = Sam(variant=args.variant, image_size=args.size)
  variables = jax.device_put(load_peer_checkpoint(args.checkpoint, model))
  image, points, labels = inputs(args.size, args.queries)
  encode = jax.jit(lambda v, x: model.apply(v, x, method=Sam.embed_image))
  decode = jax.jit(lambda v, e, p, l: model.apply(v, e, p, l, multimask_output=True,
                                                   method=Sam.decode))
  x = jnp.asarray(image)
  enc_first, enc_s, emb = timed(lambda: encode(variables, x).block_until_ready(), args.repeats,
                                args.warmup)
  p, lab = jnp.asarray(points[None]), jnp.asarray(labels[None])
  dec_first, dec_s, (low, iou) = timed(
      lambda: jax.block_until_ready(decode(variables, emb, p, lab)), args.repeats, args.warmup)
  np.savez(args.outputs, embeddings=np.asarray(emb), masks=np.asarray(low[0]),
           iou=np.asarray(iou[0]))
  return {"encoder_s": enc_s, "decoder_s": dec_s, "encoder_first_s": enc_first,
          "decoder_first_s": dec_first, "peak_rss_gb": report.peak_rss_gb(),
          "version": jax.__version__, "device": str(jax.devices()[0].platform)}


def run_child(side, args, tmp):
  out = os.path.join(tmp, f"{side}.json")
  command = [sys.executable, os.path.abspath(__file__), "--variant", args.variant, "--size",
             str(args.size), "--queries", str(args.queries), "--repeats", str(args.repeats),
             "--warmup", str(args.warmup), "--only", side, "--result", out,
             "--checkpoint", os.path.join(tmp, "sam.pth"),
             "--outputs", os.path.join(tmp, f"{side}.npz")]
  done = subprocess.run(command, cwd=REPO)
  if done.returncode:
    why = (f"killed by signal {-done.returncode} (out of memory?)" if done.returncode < 0
           else f"exit {done.returncode}")
    raise SystemExit(f"the {side} side of the SAM benchmark failed ({why}).")
  with open(out) as f:
    return json.load(f)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--variant", default="vit_b", choices=("vit_b", "vit_l", "vit_h"))
  parser.add_argument("--size", type=int, default=1024,
                      help="input side (1024: the official model; smaller: a multiple of 16)")
  parser.add_argument("--queries", type=int, default=64, help="point prompts per decoder call")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--warmup", type=int, default=1)
  for internal in ("--only", "--result", "--checkpoint", "--outputs"):
    parser.add_argument(internal, help=argparse.SUPPRESS)
  report.add_json_argument(parser)
  args = parser.parse_args()
  if args.size % 16 or args.size < 64 or args.size > 1024:
    parser.error(f"--size must be a multiple of 16 in [64, 1024], got {args.size}.")
  if min(args.queries, args.repeats, args.warmup) < 1:
    parser.error("--queries, --repeats and --warmup must be positive.")
  if args.only:
    result = (bench_torch if args.only == "torch" else bench_segjax)(args)
    with open(args.result, "w") as f:
      json.dump(result, f)
    return

  import numpy as np
  load_before = os.getloadavg()[0]
  with tempfile.TemporaryDirectory() as tmp:
    ref = run_child("torch", args, tmp)  # writes the checkpoint segjax loads
    ours = run_child("segjax", args, tmp)
    a, b = np.load(os.path.join(tmp, "segjax.npz")), np.load(os.path.join(tmp, "torch.npz"))
    diff = {k: float(np.abs(a[k] - b[k]).max() / np.abs(b[k]).max()) for k in b.files}
  print(f"SAM {args.variant} at {args.size}x{args.size}, {args.queries} point prompts per "
        f"decoder call; jax {ours['version']} on {ours['device']}, torch {ref['version']} with "
        f"{ref['threads']} threads; {os.cpu_count()} CPUs")
  table = report.Table(["part", "segjax s", "segment_anything s",
                        "ratio (reference s / segjax s)", "segjax 1st call s (compiles)"])
  for part, key in (("image encoder, per image", "encoder"),
                    (f"prompt encoder + mask decoder, {args.queries} prompts", "decoder")):
    table.add(part, f"{ours[key + '_s']:.3f}", f"{ref[key + '_s']:.3f}",
              f"{ref[key + '_s'] / ours[key + '_s']:.2f}", f"{ours[key + '_first_s']:.1f}")
  table.add("peak RSS (GB)", f"{ours['peak_rss_gb']:.2f}", f"{ref['peak_rss_gb']:.2f}",
            f"{ref['peak_rss_gb'] / ours['peak_rss_gb']:.2f}", "")
  notes = ["Largest difference / largest magnitude, segjax against the reference: "
           + ", ".join(f"{k} {v:.1e}" for k, v in diff.items()) + ".",
           f"Machine load (1-minute average) {load_before:.1f} at the start, "
           f"{os.getloadavg()[0]:.1f} at the end, on {os.cpu_count()} CPUs."]
  size = ("the official model (sam_model_registry)" if args.size == 1024 else
          f"the official {args.variant} encoder at a {args.size}x{args.size} input")
  table.finish(
      args.json, benchmark=f"SAM {args.variant} inference against segment_anything",
      setup=(f"segment_anything 1.0, {size}, random weights saved with torch.save and loaded "
             "by segjax's load_peer_checkpoint; each side in its own process. Image encoder: "
             "one normalized padded image; decoder: prompt encoder + mask decoder for "
             f"{args.queries} single-point prompts (multimask, 3 masks each) on that image's "
             f"embedding. Median of {args.repeats} calls after {args.warmup} warm-up call(s); "
             "segjax's first call (compiling) apart. Peak RSS: ru_maxrss of each process."),
      notes=notes)


if __name__ == "__main__":
  main()
