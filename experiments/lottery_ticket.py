"""Lottery tickets: one-shot percentile pruning, rewinding to the initial weights, retraining.

A CNN is fine-tuned on the images (ResNet-18 from ``--pretrained``, else a smaller CNN trained
from scratch). For each fraction (20, 50, 70 and 90 percent by default) the fine-tuned network
is pruned once by layerwise magnitude percentile (every kernel; biases and batch-norm
parameters kept), the kept weights are rewound to the initial weights (the pretrained weights,
or the from-scratch initialisation) and the pruned network is retrained with its mask for
``--retrain_epochs``. The same is done with random pruning of the same counts. Reported: test
accuracy per epoch, one figure per fraction, and the first epoch at which each reaches the
unpruned (fine-tuned) test accuracy, or 'never'.

  python -m experiments.lottery_ticket --workdir=/tmp/work
  python -m experiments.lottery_ticket --quick --workdir=/tmp/work   # the smoke run

From Python: ``lt.run(lt.Config.quick(), "/tmp/work")`` after
``from experiments import lottery_ticket as lt``.
"""

from __future__ import annotations

import dataclasses
import decimal

import jaxprune
from experiments import _cnn_common as cc
from experiments import _cnn_finetune as ft
from experiments import _flags
from experiments import _report
from experiments import _store
from jaxprune import pruners

STUDY = "lottery_ticket"
METHODS = ("magnitude", "random")


@dataclasses.dataclass(frozen=True)
class Config(ft.Config):
  """Every setting of the study: the fine-tuned network's (``_cnn_finetune.Config``) and the
  pruned fractions; each field is also a flag (``_flags.define_flags``)."""
  fractions: tuple = _flags.field((0.2, 0.5, 0.7, 0.9), "Fractions of every kernel's weights "
                                  "pruned (one-shot, per layer).", low=0.0, high=1.0)


def figure_name(fraction: float) -> str:
  """The figure of one fraction: ``lottery_<percent>pct.png``, the percent written exactly from
  the fraction's 6 significant digits (0.2 -> ``lottery_20pct.png``, 0.201 ->
  ``lottery_20.1pct.png``), so that fractions the flags tell apart never share a figure."""
  pct = decimal.Decimal(f"{fraction:g}").scaleb(2).normalize()
  return f"lottery_{pct:f}pct.png"


def prune_and_rewind(method: str, trained, init_params, fraction, *, key):
  """One-shot layerwise pruning of ``trained``, kept weights rewound to ``init_params``.

  Args:
    method: 'magnitude' (smallest |w| of the trained weights) or 'random' (same counts).
    trained: the fine-tuned variables.
    init_params: the saved initial variables (same structure).
    fraction: fraction of each kernel's weights to prune.
    key: PRNG key for random pruning.

  Returns:
    ``(rewound, weight_masks)``: ``rewound`` equals ``init_params`` where the mask keeps a
    weight and is 0 where it prunes one.
  """
  if method == "magnitude":
    _, masks, _ = pruners.magnitude_prune(trained, None, fraction, scope="layer")
  elif method == "random":
    _, masks, _ = pruners.random_prune(trained, None, fraction, key=key, scope="layer")
  else:
    raise ValueError(f"method must be one of {METHODS}, got {method!r}.")
  return jaxprune.rewind(trained, init_params, masks), masks


def run(config: Config, workdir: str = "workdir", *, data: str = "images",
        data_path: str | None = None) -> dict:
  """Runs (or resumes) the study; returns the results written to results.json."""
  setup, study = ft.start(config, STUDY, workdir, data, data_path)
  fractions = list(config.fractions)
  c = setup.config  # resolved: arch, image size and channels concrete
  model = setup.model
  prog = _report.Progress(1 + len(METHODS) * len(fractions), STUDY)

  tuned, tuned_rec = ft.finetune(study, setup)
  prog.step("fine-tuned")
  target = tuned_rec["test_accuracy"][-1]

  per_fraction, rows = {}, []
  for frac in fractions:
    recs = {}
    for method in METHODS:
      def run(method=method, frac=frac):
        rewound, masks = prune_and_rewind(method, tuned, setup.init_params, frac,
                                          key=_store.config_key(c.seed, "random_mask", frac))
        _, rec = cc.train(model, rewound, setup.split, masks=masks,
                          key=_store.config_key(c.seed, "retrain", frac),
                          epochs=c.retrain_epochs, learning_rate=c.learning_rate,
                          batch_size=c.batch_size, desc=f"{method} {frac:g}")
        kept, total = jaxprune.count_weights(masks)
        return {**rec, "weights_kept": kept, "weights_total": total}

      rec = study.cached(f"{method}_{frac:g}", run)
      rec["first_epoch_reaching_unpruned"] = cc.first_epoch_reaching(rec["test_accuracy"], target)
      recs[method] = rec
      rows.append({"fraction": frac, "method": method,
                   "acc_rewound": rec["test_accuracy"][0],
                   "acc_final": rec["test_accuracy"][-1],
                   "acc_best_on_test": max(rec["test_accuracy"][1:]),
                   "first_epoch_reaching_unpruned": rec["first_epoch_reaching_unpruned"]})
      prog.step(f"{method} {frac:g} retrained")
    per_fraction[f"{frac:g}"] = recs
    cc.plot_curves(
        study.path(figure_name(frac)),
        f"{100 * frac:g}% of each kernel pruned, rewound to initial weights",
        {f"{m} pruning, rewound": recs[m]["test_accuracy"] for m in METHODS},
        ylabel="test accuracy (fraction)", xlabel="retraining epoch (0 = rewound)",
        hline=("unpruned (fine-tuned)", target))

  results = {"finetune": tuned_rec, "unpruned_test_accuracy": target,
             "fractions": per_fraction, "description": setup.description,
             "summary": {"lottery": rows}}  # the report's table (for experiments.report_docs)
  study.write_results(results)
  table = _report.write_table(study.dir, "lottery", rows,
                              ["fraction", "method", "acc_rewound", "acc_final", "acc_best_on_test",
                               "first_epoch_reaching_unpruned"])
  figs = "\n\n".join(f"![]({figure_name(f)})" for f in fractions)
  study.write_report("Lottery tickets: percentile pruning with rewinding", [
      ("Set-up", setup.description + f" Unpruned (fine-tuned) test accuracy: {target:.4f}. "
       "Pruning: one-shot, per layer, every kernel (biases and batch-norm parameters kept); "
       "kept weights rewound to the initial weights, then retrained with the mask for "
       f"{c.retrain_epochs} epochs (same schedule for magnitude and random masks)."),
      ("Test accuracy and the first epoch reaching the unpruned accuracy",
       table + "\n" + _report.BEST_ON_TEST_NOTE + " `first_epoch_reaching_unpruned` compares "
       "two test accuracies (each retraining epoch's with the unpruned network's), both measured "
       "on the test split.\n"),
      ("Figures", figs),
  ])
  print(f"Wrote {study.dir}/REPORT.md")
  return results


def main(argv):
  _flags.run_main(argv, Config, run)


if __name__ == "__main__":
  _flags.define_flags(Config, default_data="images")
  _flags.run_binary(main)
