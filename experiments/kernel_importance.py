"""Kernel importance (Luan): prune conv-1 kernels of a LeNet-style CNN by least importance.

The LeNet-style CNN is trained on grayscale images; then the kernels of its first conv layer
(unit group ``conv_0``) are removed one at a time, least important first (importance
I = sqrt(1/k^2 sum a^2) over the kernel's weights), re-evaluating the training loss after each
removal, and the procedure stops before the training loss would rise by more than
``--max_rise`` (0.1 by default, absolute; ``--relative`` makes it a fraction of the starting
loss) above the unpruned network's. Reported: a table and figure of pruned count against
training loss, training accuracy and the minimum importance among kept kernels, and the test
loss and accuracy before and after.

  python -m experiments.kernel_importance --workdir=/tmp/work
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from absl import flags

import jaxprune
from experiments import _cnn_common as cc
from experiments import _common
from jaxprune import pruners

FLAGS = flags.FLAGS
STUDY = "kernel_importance"
GROUP = "conv_0"

def define_flags() -> None:
  """Defines this binary's flags (only when run as a program, so tests can import it)."""
  _common.define_common_flags("images")
  flags.DEFINE_string("image_size", "30x24", "Input HEIGHTxWIDTH (published 90x72; a third of it per "
                      "side by default to fit the CPU time budget).")
  flags.DEFINE_integer("epochs", 20, "Training epochs.")
  flags.DEFINE_integer("batch_size", 32, "Minibatch size.")
  flags.DEFINE_float("learning_rate", 1e-3, "Adam learning rate.")
  flags.DEFINE_float("test_fraction", 0.2, "Share of the images held out for testing.")
  flags.DEFINE_float("max_rise", 0.1, "Stop before the training loss rises by more than this "
                     "(nats, absolute) above the unpruned network's.")
  flags.DEFINE_bool("relative", False, "Read --max_rise as a fraction of the starting loss.")
  flags.DEFINE_enum("norm", "rms", list(pruners.importance.NORMS),
                    "Importance: rms = sqrt(1/k^2 sum a^2) (the paper), l1 or l2.")

QUICK = {"size": (16, 16), "max_per_class": 8, "epochs": 2}


def settings() -> dict:
  quick = FLAGS.quick
  size = cc.parse_size(_common.quick_or_flag("image_size", "x".join(map(str, QUICK["size"]))),
                       "image_size")
  _common.check_positive(epochs=FLAGS.epochs, batch_size=FLAGS.batch_size)
  if not 0.0 < FLAGS.test_fraction < 1.0:
    _common.fail(f"--test_fraction must lie strictly between 0 and 1, got {FLAGS.test_fraction}.")
  if not FLAGS.max_rise >= 0:
    _common.fail(f"--max_rise must be >= 0, got {FLAGS.max_rise}.")
  if not FLAGS.learning_rate > 0:
    _common.fail(f"--learning_rate must be positive, got {FLAGS.learning_rate}.")
  return {"data": FLAGS.data, "data_path": FLAGS.data_path, "seed": FLAGS.seed, "quick": quick,
          "image_size": list(size), "epochs": _common.quick_or_flag("epochs", QUICK["epochs"]),
          "batch_size": FLAGS.batch_size, "learning_rate": FLAGS.learning_rate,
          "test_fraction": FLAGS.test_fraction, "max_rise": FLAGS.max_rise,
          "relative": FLAGS.relative, "norm": FLAGS.norm}


def prune_kernels(model, params, x, y, *, max_rise: float, relative: bool, norm: str):
  """Iterative importance pruning of ``conv_0`` against the training loss on (x, y).

  Returns ``(pruned_params, unit_masks, rows, stopped_loss)``; ``rows[s]`` describes the network
  after ``s`` removals (row 0 is the unpruned network): units kept, the unit removed, training
  loss and accuracy, and the smallest importance among kept kernels.
  """
  trainer = jaxprune.make_trainer(model)
  x, y = jnp.asarray(x), jnp.asarray(y)
  loss_fn = lambda p: trainer.evaluate(p, x, y)["loss"]
  run = pruners.iterative_importance(model, GROUP, loss_fn, norm=norm, relative=relative)
  umasks = {GROUP: jnp.ones((model.groups[GROUP].size,), bool)}
  pruned, umasks, rep = run(params, umasks, max_rise)
  scores = np.asarray(pruners.importance_scores(params, model, GROUP, norm))
  count = int(rep.count)
  removed = np.asarray(rep.removed)
  rows, keep = [], np.ones(model.groups[GROUP].size, bool)
  for s in range(count):
    if s > 0:
      keep[removed[s]] = False
    wm = jaxprune.expand(params, model, {GROUP: jnp.asarray(keep)})
    m = jaxprune.evaluate(model, params, x, y, masks=wm)
    rows.append({"pruned": s, "units_kept": int(keep.sum()),
                 "removed_unit": int(removed[s]) if s > 0 else "",
                 "removed_importance": float(scores[removed[s]]) if s > 0 else "",
                 "train_loss": m["loss"], "train_accuracy": m["accuracy"],
                 "min_importance": float(scores[keep].min())})
  stopped = float(rep.stopped_loss)
  return pruned, umasks, rows, (None if np.isnan(stopped) else stopped)


def main(argv):
  _common.check_no_args(argv)
  s = settings()
  size = tuple(s["image_size"])
  ds = cc.load_images(size, 1, max_per_class=QUICK["max_per_class"] if s["quick"] else None)
  split = cc.train_test(ds, s["test_fraction"], s["seed"])
  model = cc.build_model("lenet", size, 1, ds.num_classes)
  study = _common.Study(STUDY, s)
  prog = _common.Progress(2, STUDY)
  init = model.init(_common.config_key(s["seed"], "init"))

  def fit():
    return cc.train(model, init, split, key=_common.config_key(s["seed"], "train"),
                    epochs=s["epochs"], learning_rate=s["learning_rate"],
                    batch_size=s["batch_size"], desc="train")

  trained, train_rec = study.cached_with_tree("trained", fit, init)
  prog.step("trained")

  def prune():
    pruned, umasks, rows, stopped = prune_kernels(
        model, trained, split.x_train, split.y_train, max_rise=s["max_rise"],
        relative=s["relative"], norm=s["norm"])
    before = jaxprune.evaluate(model, trained, split.x_test, split.y_test)
    after = jaxprune.evaluate(model, pruned, split.x_test, split.y_test)
    return {"steps": rows, "rejected_loss": stopped, "test_before": before, "test_after": after,
            "unit_mask": np.asarray(umasks[GROUP]).tolist()}

  res = study.cached("pruning", prune)
  prog.step("pruned")

  rows = res["steps"]
  table = _common.write_table(study.dir, "pruning_steps", rows,
                              ["pruned", "units_kept", "removed_unit", "removed_importance",
                               "train_loss", "train_accuracy", "min_importance"])
  tb, ta = res["test_before"], res["test_after"]
  summary_rows = [{"network": "before pruning", "kernels": model.groups[GROUP].size,
                   "test_loss": tb["loss"], "test_accuracy": tb["accuracy"]},
                  {"network": "after pruning", "kernels": rows[-1]["units_kept"],
                   "test_loss": ta["loss"], "test_accuracy": ta["accuracy"]}]
  t2 = _common.write_table(study.dir, "test_before_after", summary_rows,
                           ["network", "kernels", "test_loss", "test_accuracy"])
  plt = _common.pyplot()
  fig, axes = plt.subplots(3, 1, figsize=(6.4, 8.0), sharex=True)
  xs = [r["pruned"] for r in rows]
  for ax, key, label in zip(axes, ("train_loss", "train_accuracy", "min_importance"),
                            ("training loss (nats)", "training accuracy (fraction)",
                             "min importance of kept kernels")):
    ax.plot(xs, [r[key] for r in rows], marker="o")
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
  limit = rows[0]["train_loss"] + (s["max_rise"] * abs(rows[0]["train_loss"]) if s["relative"]
                                   else s["max_rise"])
  axes[0].axhline(limit, color="red", linestyle="--", label="stop threshold")
  if res["rejected_loss"] is not None:
    axes[0].plot([xs[-1] + 1], [res["rejected_loss"]], "rx", label="rejected removal")
  axes[0].legend(fontsize=8)
  axes[-1].set_xlabel("conv-1 kernels pruned (count)")
  axes[0].set_title(f"LeNet conv-1 kernels pruned by least {s['norm']} importance")
  _common.save_figure(fig, study.path("pruning_steps.png"))

  study.write_results({"train": train_rec, **res, "kernels_total": model.groups[GROUP].size})
  rise = (f"{s['max_rise']:g} x the starting loss" if s["relative"]
          else f"{s['max_rise']:g} nats")
  study.write_report("Kernel importance: pruning LeNet's first conv layer", [
      ("Set-up", f"{cc.data_description(ds)} Model: LeNet-style CNN on {size[0]}x{size[1]}x1 "
       f"inputs trained from scratch for {s['epochs']} epochs (Adam {s['learning_rate']:g}); "
       f"{len(split.y_train)} training and {len(split.y_test)} test images. Conv-1 kernels "
       f"removed one at a time by least {s['norm']} importance, stopping before the training "
       f"loss would rise by more than {rise}. Pruned {rows[-1]['pruned']} of "
       f"{model.groups[GROUP].size} kernels."),
      ("Pruning steps (training set)", table),
      ("Test loss and accuracy", t2),
      ("Figure", "![](pruning_steps.png)"),
  ])
  print(f"Wrote {study.dir}/REPORT.md")


if __name__ == "__main__":
  define_flags()
  _common.run_binary(main)
