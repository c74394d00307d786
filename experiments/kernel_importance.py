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
  python -m experiments.kernel_importance --quick --workdir=/tmp/work   # the smoke run

From Python: ``ki.run(ki.Config.quick(), "/tmp/work")`` after
``from experiments import kernel_importance as ki``.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

import jaxprune
from experiments import _cnn_common as cc
from experiments import _flags
from experiments import _report
from experiments import _store
from jaxprune import pruners

STUDY = "kernel_importance"
GROUP = "conv_0"


@dataclasses.dataclass(frozen=True)
class Config:
  """Every setting of the study; each field is also a flag (``_flags.define_flags``)."""
  image_size: tuple = _flags.field(
      (30, 24), "Input HEIGHTxWIDTH (published 90x72; a third of it per side by default to fit "
      "the CPU time budget).", parse=cc.parse_size, unparse=cc.unparse_size)
  epochs: int = _flags.field(20, "Training epochs.")
  batch_size: int = _flags.field(32, "Minibatch size.")
  learning_rate: float = _flags.field(1e-3, "Adam learning rate.")
  test_fraction: float = _flags.field(0.2, "Share of the images held out for testing.")
  max_rise: float = _flags.field(0.1, "Stop before the training loss rises by more than this "
                                 "(nats, absolute) above the unpruned network's.")
  relative: bool = _flags.field(False, "Read --max_rise as a fraction of the starting loss.")
  norm: str = _flags.field("rms", "Importance: rms = sqrt(1/k^2 sum a^2) (the paper), l1 or l2.",
                           choices=pruners.importance.NORMS)
  max_per_class: int | None = _flags.field(
      None, "At most this many bundled images per class (--data=images only; the quick run "
      "uses 8).")
  any_size: bool = _flags.any_size_field(False)
  on_error: str = _flags.on_error_field()
  seed: int = _flags.field(0, "Random seed.")

  @classmethod
  def quick(cls, **kw) -> "Config":
    """The smoke run: 2 epochs on 8 images per class at 16x16."""
    base = dict(image_size=(16, 16), max_per_class=8, epochs=2)
    base.update(kw)
    return cls(**base)

  def validate(self) -> None:
    """One-line usage errors for impossible settings (before any work)."""
    _flags.check_fields(self)
    cc.check_size(self.image_size)
    try:  # before the images are read (this binary has no --arch: LeNet is the study's)
      jaxprune.LeNet(input_shape=(*self.image_size, 1), out_features=2)
    except ValueError as e:
      _flags.fail(f"--image_size={self.image_size[0]}x{self.image_size[1]} is too small for "
                  f"the study's LeNet-style CNN: {e}")
    _flags.check_positive(epochs=self.epochs, batch_size=self.batch_size)
    if self.max_per_class is not None:
      _flags.check_positive(max_per_class=self.max_per_class)
    if not 0.0 < self.test_fraction < 1.0:
      _flags.fail(f"--test_fraction must lie strictly between 0 and 1, got {self.test_fraction}.")
    if not self.max_rise >= 0:
      _flags.fail(f"--max_rise must be >= 0, got {self.max_rise}.")
    _flags.check_finite("learning_rate", self.learning_rate, positive=True)


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


def stop_reason(rows: list[dict], rejected_loss: float | None, limit: float) -> str:
  """Why the removals stopped, for the report: the rejected removal's training loss past the
  limit, the layer's last kernel (never removed), or a removal whose loss was NaN."""
  if rejected_loss is not None:
    return (f"Stopped because removing the next kernel would raise the training loss to "
            f"{rejected_loss:.4g}, past the limit {limit:.4g}.")
  if rows[-1]["units_kept"] == 1:
    return (f"Stopped at the last kernel: the layer always keeps one (no removal raised the "
            f"training loss past the limit {limit:.4g}).")
  return "Stopped because removing the next kernel made the training loss NaN."


def run(config: Config, workdir: str = "workdir", *, data: str = "images",
        data_path: str | None = None) -> dict:
  """Runs (or resumes) the study; returns the results written to results.json."""
  config.validate()
  settings = cc.applied_settings(
      {**dataclasses.asdict(config), "data": data, "data_path": data_path}, data)
  size = tuple(config.image_size)
  ds = cc.load_images(data, data_path, size, 1, max_per_class=config.max_per_class,
                      any_size=config.any_size, on_error=config.on_error)
  split = cc.train_test(ds, config.test_fraction, config.seed)
  model = cc.build_model("lenet", size, 1, ds.num_classes)
  study = _store.Study(STUDY, settings, workdir)
  prog = _report.Progress(2, STUDY)
  init = model.init(_store.config_key(config.seed, "init"))

  def fit():
    return cc.train(model, init, split, key=_store.config_key(config.seed, "train"),
                    epochs=config.epochs, learning_rate=config.learning_rate,
                    batch_size=config.batch_size, desc="train")

  trained, train_rec = study.cached_with_tree("trained", fit, init)
  prog.step("trained")

  def prune():
    pruned, umasks, rows, stopped = prune_kernels(
        model, trained, split.x_train, split.y_train, max_rise=config.max_rise,
        relative=config.relative, norm=config.norm)
    before = jaxprune.evaluate(model, trained, split.x_test, split.y_test)
    after = jaxprune.evaluate(model, pruned, split.x_test, split.y_test)
    return {"steps": rows, "rejected_loss": stopped, "test_before": before, "test_after": after,
            "unit_mask": np.asarray(umasks[GROUP]).tolist()}

  res = study.cached("pruning", prune)
  prog.step("pruned")

  rows = res["steps"]
  table = _report.write_table(study.dir, "pruning_steps", rows,
                              ["pruned", "units_kept", "removed_unit", "removed_importance",
                               "train_loss", "train_accuracy", "min_importance"])
  tb, ta = res["test_before"], res["test_after"]
  summary_rows = [{"network": "before pruning", "kernels": model.groups[GROUP].size,
                   "test_loss": tb["loss"], "test_accuracy": tb["accuracy"]},
                  {"network": "after pruning", "kernels": rows[-1]["units_kept"],
                   "test_loss": ta["loss"], "test_accuracy": ta["accuracy"]}]
  t2 = _report.write_table(study.dir, "test_before_after", summary_rows,
                           ["network", "kernels", "test_loss", "test_accuracy"])
  plt = _report.pyplot()
  fig, axes = plt.subplots(3, 1, figsize=(6.4, 8.0), sharex=True)
  xs = [r["pruned"] for r in rows]
  for ax, key, label in zip(axes, ("train_loss", "train_accuracy", "min_importance"),
                            ("training loss (nats)", "training accuracy (fraction)",
                             "min importance of kept kernels")):
    ax.plot(xs, [r[key] for r in rows], marker="o")
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
  limit = rows[0]["train_loss"] + (config.max_rise * abs(rows[0]["train_loss"]) if config.relative
                                   else config.max_rise)
  axes[0].axhline(limit, color="red", linestyle="--", label="stop threshold")
  if res["rejected_loss"] is not None:
    axes[0].plot([xs[-1] + 1], [res["rejected_loss"]], "rx", label="rejected removal")
  axes[0].legend(fontsize=8)
  axes[-1].set_xlabel("conv-1 kernels pruned (count)")
  axes[0].set_title(f"LeNet conv-1 kernels pruned by least {config.norm} importance")
  _report.save_figure(fig, study.path("pruning_steps.png"))

  results = {"train": train_rec, **res, "kernels_total": model.groups[GROUP].size}
  study.write_results(results)
  rise = (f"{config.max_rise:g} x the starting loss" if config.relative
          else f"{config.max_rise:g} nats")
  study.write_report("Kernel importance: pruning LeNet's first conv layer", [
      ("Set-up", f"{cc.data_description(ds, data)} "
       f"{cc.split_description(split, config.test_fraction, ds.class_names)} Model: "
       f"LeNet-style CNN on "
       f"{size[0]}x{size[1]}x1 inputs trained from scratch for {config.epochs} epochs (Adam "
       f"{config.learning_rate:g}). Conv-1 kernels "
       f"removed one at a time by least {config.norm} importance, stopping before the training "
       f"loss would rise by more than {rise}. Pruned {rows[-1]['pruned']} of "
       f"{model.groups[GROUP].size} kernels. {stop_reason(rows, res['rejected_loss'], limit)}"),
      ("Pruning steps (training set)", table),
      ("Test loss and accuracy", t2),
      ("Figure", "![](pruning_steps.png)"),
  ])
  print(f"Wrote {study.dir}/REPORT.md")
  return results


def main(argv):
  _flags.run_main(argv, Config, run)


if __name__ == "__main__":
  _flags.define_flags(Config, default_data="images")
  _flags.run_binary(main)
