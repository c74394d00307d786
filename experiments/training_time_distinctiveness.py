"""Distinctiveness pruning during training of the 4-conv + 4-dense sigmoid CNN, 5-fold CV.

Each fold trains the network twice with the same shuffling: without pruning, and with pruning
during training. Every ``--check_every`` epochs (before the last epoch) the angles between the
hidden-to-output weight vectors of ``--layer`` (each unit's outgoing weights; by default
``dense_2``, the 64-unit layer that feeds the output layer) are computed; with pruning, units
whose vector is closer than ``--angle`` degrees to another kept unit's are removed by weight
distinctiveness (similar-only, from outgoing weights: the removed unit's outgoing weights are
added to the kept one's), sweeping until no pair of kept units is below the angle.

The pruning runs inside the optimizer: ``jaxprune.scheduled(adam, distinctiveness_pruner(...),
begin_step=k, frequency=k)`` with k the steps of ``--check_every`` epochs, so the merge happens
in the first update after each check (from the params the check measured), the masks live in
the optimizer state, and removed units' weights stay exactly zero for the rest of training (the
optimizer state carries on across checks). Training runs in chunks of ``--check_every`` epochs
only to record the angles at each check.

Reported: training-loss curves with and without pruning (pruning events marked), validation
accuracy per fold and mean, at each check the minimum and maximum angle and the units pruned,
and the parameters and FLOPs of the pruned network (fold 1; dense, masked and compacted).

  python -m experiments.training_time_distinctiveness --workdir=/tmp/work
  python -m experiments.training_time_distinctiveness --quick --workdir=/tmp/work   # the smoke run

From Python: ``ttd.run(ttd.Config.quick(), "/tmp/work")`` after
``from experiments import training_time_distinctiveness as ttd``.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxprune
from experiments import _cnn_common as cc
from experiments import _flags
from experiments import _mlp_common as mc
from experiments import _report
from experiments import _store
from jaxprune import data as data_lib
from jaxprune import pruners

STUDY = "training_time_distinctiveness"
VARIANTS = ("no_pruning", "pruning")


@dataclasses.dataclass(frozen=True)
class Config:
  """Every setting of the study; each field is also a flag (``_flags.define_flags``)."""
  image_size: tuple = _flags.field(
      (64, 64), "Input HEIGHTxWIDTH (published 227x227; 64x64 by default to fit the CPU time "
      "budget, CNN4 adapts its flatten size; at least 59x59).", parse=cc.parse_size,
      unparse=cc.unparse_size)
  channels: int = _flags.field(1, "Image channels, 1 or 3 (published: RGB; the bundled images "
                               "are gray, so 1 by default).")
  folds: int = _flags.field(5, "Cross-validation folds.")
  epochs: int = _flags.field(30, "Training epochs per fold.")
  check_every: int = _flags.field(5, "Epochs between distinctiveness checks.")
  angle: float = _flags.field(25.0, "Units whose outgoing weight vectors are closer than this "
                              "many degrees are merged.")
  layer: str = _flags.field("dense_2", "Dense unit group whose hidden-to-output weights are "
                            "checked (default: the layer feeding the output layer).")
  batch_size: int = _flags.field(32, "Minibatch size.")
  learning_rate: float = _flags.field(3e-3, "Adam learning rate.")
  max_per_class: int | None = _flags.field(
      None, "At most this many bundled images per class (--data=images only; the quick run "
      "uses 6).")
  any_size: bool = _flags.any_size_field(False)
  on_error: str = _flags.on_error_field()
  seed: int = _flags.field(0, "Random seed.")

  @classmethod
  def quick(cls, **kw) -> "Config":
    """The smoke run: 2 folds of 4 epochs, a check every 2, on 6 images per class."""
    base = dict(max_per_class=6, epochs=4, check_every=2, folds=2)
    base.update(kw)
    return cls(**base)

  def validate(self) -> None:
    """One-line usage errors for impossible settings (before any work)."""
    _flags.check_fields(self)
    cc.check_size(self.image_size)
    if self.channels not in (1, 3):
      _flags.fail(f"--channels must be 1 or 3, got {self.channels}.")
    _flags.check_positive(epochs=self.epochs, check_every=self.check_every,
                          batch_size=self.batch_size)
    if self.check_every >= self.epochs:
      _flags.fail(f"--check_every={self.check_every} must be smaller than "
                  f"--epochs={self.epochs}: checks run every --check_every epochs before the "
                  "last epoch, so none would run and the pruning run would prune nothing.")
    if self.max_per_class is not None:
      _flags.check_positive(max_per_class=self.max_per_class)
    if self.folds < 2:
      _flags.fail(f"--folds must be at least 2, got {self.folds}.")
    if not 0.0 <= self.angle <= 180.0:
      _flags.fail(f"--angle must be in [0, 180] degrees, got {self.angle}.")
    _flags.check_finite("learning_rate", self.learning_rate, positive=True)


@functools.lru_cache(maxsize=None)
def make_trainer(model, *, prune: bool, steps_between_checks: int, layer: str, angle: float,
                 learning_rate: float, batch_size: int):
  """Adam, wrapped (with pruning) to run distinctiveness every ``steps_between_checks`` steps."""
  tx = optax.inject_hyperparams(optax.adam)(learning_rate=learning_rate)
  if prune:
    pruner = jaxprune.distinctiveness_pruner(model, layer, similar_deg=angle,
                                             complementary=False, constants=False,
                                             source="outgoing")
    tx = jaxprune.scheduled(tx, pruner, begin_step=steps_between_checks,
                            frequency=steps_between_checks)
  return jaxprune.make_trainer(model, batch_size=batch_size, optimizer=tx)


def angle_range(params, group, unit_mask):
  """(min, max) angle in degrees between the outgoing vectors of the kept units."""
  ang = np.asarray(pruners.weight_angles(params, group, source="outgoing"))
  keep = np.asarray(unit_mask)
  sel = keep[:, None] & keep[None, :] & ~np.eye(len(keep), dtype=bool) & np.isfinite(ang)
  if not sel.any():
    return None, None
  return float(ang[sel].min()), float(ang[sel].max())


def max_abs_masked(params, wmasks) -> float:
  """Largest |w| over masked-out positions (0.0 when pruned weights are exactly zero)."""
  # On the host: eager jnp ops would compile a program per leaf shape and op, for a check.
  vals = jax.tree.leaves(jax.tree.map(
      lambda p, m: np.max(np.where(np.asarray(m), 0.0, np.abs(np.asarray(p, np.float32))),
                          initial=0.0), params, wmasks))
  return float(max(vals)) if vals else 0.0


def check_line(check: dict, kept: int, size: int) -> str:
  """The progress line of a check: its angles in degrees to one decimal (None: no pair of kept
  units to measure) and the units kept.

  Example:
    >>> check_line({"min_angle": 19.247135162353516, "max_angle": 164.4}, 61, 64)
    'min angle 19.2, max angle 164.4, kept 61/64'
  """
  def deg(v):
    return "none" if v is None else f"{v:.1f}"
  return (f"min angle {deg(check['min_angle'])}, max angle {deg(check['max_angle'])}, "
          f"kept {kept}/{size}")


def train_fold(model, params, train, val, *, key, prune: bool, s: dict):
  """Trains one fold in chunks of ``check_every`` epochs, recording each check between chunks.

  Returns ``(final_params, record)``; the record holds per-epoch training loss and validation
  accuracy, and one entry per check (epoch, min/max angle before, units pruned, units kept,
  and the largest |w| among masked weights, which must be 0).
  """
  layer = s["layer"]
  group = model.groups[layer]
  x, y = jnp.asarray(train[0]), jnp.asarray(train[1])
  steps = math.ceil(x.shape[0] / s["batch_size"]) * s["check_every"]
  trainer = make_trainer(model, prune=prune, steps_between_checks=steps, layer=layer,
                         angle=float(s["angle"]), learning_rate=float(s["learning_rate"]),
                         batch_size=s["batch_size"])
  rec = {"checks": []}
  pending, last = [], {}

  def masks_now(st):
    if not prune:
      return jaxprune.ones_like(st.params["params"]), jnp.ones((group.size,), bool)
    return (jaxprune.masks_of(st.opt_state),
            jaxprune.unit_masks_of(st.opt_state)[layer])

  def check(done, state):
    """Between chunks of ``check_every`` epochs: the last check's pruning ran in the first
    update of this chunk (record what it removed); before the last epoch, measure the next."""
    wmasks, umask = masks_now(state)
    if pending:
      c = pending.pop()
      kept = int(np.sum(np.asarray(umask)))
      c.update(kept_after=kept, pruned_now=c["kept_before"] - kept,
               pruned_units=np.flatnonzero(~np.asarray(umask)).tolist())
      rec["checks"].append(c)
      # A line, not a stage: the check's time belongs to the fold's row of the time table.
      _report.note(f"fold check, epoch {c['epoch']}", check_line(c, kept, group.size))
    if done < s["epochs"]:
      lo, hi = angle_range(state.params, group, umask)
      pending.append({"epoch": done, "min_angle": lo, "max_angle": hi,
                      "kept_before": int(np.sum(np.asarray(umask))),
                      "max_abs_masked_before": max_abs_masked(state.params["params"], wmasks)})
    last["state"] = state

  _, hist = jaxprune.fit(model, params, x, y, key=key, epochs=s["epochs"],
                         learning_rate=float(s["learning_rate"]), validation=val,
                         log_every=s["check_every"], progress=False, trainer=trainer,
                         callback=check)
  for name, src in (("train_loss", "loss"), ("train_accuracy", "accuracy"),
                    ("val_loss", "val_loss"), ("val_accuracy", "val_accuracy")):
    rec[name] = [float(v) for v in np.asarray(hist[src])]
  state = last["state"]
  wmasks, umask = masks_now(state)
  rec["final_max_abs_masked"] = max_abs_masked(state.params["params"], wmasks)
  rec["final_unit_mask"] = np.asarray(umask).tolist()
  rec["final_units_kept"] = int(np.sum(np.asarray(umask)))
  return state.params, rec


def run(config: Config, workdir: str = "workdir", *, data: str = "images",
        data_path: str | None = None) -> dict:
  """Runs (or resumes) the study; returns the results written to results.json."""
  config.validate()
  s = cc.applied_settings({**dataclasses.asdict(config), "data": data,
                           "data_path": data_path}, data)
  size = tuple(s["image_size"])
  try:
    model = jaxprune.CNN4(input_shape=(size[0], size[1], s["channels"]))
  except ValueError as e:
    _flags.fail(f"--image_size={size[0]}x{size[1]} is too small for the 4-conv CNN: {e}")
  if s["layer"] not in model.groups or model.groups[s["layer"]].kind != "dense":
    dense = [n for n, g in model.groups.items() if g.kind == "dense"]
    _flags.fail(f"--layer={s['layer']!r} is not a dense unit group of the 4-conv CNN; choose "
                f"one of {dense}.")
  ds = cc.load_images(data, data_path, size, s["channels"], max_per_class=config.max_per_class,
                      any_size=config.any_size, on_error=config.on_error)
  # the MLP studies' check: its one-line errors name only what the flags can change (the
  # library's advice named test_fraction and person_independent=False, which this binary
  # lacks, and fewer folds when 2 already failed)
  mc.check_folds(ds, s["folds"], seed=s["seed"])
  folds = data_lib.kfold(ds, n_splits=s["folds"], seed=s["seed"],
                         person_independent=ds.groups is not None)
  study = _store.Study(STUDY, s, workdir)
  prog = _report.Progress(len(VARIANTS) * len(folds), STUDY)
  init = model.init(_store.config_key(s["seed"], "init"))

  records = {v: [] for v in VARIANTS}
  for f, (tr, te) in enumerate(folds):
    for variant in VARIANTS:
      def run(tr=tr, te=te, f=f, variant=variant):
        return train_fold(model, init, (ds.x[tr], ds.y[tr]), (ds.x[te], ds.y[te]),
                          key=_store.config_key(s["seed"], "fold", f), prune=variant == "pruning",
                          s=s)

      with mc.diverging_training_fails("learning_rate", s["learning_rate"]):
        final, rec = study.cached_with_tree(f"{variant}_fold{f}", run, init)
      records[variant].append(rec)
      if f == 0 and variant == "pruning":
        final0 = final
      prog.step(f"fold {f + 1}/{len(folds)} {variant}")

  # Tables.
  acc_rows = []
  for f in range(len(folds)):
    acc_rows.append({"fold": f + 1, **{f"val_acc_{v}": records[v][f]["val_accuracy"][-1]
                                       for v in VARIANTS},
                     "units_kept_pruning": records["pruning"][f]["final_units_kept"]})
  mean = {f"val_acc_{v}": float(np.mean([r["val_accuracy"][-1] for r in records[v]]))
          for v in VARIANTS}
  acc_rows.append({"fold": "mean", **mean, "units_kept_pruning": float(np.mean(
      [r["final_units_kept"] for r in records["pruning"]]))})
  check_rows = []
  for v in VARIANTS:
    for f, r in enumerate(records[v]):
      for c in r["checks"]:
        check_rows.append({"variant": v, "fold": f + 1, "epoch": c["epoch"],
                           "min_angle": c["min_angle"], "max_angle": c["max_angle"],
                           "pruned_now": c["pruned_now"], "kept_after": c["kept_after"],
                           "pruned_units": " ".join(map(str, c["pruned_units"]))})
  t_acc = _report.write_table(study.dir, "validation_accuracy", acc_rows,
                              ["fold", "val_acc_no_pruning", "val_acc_pruning",
                               "units_kept_pruning"])
  t_chk = _report.write_table(study.dir, "checks", check_rows,
                              ["variant", "fold", "epoch", "min_angle", "max_angle",
                               "pruned_now", "kept_after", "pruned_units"])

  # Figures: mean training loss (epoch e at x = e, x = 0 omitted) with the pruning checks marked.
  events = [c["epoch"] for c in records["pruning"][0]["checks"]]
  curves = {}
  for v in VARIANTS:
    curves[f"train loss, {v.replace('_', ' ')} (mean of folds)"] = (
        [np.nan] + np.mean([r["train_loss"] for r in records[v]], axis=0).tolist())
    curves[f"val loss, {v.replace('_', ' ')} (mean of folds)"] = (
        [np.nan] + np.mean([r["val_loss"] for r in records[v]], axis=0).tolist())
  cc.plot_curves(study.path("loss_curves.png"),
                 f"CNN4, {len(folds)}-fold CV: pruning < {s['angle']:g} deg on {s['layer']}",
                 curves, ylabel="cross-entropy loss (nats)", vlines=events,
                 vlabel="distinctiveness check")
  kept_curves = {f"fold {f + 1}": [model.groups[s["layer"]].size] + [c["kept_after"]
                                                                     for c in r["checks"]]
                 for f, r in enumerate(records["pruning"])}
  plt = _report.pyplot()
  fig, ax = plt.subplots(figsize=(6.4, 4.2))
  for label, ys in kept_curves.items():
    ax.plot([0] + events, ys, marker="o", label=label)
  ax.set_xlabel("epoch")
  ax.set_ylabel(f"units kept in {s['layer']}")
  ax.set_title("Units kept after each check (pruning run)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  _report.save_figure(fig, study.path("units_kept.png"))

  unit0 = {s["layer"]: jnp.asarray(records["pruning"][0]["final_unit_mask"])}
  t_flops = study.write_flops(model, final0, jaxprune.expand(final0, model, unit0), unit0)
  results = {"folds": records, "mean_val_accuracy": mean,
             "layer_size": model.groups[s["layer"]].size}
  study.write_results(results)
  study.write_report("Training-time distinctiveness (4-conv + 4-dense sigmoid CNN)", [
      ("Set-up", f"{cc.data_description(ds, data)} Model: CNN4 (sigmoid) on "
       f"{size[0]}x{size[1]}x{s['channels']} inputs, {s['folds']}-fold CV, {s['epochs']} epochs, "
       f"Adam {s['learning_rate']:g}, batch {s['batch_size']}. Every {s['check_every']} epochs "
       f"the angles between the outgoing (hidden-to-output) weight vectors of {s['layer']} are "
       f"checked; in the pruning run units closer than {s['angle']:g} deg are merged "
       "(similar-only weight distinctiveness, repeated until no pair is below the angle) and "
       "masked, their weights and gradients held at zero, by the optimizer itself "
       "(jaxprune.scheduled with distinctiveness_pruner). Both runs of a fold use the same "
       "initial weights and shuffling."),
      ("Validation accuracy (final epoch)", t_acc),
      ("Checks (min/max angle among kept units before pruning)", t_chk),
      ("Parameters and FLOPs of the pruned network (fold 1, per example)",
       f"```text\n{t_flops}\n```"),
      ("Figures", "![](loss_curves.png)\n\n![](units_kept.png)"),
  ])
  print(f"Wrote {study.dir}/REPORT.md")
  return results


def main(argv):
  _flags.run_main(argv, Config, run)


if __name__ == "__main__":
  _flags.define_flags(Config, default_data="images")
  _flags.run_binary(main)
